"""``curvlab bench`` through its own parser (the integrator wires register() into the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvlab.cli import main


def _main(argv: list[str]) -> int:
    return main(argv)


def test_list_shows_problems_optimizers_suites(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "digits-mlp",
        "breast-cancer-logreg",
        "charlm-pydoc",
        "sgd-momentum",
        "quick:",
        "standard:",
    ):
        assert word in out
    assert _main(["bench", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in doc["problems"]} >= {"digits-mlp", "fashion-mlp"}


def test_run_report_export_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "problems: {quadratic-k1e2: {budget_steps: 6, eval_every: 3, target: 1.0e-2}}\n"
        "optimizers: [torch-sgd-momentum]\ntracks: {defaults: {seeds: 1}}\n"
    )
    store = tmp_path / "st.sqlite"
    assert (
        _main(
            [
                "bench",
                "run",
                "--suite",
                str(suite),
                "--store",
                str(store),
                "--in-process",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "1 finished" in capsys.readouterr().err
    assert (
        _main(
            [
                "bench",
                "export",
                "--store",
                str(store),
                "--format",
                "json",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 0
    )
    assert Path(capsys.readouterr().out.strip()).name == "store.json"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["bench", "run", "--suite", "quik", "--store", "S"],
            "unknown suite 'quik'. Did you mean 'quick'?",
        ),
        (["bench", "report", "--store", "MISSING"], "no store at"),
        (["bench", "export", "--store", "MISSING", "--out", "o"], "no store at"),
    ],
)
def test_errors_are_one_clear_line(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / a) if a in ("S", "MISSING", "o") else a for a in argv]
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlab bench: error: ") and match in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no report folder left


def test_unwritable_store_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert (
        _main(
            [
                "bench",
                "run",
                "--suite",
                "quick",
                "--store",
                str(blocker / "s.sqlite"),
                "--in-process",
            ]
        )
        == 2
    )
    assert "cannot create the store's directory" in capsys.readouterr().err


def test_calibrate_writes_targets_next_to_the_suite_then_run_uses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "problems: {quadratic-k1e2: {budget_steps: 8, eval_every: 4}}\n"
        "optimizers: [adamw]\ntracks: {tuned: {trials: 2, studies: 1}}\n"
    )
    store = tmp_path / "run.sqlite"
    run = ["bench", "run", "--suite", str(suite), "--store", str(store), "--in-process"]
    # no targets yet: refused at load time, nothing run, and told what to do
    assert _main([*run, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlab bench: error: ") and "run `curvlab bench calibrate" in err
    assert not store.exists()
    cal = [
        "bench",
        "calibrate",
        "--suite",
        str(suite),
        "--store",
        str(tmp_path / "cal.sqlite"),
        "--seeds",
        "1",
        "--trials",
        "2",
        "--fraction",
        "0.5",
        "--in-process",
        "--no-progress",
    ]
    assert _main(cal) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()) == tmp_path / "s.targets.yaml"
    assert "quadratic-k1e2: target rel_subopt <= " in err
    assert _main([*run, "--no-progress"]) == 0


def test_calibrate_refuses_a_bad_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _main(["bench", "calibrate", "--suite", "quick", "--store", "x", "--fraction", "-1"])
    assert "--fraction" in capsys.readouterr().err
