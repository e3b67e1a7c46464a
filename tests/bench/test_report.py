"""The report: every optimizer and problem of the store appears, every image exists and is a PNG."""

from __future__ import annotations

import base64
import csv
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from curvlab.bench.report import conclusion, write_report
from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import RunSpec, parse_suite
from curvlab.errors import StoreError

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:  # type: ignore[override]
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("report")
    doc = {
        "problems": {
            "quadratic-k1e2": {"budget_steps": 12, "eval_every": 4, "target": 1e-2},
            "deep-linear": {"budget_steps": 12, "eval_every": 6, "target": 0.5},
        },
        "optimizers": [
            {
                "label": "adamw",
                "optimizer": "torch.optim:AdamW",
                "fixed": {"weight_decay": 0.0},
                "defaults": {"lr": 0.01},
                "search": {"lr": {"low": 1e-3, "high": 0.3}},
            },
            {
                "label": "sgd-m",
                "optimizer": "torch.optim:SGD",
                "fixed": {"momentum": 0.9},
                "defaults": {"lr": 0.1},
                "search": {"lr": {"low": 1e-2, "high": 1e2}},
            },
        ],
        "tracks": {"defaults": {"seeds": 2}, "tuned": {"trials": 2, "studies": 2}},
    }
    run_suite(parse_suite(doc, "rep"), d / "store.sqlite", workers=0, progress=False)
    write_report(d / "store.sqlite", d / "out")
    return d


def test_html_names_every_optimizer_and_problem_and_embeds_pngs(report_dir: Path) -> None:
    page = _Page()
    page.feed((report_dir / "out" / "report.html").read_text())
    text = " ".join(page.text)
    st = Store(report_dir / "store.sqlite", readonly=True)
    runs = st.runs()
    assert {r["status"] for r in runs} <= {"finished", "diverged"}
    for label in {r["label"] for r in runs}:
        assert label in text
    for problem in {r["problem"] for r in runs}:
        assert problem in text
    for heading in (
        "Overall",
        "Environment",
        "speed-up",
        "learning-rate sensitivity",
        "steps to target",
    ):
        assert heading.lower() in text.lower()
    assert "torch" in text and "load average" in text
    # 1 profile figure + per problem (curves + LR sensitivity)
    assert len(page.images) == 1 + 2 * 2
    for src in page.images:
        m = re.match(r"data:image/png;base64,(.*)", src)
        assert m, src[:40]
        assert base64.b64decode(m.group(1)).startswith(PNG)


def test_markdown_images_exist(report_dir: Path) -> None:
    md = (report_dir / "out" / "report.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == 5
    for ref in refs:
        p = report_dir / "out" / ref
        assert p.is_file() and p.read_bytes().startswith(PNG)
    assert "| adamw |" in md and "| sgd-m |" in md


def test_report_of_missing_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        write_report(tmp_path / "none.sqlite", tmp_path / "out")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_headless_chromium_renders(report_dir: Path, tmp_path: Path) -> None:  # pragma: no cover
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            (report_dir / "out" / "report.html").as_uri(),
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert shot.read_bytes().startswith(PNG)


def test_labels_are_escaped_in_reports_and_guarded_in_csv(tmp_path: Path) -> None:
    evil = '=HYPERLINK("x")|<b>$y'
    doc = {
        "problems": {"quadratic-k1e2": {"budget_steps": 4, "eval_every": 2, "target": 1e-2}},
        "optimizers": [
            {"label": evil, "optimizer": "torch.optim:SGD", "defaults": {"lr": 0.1}},
            {"label": "-1+1", "optimizer": "torch.optim:SGD", "defaults": {"lr": 0.2}},
        ],
        "tracks": {"defaults": {"seeds": 1}},
    }
    store = tmp_path / "s.sqlite"
    run_suite(parse_suite(doc), store, workers=0, progress=False)
    write_report(store, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert '| =HYPERLINK("x")\\|&lt;b&gt;$y | defaults |' in md
    assert "<b>" not in md and "|<b>" not in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<b>" not in page and "=HYPERLINK(&quot;x&quot;)|&lt;b&gt;$y" in page
    st = Store(store)
    (runs_csv, _) = st.export(tmp_path / "csv")
    labels = {r["label"] for r in csv.DictReader(open(runs_csv))}
    assert labels == {"'" + evil, "'-1+1"}


_INFO = {
    "name": "p",
    "description": "synthetic",
    "target_metric": "loss",
    "target_threshold": 0.1,
    "higher_is_better": False,
    "budget_steps": 1000,
    "eval_every": 100,
    "data": "synthetic",
    "final_metric": "loss",
}


def synthetic_store(
    path: Path,
    cells: dict[tuple[str, str, str], list[float | None]],
    *,
    load: float = 0.5,
    finals: dict[tuple[str, str, str], float | list[float]] | None = None,
) -> Path:
    """A store whose runs have the given times to target (``None``: a miss) on every clock.

    ``cells``: ``(problem, label, track) -> [time of study 0, 1, ...]``; one run per study, budget
    1000 on every clock, lr 10^-(study + 1); ``finals`` sets the final metric of a cell (one
    value, or one per study; default 0.05).
    """
    st = Store(path)
    specs = []
    for (p, lab, track), times in cells.items():
        for s, t in enumerate(times):
            lr = 10.0 ** -(s + 1)
            specs.append((RunSpec(p, lab, lab, {"lr": lr}, s, track, s, 0, 1000, 100), t))
    problems = {p: {**_INFO, "name": p} for p, _, _ in cells}
    st.register("synthetic", "{}", problems, [sp for sp, _ in specs])
    for sp, t in specs:
        env = {"loadavg": [load, load, load], "cpu_count": 2}
        attempt = st.claim_run(sp.run_id, "me", env)
        assert attempt is not None
        final = (finals or {}).get((sp.problem, sp.label, sp.track), 0.05)
        final = final[sp.study] if isinstance(final, list) else final
        ttt = {} if t is None else {"ttt_steps": t, "ttt_grad_evals": t, "ttt_seconds": t / 100}
        summary = {"steps": 1000, "grad_evals": 1000.0, "seconds": 10.0, "final_metric": final}
        st.finish_run(sp.run_id, attempt, "finished", {**summary, **ttt}, {"loadavg": [load] * 3})
    st.close()
    return path


def test_conclusion_states_faster_slower_no_difference_and_misses(tmp_path: Path) -> None:
    ref = [100.0, 110.0, 120.0, 105.0, 115.0, 108.0]
    cells: dict[tuple[str, str, str], list[float | None]] = {
        ("lm", "adamw", "tuned"): list(ref),
        ("lm", "sophiag", "tuned"): [50.0, 58.0, 57.0, 51.0, 60.0, 52.0],
        ("lm", "sgd", "tuned"): [t * 3 for t in ref],
        ("lm", "adopt", "tuned"): [95.0, 125.0, 100.0, 118.0, 108.0, 111.0],
        ("lm", "dog", "tuned"): [None] * 6,
        ("hard", "adamw", "tuned"): [None] * 6,
        ("hard", "sophiag", "tuned"): [400.0] * 6,
        ("hard", "sgd", "tuned"): [None] * 6,
    }
    lines = conclusion(synthetic_store(tmp_path / "s.sqlite", cells))
    text = "\n".join(lines)
    assert lines[0].startswith("This run (48 runs on 2 problems; 6 studies per cell) supports 4 ")
    assert "gradient-equivalents" in lines[0] and "2000 resamples" in lines[0]
    assert re.search(
        r"On lm, tuned sophiag reaches the target 2x faster than tuned adamw in "
        r"gradient-equivalents, 95% CI \[1\.\d+, 2\.\d+\] \(6 paired studies, sign test p = 0\.031\)",
        text,
    )
    assert re.search(
        r"On lm, tuned sgd is slower than tuned adamw: it reaches the target in 3x", text
    )
    assert "On lm, tuned dog does not reach the target in most studies (0/6)" in text
    assert "speed-up at most 0.11" in text
    assert (
        "On hard, tuned sophiag reaches the target in most studies and tuned adamw does not" in text
    )
    assert re.search(
        r"No detectable difference from adamw .*tuned adopt on lm \[0\.\d+, 1\.\d+\]", text
    )
    assert (
        "The reference adamw did not reach the target (median over studies) on: hard (tuned, 0/6"
        in text
    )
    assert "Neither the optimizer nor adamw reached the target: sgd on hard." in text
    assert "Wall-clock" not in text and "Too few seeds" not in text


def test_conclusion_flags_few_seeds_high_load_and_tuned_worse(tmp_path: Path) -> None:
    cells: dict[tuple[str, str, str], list[float | None]] = {
        ("p", "adamw", "tuned"): [100.0, 110.0, 120.0],
        ("p", "x", "tuned"): [50.0, 55.0, 60.0],
        ("p", "x", "defaults"): [50.0, 55.0, 60.0],
        ("p", "adamw", "defaults"): [100.0, 110.0, 120.0],
    }
    finals = {("p", "x", "tuned"): 0.5, ("p", "x", "defaults"): 0.01}
    lines = conclusion(synthetic_store(tmp_path / "s.sqlite", cells, load=9.0, finals=finals))
    text = "\n".join(lines)
    assert (
        "with 3 paired studies the sign test cannot reach p < 0.05 (its smallest p is 0.25)" in text
    )
    assert (
        "Wall-clock is unreliable: the 1-minute load average exceeded the 2 cores in 12 of 12 runs (max 9.0)"
        in text
    )
    assert (
        "Tuned worse than defaults (final metric, tuned vs defaults): x on p (0.5 vs 0.01)" in text
    )
    # both tracks are compared with AdamW of the same track; 3 studies consistently 2x faster
    assert "On p, tuned x reaches the target 2x faster" in text
    assert "On p, default x reaches the target 2x faster than default adamw" in text


def test_conclusion_without_reference_says_so(tmp_path: Path) -> None:
    cells: dict[tuple[str, str, str], list[float | None]] = {("p", "x", "tuned"): [1.0, 2.0]}
    lines = conclusion(synthetic_store(tmp_path / "s.sqlite", cells))
    assert "supports 0 statements" in lines[0]
    assert "No finished adamw runs: no ratio to the reference can be stated." in lines


def test_report_opens_with_the_conclusion(tmp_path: Path) -> None:
    cells: dict[tuple[str, str, str], list[float | None]] = {
        ("p", "adamw", "tuned"): [100.0, 110.0, 120.0],
        ("p", "x", "tuned"): [50.0, 55.0, 60.0],
    }
    store = synthetic_store(tmp_path / "s.sqlite", cells)
    write_report(store, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("## Conclusion") < md.index("## Run") < md.index("## Overall")
    assert "On p, tuned x reaches the target 2x faster than tuned adamw" in md
    assert "| p | x | tuned | 2 | \\[" in md  # the speed-up table with its interval


def test_report_clips_runaway_values_and_flags_tuned_worse_and_load(tmp_path: Path) -> None:
    cells: dict[tuple[str, str, str], list[float | None]] = {
        ("p", "adamw", "tuned"): [100.0, 110.0, 120.0, 130.0],
        ("p", "dog", "tuned"): [None] * 4,
        ("p", "dog", "defaults"): [90.0, 95.0, 99.0, 97.0],
        ("p", "adamw", "defaults"): [100.0, 110.0, 120.0, 130.0],
    }
    finals = {("p", "dog", "tuned"): [0.2, 0.3, 0.25, 1e172], ("p", "adamw", "tuned"): 0.04}
    store = synthetic_store(tmp_path / "s.sqlite", cells, load=9.0, finals=finals)
    write_report(store, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Clipped to the axis (outside the robust range): dog at lr 0.0001: 1e+172." in md
    assert "⚠ tuned worse than defaults" in md
    assert "seconds to target (unreliable: high load)" in md
    assert "Wall-clock is unreliable" in md


def test_robust_limits_ignore_a_runaway_value() -> None:
    from curvlab.bench.report import _robust_limits

    lo, hi = _robust_limits([0.2, 0.3, 0.25, 0.22, 1e172], log=True)  # type: ignore[misc]
    assert lo == pytest.approx(0.2) and hi < 10.0
    assert _robust_limits([math.nan, -1.0], log=True) is None


def test_report_plots_recorded_monitors(tmp_path: Path) -> None:
    doc = {
        "problems": {"quadratic-k1e2": {"budget_steps": 10, "eval_every": 5}},
        "targets": {"quadratic-k1e2": 1e-2},
        "optimizers": [{"label": "sgd", "optimizer": "torch.optim:SGD", "defaults": {"lr": 0.005}}],
        "tracks": {"defaults": {"seeds": 2}},
        "monitors": [{"name": "sharpness", "every": 5}],
    }
    run_suite(parse_suite(doc), tmp_path / "s.sqlite", workers=0, progress=False)
    write_report(tmp_path / "s.sqlite", tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(figures/quadratic-k1e2_monitors.png)" in md
    assert (
        (tmp_path / "out" / "figures" / "quadratic-k1e2_monitors.png").read_bytes().startswith(PNG)
    )
