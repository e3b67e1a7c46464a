"""Peak memory of curvlab's curvature estimators, in parameter vectors (a benchmark, not a test).

Every measurement runs in a fresh Python process: it builds an MLP of the requested size and a
batch of random data, warms the code path up on a tiny copy of the task (so lazily imported
modules and the allocator's first pages are not counted), records the resident set size, runs the
task once and reads the peak resident set size of the process (``VmHWM`` in /proc/self/status).
The figure is ``(peak − before) / (4 · n)``: how many float32 vectors of the parameter count
``n`` the call held at its peak, everything included (the cached gradient graph, the Krylov
basis, probes, products and the allocator's slack). Peak RSS rather than ``tracemalloc``: torch's
CPU tensors are allocated in C and tracemalloc does not see them; peak RSS is what the operating
system had to give the process, which is the figure that runs a machine out of memory.

Tasks: one Hessian product (``product``), ``eigsh`` (k = 1, default tolerance; the steps taken
are printed) and ``eigsh-7`` (stopped after 7 steps, the memory of a run that converges in 7), Hutchinson and Hutch++ traces at two probe counts (memory should not grow with
``m``), SLQ (1 probe, 20 steps) and ``layer_sensitivity`` (traces only, m = 30).

Run (a few minutes on a shared machine; each child takes seconds):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/curvature_memory.py --sizes 1M,5M

``--device cuda`` measures ``torch.cuda.max_memory_allocated`` instead of the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent.parent / "results"
SIZES = {"tiny": (32, 64), "100k": (128, 512), "1M": (256, 1024), "5M": (256, 2048)}
TASKS = (
    "product",
    "eigsh",
    "eigsh-7",
    "hutchinson-30",
    "hutchinson-90",
    "hutch++-30",
    "hutch++-90",
    "slq-20",
    "layers-30",
)
BATCH = 64


def make_model(size: str, device: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """An MLP ``d → h → h → 10`` of about the named size, and one batch of random data."""
    d, h = SIZES[size]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # benchmark script, not library code: the layers' initialisation
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    x = torch.randn(BATCH, d, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model.to(device), (x.to(device), y.to(device))


def run_task(task: str, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Run one task; return what it reports (products used, steps)."""
    import curvlab as cl
    from curvlab.operators import HessianOperator

    loss = nn.CrossEntropyLoss()
    gen = torch.Generator(device=data[0].device).manual_seed(0)
    name, _, m = task.partition("-")
    if name == "layers":
        r = cl.layer_sensitivity(
            model, loss, data, num_matvecs=int(m), top_eigenvalue=False, generator=gen
        )
        return {"matvecs": r.num_matvecs}
    H = HessianOperator(model, loss, data)
    if name == "product":
        v = torch.randn(H.shape[0], generator=gen, device=H.device)
        H @ v
        return {"matvecs": 1}
    if name == "eigsh":  # eigsh-7: stopped after 7 steps, as a run that converges in 7
        e = cl.eigsh(H, k=1, max_matvecs=int(m) if m else None, generator=gen)
        return {"matvecs": e.num_matvecs}
    if name == "slq":
        d = cl.spectral_density(H, num_probes=1, lanczos_steps=int(m), generator=gen)
        return {"matvecs": d.num_matvecs}
    t = cl.trace(H, int(m), method=name, generator=gen)
    return {"matvecs": t.num_matvecs}


def _status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so the peak is this call's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(task: str, size: str, device: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(1)
    run_task(task, *make_model("tiny", device))  # warm-up: imports, first pages
    model, data = make_model(size, device)
    n = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    info = run_task(task, model, data)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM")
    return {
        "task": task,
        "size": size,
        "n": n,
        "peak_bytes": peak - before,
        "vectors": (peak - before) / (4 * n),
        "seconds": time.perf_counter() - t0,
        **info,
    }


def measure(task: str, size: str, device: str) -> dict[str, Any]:
    """Run :func:`child` in a fresh process and return its record."""
    cmd = [sys.executable, __file__, "--child", task, size, "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"task": task, "size": size, "error": r.stderr.strip()[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,5M", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "curvature_memory_latest.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device)))
        return
    print(
        f"curvature memory: peak {'CUDA allocation' if args.device == 'cuda' else 'RSS'} growth "
        f"of one call in a fresh process, in float32 parameter vectors; torch {torch.__version__}, "
        f"python {platform.python_version()}, load {open('/proc/loadavg').read().split()[0]}"
    )
    rows = []
    for size in args.sizes.split(","):
        for task in args.tasks.split(","):
            r = measure(task, size, args.device)
            rows.append(r)
            if "error" in r:
                print(f"  {size:<5}{task:<15} FAILED: {r['error']}")
                continue
            print(
                f"  {size:<5}{task:<15} n={r['n']:>9,d}  {r['vectors']:7.1f} vectors "
                f"({r['peak_bytes'] / 2**20:8.1f} MiB)  {r['matvecs']:>4d} HVPs  "
                f"{r['seconds']:6.2f} s"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
