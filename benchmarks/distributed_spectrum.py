"""Curvature over data-parallel ranks: the speed-up of a spectrum job from 1 to 2 gloo processes,
and what one all-reduce costs next to the product it completes (CPU, 1 thread per process).

The job: ``summarize_spectrum`` of the digits MLP (10,554 parameters; Hessian on 512 digits,
float32) with a fixed budget (top 5, trace 99, layers 30, density 4 x 32 Lanczos steps). One rank
holds all 512 examples; two ranks hold 256 each and all-reduce every product
(:class:`~curvlab.distributed.DistributedOperator`). The two set-ups alternate (1, 2, 1, 2, ...)
and the medians are reported, with the speed-up ``t1 / t2``.

Communication per product: on the 2-rank world, the median time (40 interleaved rounds) of one
Hessian-vector product on a rank's shard (the local work) and of one ``all_reduce`` of its ``n``
values (``n x 4`` bytes in float32, ``n x 8`` in float64; a ring all-reduce sends ``2 (W-1)/W``
of that per rank), for one column and for a block of 8 (the trace's chunk).

Run: ``PYTHONPATH=src python benchmarks/distributed_spectrum.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curvlab import HessianOperator
from curvlab.spectrum import summarize_spectrum
from curvlab.zoo import load_problem

JOB: dict[str, Any] = {
    "top_k": 5,
    "trace_matvecs": 99,
    "layer_matvecs": 30,
    "num_probes": 4,
    "lanczos_steps": 32,
}


def _job(problem: Any, data: Any, group: Any = None) -> float:
    """Seconds of the spectrum job on ``data`` over ``group`` (a 1-rank group: no communication)."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    summarize_spectrum(problem.model, problem.loss_fn, data, generator=gen, group=group, **JOB)
    return time.perf_counter() - t0


def _communication(problem: Any, shard: Any, rounds: int = 40) -> dict[str, float]:
    """Median seconds of a local product and of an all-reduce of its size (1 and 8 columns),
    the cases interleaved round by round after one warm-up round."""
    H = HessianOperator(problem.model, problem.loss_fn, shard)
    cases = {}
    for k in (1, 8):
        V = torch.randn(H.shape[0], k, generator=torch.Generator().manual_seed(k))
        cases[f"product_{k}"] = lambda V=V: H.matmat(V)
        for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            buf = V.to(dtype)
            cases[f"all_reduce_{k}_{name}"] = lambda b=buf: dist.all_reduce(b)
    times: dict[str, list[float]] = {name: [] for name in cases}
    with H.fixed():
        for r in range(rounds + 1):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _worker(rank: int, world: int, init: str, out_file: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    problem = load_problem("digits-mlp", seed=0)
    x, y = problem.data
    half = len(y) // 2
    shard = (x[:half], y[:half]) if rank == 0 else (x[half:], y[half:])
    solo = dist.new_group([0])
    one, two = [], []
    _job(problem, shard)  # warm-up of the 2-rank path
    for _ in range(repeats):
        dist.barrier()
        if rank == 0:  # rank 1 waits in the barrier below (blocked in gloo, not computing)
            one.append(_job(problem, problem.data, solo))
        dist.barrier()
        two.append(_job(problem, shard))
    comm = _communication(problem, shard)
    n = sum(p.numel() for p in problem.model.parameters())
    if rank == 0:
        torch.save({"one": one, "two": two, "comm": comm, "n": n}, out_file)
    dist.destroy_process_group()


def _measure(repeats: int) -> dict[str, Any]:
    """Run :func:`_worker` on 2 spawned ranks; rank 0's measurements."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "results.pt")
        init = os.path.join(tmp, "init")
        mp.start_processes(_worker, args=(2, init, out_file, repeats), nprocs=2)
        return torch.load(out_file)


def main() -> None:
    """Time the job both ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = _measure(args.repeats)
    t1, t2 = statistics.median(r["one"]), statistics.median(r["two"])
    c, n = r["comm"], r["n"]
    print(f"torch {torch.__version__}, 1 thread per process, gloo, {n} parameters (float32)")
    print(
        f"spectrum job, median of {args.repeats}: 1 rank {t1:.2f} s, 2 ranks {t2:.2f} s, "
        f"speed-up {t1 / t2:.2f}x   (1 rank: {r['one']}, 2 ranks: {r['two']})"
    )
    for k in (1, 8):
        prod = c[f"product_{k}"]
        for name, width in (("fp32", 4), ("fp64", 8)):
            ar = c[f"all_reduce_{k}_{name}"]
            print(
                f"{k} column(s): product on a shard {prod * 1e3:.2f} ms; all_reduce of "
                f"{n * k * width:,} bytes ({name}) {ar * 1e3:.3f} ms = {ar / prod:.1%} of the product"
            )
    with open("/proc/loadavg") as f:
        print("loadavg:", f.read().strip())


if __name__ == "__main__":
    main()
