"""``summarize_spectrum`` and ``curvlab spectrum`` on two gloo ranks give the one-process answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from curvlab.cli import main
from curvlab.errors import DistributedError
from curvlab.spectrum import summarize_spectrum
from tests.distributed._gloo import needs_gloo, two_rank_results
from tests.distributed._gloo import tiny_data as _data
from tests.distributed._gloo import tiny_loss as _loss
from tests.distributed._gloo import tiny_model as _model

SETTINGS: dict[str, Any] = {
    "top_k": 2,
    "tol": 1e-10,
    "trace_matvecs": 9,
    "layer_matvecs": 6,
    "num_probes": 2,
    "lanczos_steps": 12,
}


def _summary(model, data, operator, seed=0, **changes):
    summary, _, _ = summarize_spectrum(
        model,
        _loss(),
        data,
        operator=operator,
        generator=torch.Generator().manual_seed(seed),
        **{**SETTINGS, **changes},
    )
    return summary.to_dict()


def _error(fn) -> str:
    try:
        fn()
    except DistributedError as exc:
        return str(exc)
    return "no error"


def _on_rank(rank: int) -> dict[str, Any]:
    x, y = _data()
    shard = (x[:8], y[:8]) if rank == 0 else (x[8:], y[8:])  # 8 and 5 examples
    out = {op: _summary(DistributedDataParallel(_model()), shard, op) for op in ("hessian", "ggn")}
    out["seed"] = _error(lambda: _summary(_model(), shard, "hessian", seed=rank))
    out["settings"] = _error(lambda: _summary(_model(), shard, "hessian", top_k=1 + rank))
    model = _model()
    with torch.no_grad():
        model[2].bias.add_(float(rank))
    out["params"] = _error(lambda: _summary(model, shard, "hessian"))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(_on_rank, tmp_path_factory.mktemp("spectrum"))


def _assert_same(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            # the cost may differ: whether Lanczos restarts on the GGN's null space (bottom
            # eigenvalue) can turn on the last bit of a product
            if k not in ("seconds", "matvecs"):
                _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-8, abs=1e-11), path
    else:
        assert got == want, path


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_two_ranks_give_the_one_process_summary(ranks, operator):
    want = _summary(_model(), _data(), operator)
    assert want["world_size"] == 1
    for got in ranks:
        assert got[operator]["world_size"] == 2
        got[operator]["world_size"] = 1
        _assert_same(got[operator], want)


@pytest.mark.slow
@needs_gloo
def test_ranks_that_disagree_raise(ranks):
    what = {"seed": "the seed", "settings": "the settings", "params": "the model's parameters"}
    for got in ranks:
        for case, words in what.items():
            assert got[case].startswith(f"the ranks disagree on {words}"), got[case]


def test_a_launch_without_a_process_group_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match=r"init_process_group .* WORLD_SIZE=2"):
        _summary(_model(), _data(), "hessian")


def _cli_args(out: Path) -> list[str]:
    args = ["spectrum", "--problem", "breast-cancer-logreg", "--dtype", "float64", "--top-k", "1"]
    args += ["--trace-matvecs", "3", "--layer-matvecs", "2", "--probes", "1"]
    return [*args, "--lanczos-steps", "4", "--no-progress", "--out", str(out)]


@pytest.mark.slow
@needs_gloo
def test_torchrun_cli_writes_world_size_and_the_one_process_top_eigenvalue(tmp_path, capsys):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
    }
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*run, "-m", "curvlab", *_cli_args(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # a rank's own failure comes before the launcher's summary: show both
    said = [ln for ln in done.stderr.splitlines() if "rror" in ln or "terminate" in ln]
    assert done.returncode == 0, "\n".join(said[:20]) + "\n...\n" + done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 2  # rank 0 alone writes (the PNG and the JSON)
    assert main(_cli_args(tmp_path / "one")) == 0
    one, two = (json.loads((tmp_path / r / "spectrum.json").read_text()) for r in ("one", "two"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["top_eigenvalues"][0] == pytest.approx(one["top_eigenvalues"][0], rel=1e-9)
    assert two["trace"] == pytest.approx(one["trace"], rel=1e-9)
