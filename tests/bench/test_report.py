"""The report: every optimizer and problem of the store appears, every image exists and is a PNG."""

from __future__ import annotations

import base64
import csv
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from curvlab.bench.report import write_report
from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import parse_suite
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
