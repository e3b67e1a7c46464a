"""Run every phenomenon and write an HTML index page with a two-line caption per figure."""

from __future__ import annotations

import concurrent.futures as cf
import html
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from curvlab._workers import one_thread_worker
from curvlab.datasets import fashion_mnist_available
from curvlab.errors import InvalidArgumentError
from curvlab.phenomena._common import PhenomenonConfig, PhenomenonResult, failed_checks
from curvlab.phenomena.batch_size import BatchSizeConfig, batch_size
from curvlab.phenomena.central_flow import CentralFlowConfig, central_flow
from curvlab.phenomena.compression import CompressionConfig, compression
from curvlab.phenomena.deep_linear import DeepLinearConfig, deep_linear
from curvlab.phenomena.depth import DepthConfig, depth_sweep
from curvlab.phenomena.eos import EoSConfig, edge_of_stability
from curvlab.phenomena.gfs import GFSConfig, gfs_sharpness
from curvlab.phenomena.hessian_outliers import HessianOutliersConfig, hessian_outliers
from curvlab.phenomena.imbalanced_collapse import ImbalancedCollapseConfig, imbalanced_collapse
from curvlab.phenomena.matrix_sensing import MatrixSensingConfig, matrix_sensing
from curvlab.phenomena.mode_connectivity import ModeConnectivityConfig, mode_connectivity
from curvlab.phenomena.mup import MuPConfig, mup_transfer
from curvlab.phenomena.neural_collapse import NeuralCollapseConfig, neural_collapse
from curvlab.phenomena.newton import NewtonConfig, newton_phenomenon
from curvlab.phenomena.psgd_conditioning import PSGDConditioningConfig, psgd_conditioning
from curvlab.phenomena.sgd_stability import SGDStabilityConfig, sgd_stability
from curvlab.phenomena.subspace import SubspaceConfig, tiny_subspace

__all__ = [
    "PHENOMENA",
    "default_workers",
    "quick_config",
    "run_all",
    "run_phenomenon",
    "write_index",
]

#: name -> (function, its config class); the names the CLI accepts.
PHENOMENA: dict[str, tuple[Callable[..., PhenomenonResult], type[PhenomenonConfig]]] = {
    "eos": (edge_of_stability, EoSConfig),
    "subspace": (tiny_subspace, SubspaceConfig),
    "matrix-sensing": (matrix_sensing, MatrixSensingConfig),
    "deep-linear": (deep_linear, DeepLinearConfig),
    "neural-collapse": (neural_collapse, NeuralCollapseConfig),
    "newton": (newton_phenomenon, NewtonConfig),
    "compression": (compression, CompressionConfig),
    "psgd-conditioning": (psgd_conditioning, PSGDConditioningConfig),
    "central-flow": (central_flow, CentralFlowConfig),
    "gfs": (gfs_sharpness, GFSConfig),
    "mode-connectivity": (mode_connectivity, ModeConnectivityConfig),
    "mup": (mup_transfer, MuPConfig),
    "depth": (depth_sweep, DepthConfig),
    "hessian-outliers": (hessian_outliers, HessianOutliersConfig),
    "imbalanced-collapse": (imbalanced_collapse, ImbalancedCollapseConfig),
    "sgd-stability": (sgd_stability, SGDStabilityConfig),
    "batch-size": (batch_size, BatchSizeConfig),
}


def _check_name(name: str) -> None:
    if name not in PHENOMENA:
        raise InvalidArgumentError(
            f"unknown phenomenon {name!r}; choose one of {', '.join(PHENOMENA)}"
        )


def quick_config(name: str) -> PhenomenonConfig:
    """A small configuration of each phenomenon (its config's ``quick()``: seconds each)."""
    _check_name(name)
    return PHENOMENA[name][1].quick()


def run_phenomenon(
    name: str,
    out_dir: str | os.PathLike[str],
    quick: bool = False,
    progress_bar: bool = True,
) -> PhenomenonResult:
    """Run one phenomenon by name into ``out_dir``.

    The tiny-subspace run uses Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed
    and otherwise the shipped digits, whose note then says that the claim is not reproduced there.
    """
    _check_name(name)
    fn, cls = PHENOMENA[name]
    config = cls.quick() if quick else cls()
    if name == "subspace" and not fashion_mnist_available():
        print(
            "Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); running the "
            "tiny-subspace check on the shipped digits, where it is known not to reproduce.",
            file=sys.stderr,
        )
        fashion = SubspaceConfig.quick() if quick else SubspaceConfig()
        config = replace(
            fashion, dataset="digits", num_samples=1500 if not quick else 500, width=50
        )
    return fn(config, out_dir=out_dir, progress_bar=progress_bar)


def write_index(results: list[PhenomenonResult], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``index.html``: every figure with its two-line caption, outcome and numbers file."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = []
    for res in results:
        status = res.status
        fig = html.escape(res.figure.name) if res.figure is not None else ""
        js = html.escape(res.json_path.name) if res.json_path is not None else ""
        blocks.append(
            f'<section id="{html.escape(res.name)}">\n'
            f"<h2>{html.escape(res.name)} — {status}</h2>\n"
            f'<figure><img src="{fig}" alt="{html.escape(res.name)}" style="max-width:100%">\n'
            f"<figcaption><p><b>Shows:</b> {html.escape(res.caption[0])}</p>\n"
            f"<p><b>Paper predicts:</b> {html.escape(res.caption[1])}</p></figcaption></figure>\n"
            f"<p><i>Measured:</i> {html.escape(res.note)}</p>\n"
            f'<p>Numbers: <a href="{js}">{js}</a></p>\n</section>'
        )
    rows = []
    for res in results:
        failed = failed_checks(res.numbers.get("checks", {}))
        why = "failed checks: " + ", ".join(failed) if failed else "every check held"
        rows.append(
            f'<tr><td><a href="#{html.escape(res.name)}">{html.escape(res.name)}</a></td>'
            f"<td>{res.status}</td><td>{html.escape(why)}</td></tr>"
        )
    table = (
        "<table border=1 cellpadding=4><tr><th>claim</th><th>outcome</th><th>why</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>curvlab — training-dynamics phenomena</title></head>\n<body>\n"
        "<h1>curvlab — training-dynamics phenomena, reproduced on a CPU</h1>\n"
        + table
        + "\n"
        + "\n".join(blocks)
        + "\n</body></html>\n"
    )
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _one_thread_run(name: str, out_dir: str, quick: bool, progress_bar: bool) -> PhenomenonResult:
    """Run one phenomenon with torch on one thread (in a worker process, or in this one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_phenomenon(name, out_dir, quick, progress_bar)
    finally:
        torch.set_num_threads(threads)


def default_workers() -> int:
    """The number of cores this process may use (``os.sched_getaffinity`` where available)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def run_all(
    out_dir: str | os.PathLike[str],
    quick: bool = False,
    progress_bar: bool = True,
    workers: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[PhenomenonResult], Path]:
    """Run every phenomenon (or ``names``) into ``out_dir``, then write the index page once.

    The phenomena run in ``workers`` processes (default: one per core), each with torch on one
    thread; ``workers=1`` runs them here, also on one thread, so the numbers do not depend on
    ``workers``. Each phenomenon writes its own figure and JSON; results come back in registry
    order. Progress bars are shown only with one worker.

    Raises:
        InvalidArgumentError: ``workers`` below 1 or an unknown name in ``names``.
    """
    todo = list(PHENOMENA) if names is None else list(names)
    for name in todo:
        _check_name(name)
    count = default_workers() if workers is None else workers
    if count < 1:
        raise InvalidArgumentError(f"run_all needs workers >= 1, got {workers!r}")
    folder = os.fspath(out_dir)
    if count == 1 or len(todo) == 1:
        results = [_one_thread_run(name, folder, quick, progress_bar) for name in todo]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch threads
        with cf.ProcessPoolExecutor(
            min(count, len(todo)),
            mp_context=ctx,
            initializer=one_thread_worker,  # a killed run leaves no worker behind
            initargs=(os.getpid(),),
        ) as pool:
            futures = [pool.submit(_one_thread_run, n, folder, quick, False) for n in todo]
            results = [future.result() for future in futures]
    return results, write_index(results, out_dir)
