"""The dynamics CLI and the index page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from curvlab.cli.dynamics import register
from curvlab.phenomena import PHENOMENA, PhenomenonResult, write_index
from curvlab.phenomena.index import quick_config


def _parser():
    parser = argparse.ArgumentParser(prog="curvlab")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_runs_one_phenomenon(tmp_path, capsys):
    args = _parser().parse_args(
        [
            "dynamics",
            "--phenomenon",
            "deep-linear",
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "deep-linear: reproduced" in out
    assert (tmp_path / "deep_linear.png").exists()
    assert json.loads((tmp_path / "deep_linear.json").read_text())["reproduced"] is True


def test_cli_arguments():
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["dynamics"])  # --phenomenon or --all is required
    with pytest.raises(SystemExit):
        parser.parse_args(["dynamics", "--phenomenon", "grokking"])
    assert parser.parse_args(["dynamics", "--all"]).all is True
    assert {"eos", "subspace", "matrix-sensing", "deep-linear", "neural-collapse"} <= set(PHENOMENA)
    assert {"newton", "compression"} <= set(PHENOMENA)
    for name in PHENOMENA:
        assert isinstance(quick_config(name), PHENOMENA[name][1])


def test_index_page_has_every_figure_and_two_line_caption(tmp_path):
    results = []
    for name, ok in (("eos", True), ("subspace", False)):
        fig = tmp_path / f"{name}.png"
        fig.write_bytes(b"png")
        results.append(
            PhenomenonResult(
                name=name,
                numbers={},
                reproduced=ok,
                note=f"note <{name}>",
                caption=(f"shows {name}", f"predicts {name}"),
                figure=fig,
                json_path=Path(tmp_path / f"{name}.json"),
            )
        )
    page = write_index(results, tmp_path).read_text()
    assert page.count("<img ") == 2 and 'src="eos.png"' in page and 'src="subspace.png"' in page
    assert "<b>Shows:</b> shows eos" in page and "<b>Paper predicts:</b> predicts subspace" in page
    assert "subspace — NOT reproduced" in page and "eos — reproduced" in page
    assert "note &lt;eos&gt;" in page  # escaped
    assert page.count("<tr>") == 3  # the summary table: a header and one row per claim


def test_eos_table_prints_a_control_on_its_own_schedule(capsys):
    from curvlab.cli.dynamics import _print_eos_table

    main = {"eta": 0.3, "steps": [0, 20, 40, 60], "ratio": [0.4, 0.6, 0.9, 1.0]}
    control = {"eta": 0.1, "steps": [0, 100], "ratio": [0.1, 0.2]}
    _print_eos_table({"runs": {"0.3": main}, "control": control})  # raised IndexError before
    out = capsys.readouterr().out
    assert "    0.100" in out and "    1.000" in out


@pytest.mark.slow
def test_all_in_two_workers_writes_the_numbers_of_one(tmp_path):
    from curvlab.phenomena.index import run_all

    names = ["depth", "deep-linear"]  # two cheap phenomena
    docs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        results, index = run_all(out, quick=True, progress_bar=False, workers=workers, names=names)
        assert [r.name for r in results] == names and index.exists()
        docs[workers] = {n: (out / f"{n.replace('-', '_')}.json").read_text() for n in names}
    assert docs[1] == docs[2]  # the same JSON, byte for byte
    assert json.loads(docs[2]["depth"])["numbers"]["config"]


def test_workers_option_and_bad_values():
    from curvlab.errors import InvalidArgumentError
    from curvlab.phenomena.index import run_all

    parser = _parser()
    assert parser.parse_args(["dynamics", "--all", "--workers", "2"]).workers == 2
    assert parser.parse_args(["dynamics", "--all"]).workers is None
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["dynamics", "--all", "--workers", bad])
    with pytest.raises(InvalidArgumentError, match="workers >= 1"):
        run_all("unused", workers=0, names=["depth"])
    with pytest.raises(InvalidArgumentError, match="unknown phenomenon 'grokking'"):
        run_all("unused", names=["grokking"])
