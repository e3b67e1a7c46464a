"""``curvlab spectrum``: the curvature summary of a model, printed and saved."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from curvlab.cli import check_out_dir, positive_float, positive_int

__all__ = ["register", "run"]

DESCRIPTION = """\
Measure the curvature of a model's loss, matrix-free: the top eigenvalues (Lanczos, with
residuals), the most negative eigenvalue, the trace (Hutch++, with a standard error), a
per-layer table (trace, trace per parameter = HAWQ-V2 sensitivity, top eigenvalue of each
layer's block) and the spectral density (stochastic Lanczos quadrature).

Prints a table, writes OUT/spectrum.png (the density) and OUT/spectrum.json (every figure).

Under torchrun (WORLD_SIZE > 1) the ranks join a gloo process group, each takes a contiguous
shard of the examples (of an (inputs, targets) pair of tensors; a --model function that returns
a loader or a list of batches returns that rank's shard), and the products are all-reduced: the
answer is the one-process answer to rounding, printed and written by rank 0 only; spectrum.json
records world_size.
"""

EPILOG = """\
examples:
  curvlab spectrum                                   # tanh MLP on sklearn digits
  curvlab spectrum --problem digits-cnn --operator ggn --out runs/cnn
  curvlab spectrum --model mypkg.models:build        # build() returns (model, loss_fn, data)
  torchrun --nproc_per_node 2 -m curvlab spectrum    # the data sharded over 2 processes
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``spectrum`` subcommand."""
    from curvlab.spectrum import OPERATORS
    from curvlab.zoo import ZOO

    p = subparsers.add_parser(
        "spectrum",
        help="eigenvalues, trace, per-layer table and spectral density of a model's curvature",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--problem",
        default="digits-mlp",
        help=f"built-in problem: {', '.join(ZOO)} (default: %(default)s)",
    )
    src.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="your own function returning (model, loss_fn, data)",
    )
    p.add_argument(
        "--operator",
        choices=sorted(OPERATORS),
        default="hessian",
        help="curvature matrix (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=5,
        help="number of top eigenvalues (default: %(default)s)",
    )
    p.add_argument(
        "--tol",
        type=positive_float,
        default=1e-3,
        help="Lanczos relative residual tolerance (default: %(default)s)",
    )
    p.add_argument(
        "--trace-matvecs",
        type=positive_int,
        default=99,
        help="products for the trace (default: %(default)s)",
    )
    p.add_argument(
        "--layer-matvecs",
        type=positive_int,
        default=60,
        help="probes for the per-layer traces (default: %(default)s)",
    )
    p.add_argument(
        "--probes",
        type=positive_int,
        default=4,
        help="SLQ probes for the density (default: %(default)s)",
    )
    p.add_argument(
        "--lanczos-steps",
        type=positive_int,
        default=64,
        help="Lanczos steps per SLQ probe (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="built-in problems' dtype",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the problem and the probes (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("curvlab-out/spectrum"),
        help="output folder (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``curvlab spectrum`` with parsed arguments; returns the exit code."""
    from curvlab.distributed._sync import launched_world_size

    if launched_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # from torchrun's environment; the problems run on CPU
        try:
            return _run(args)
        finally:
            dist.destroy_process_group()
    return _run(args)


def _shard(data: Any) -> Any:
    """This rank's contiguous share of the examples of an ``(inputs, targets)`` pair of tensors.

    Alone, or for any other data (a loader, a list of batches: the user's own sharding, e.g.
    with a ``DistributedSampler``), the data as given.
    """
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if not (pair and all(isinstance(t, torch.Tensor) for t in data)):
        return data
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return data
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(data[1])
    rows = slice(rank * n // world, (rank + 1) * n // world)
    return tuple(part[rows] for part in data)


def _run(args: argparse.Namespace) -> int:
    from curvlab.spectrum import plot_density, summarize_spectrum, write_json
    from curvlab.zoo import load_problem

    lead = not dist.is_initialized() or dist.get_rank() == 0  # the only rank that writes
    out = check_out_dir(args.out) if lead else args.out
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    problem = load_problem(args.model or args.problem, seed=args.seed, dtype=dtype)
    progress = lead and not args.no_progress and sys.stderr.isatty()
    if lead:
        print(f"problem         {problem.description}")
    summary, density, _ = summarize_spectrum(
        problem.model,
        problem.loss_fn,
        _shard(problem.data),
        operator=args.operator,
        top_k=args.top_k,
        tol=args.tol,
        trace_matvecs=args.trace_matvecs,
        layer_matvecs=args.layer_matvecs,
        num_probes=args.probes,
        lanczos_steps=args.lanczos_steps,
        generator=torch.Generator().manual_seed(args.seed),
        progress=progress,
    )
    if not lead:
        return 0
    print(summary.table())
    png = plot_density(
        density,
        out / "spectrum.png",
        title=f"{problem.name}: {args.operator} spectral density",
        top=summary.top_eigenvalues,
    )
    env = {
        "problem": problem.name,
        "description": problem.description,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "seed": args.seed,
    }
    js = write_json(summary, out / "spectrum.json", extra=env)
    print(f"\nwrote {png}\nwrote {js}")
    return 0
