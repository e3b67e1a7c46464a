"""Step time and optimizer-state memory of MFAC and FRUGAL next to torch.optim.AdamW(foreach=True).

Two MLPs (128-256-256-10: 101,386 parameters; 512-1024-512-10: 1,055,242 parameters, the sizes
of the research notes) and two of eight equal square layers (112 wide: 101,248; 362 wide:
1,051,248), float32, one thread, fixed random gradients (the optimizer step alone is timed; a
plain forward+backward is timed for scale). The optimizers are stepped round-robin: per round one
untimed step (it refills the caches another optimizer evicted), then a few timed steps. Reported:
the median per-step thread CPU time (``time.thread_time``, so time the process was descheduled on
the shared machine does not count) over the rounds, and its ratio to AdamW-foreach in the same
rounds. State bytes are counted from ``optimizer.state`` (every tensor; FRUGAL's cached indices
are not state and are listed separately).

No installable peer implements M-FAC or FRUGAL (the official M-FAC needs CUDA for its LU without
pivoting; the authors' FRUGAL imports a private symbol removed from torch), so the side-by-side is
against torch's AdamW (foreach, reference) and fused AdamW.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_mfac_frugal_step_time.py
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.optim.frugal import FRUGAL
from curvlab.optim.mfac import MFAC

SIZES = {
    "100k": [128, 256, 256, 10],
    "1M": [512, 1024, 512, 10],
    # eight equal square layers: FRUGAL "blocks" at rho = 0.25 keeps exactly 2 of 8 weights
    "100k-deep": [112] * 9,
    "1M-deep": [362] * 9,
}


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def state_bytes(opt: torch.optim.Optimizer, params: list[Tensor] | None = None) -> int:
    keep = None if params is None else {id(p) for p in params}
    total = 0
    for p, st in opt.state.items():
        if keep is not None and id(p) not in keep:
            continue
        total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor))
    return total


def candidates(params: list[nn.Parameter]) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    return {
        "torch.AdamW foreach [REF]": lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "torch.AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True),
        "curvlab MFAC m=32": lambda: MFAC(params, lr=1e-8, num_grads=32, damp=1e-5),
        "curvlab MFAC m=32 momentum 0.9": lambda: MFAC(
            params, lr=1e-8, num_grads=32, damp=1e-5, momentum=0.9
        ),
        "curvlab FRUGAL blocks rho=0.25": lambda: FRUGAL(params, lr=1e-4, density=0.25),
        "curvlab FRUGAL columns rho=0.25": lambda: FRUGAL(
            params, lr=1e-4, density=0.25, projection="columns"
        ),
        "curvlab FRUGAL rows rho=0.25": lambda: FRUGAL(
            params, lr=1e-4, density=0.25, projection="rows"
        ),
        "curvlab FRUGAL blocks, foreach=True": lambda: FRUGAL(
            params, lr=1e-4, density=0.25, foreach=True
        ),
    }


def bench(widths: list[int], rounds: int, per_round: int) -> list[tuple[str, float, float, str]]:
    torch.manual_seed(0)
    model = mlp(widths)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    split = [p for p in params if p.dim() >= 2]
    n_split = sum(p.numel() for p in split)
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    opts = {name: make() for name, make in candidates(params).items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    x = torch.randn(128, widths[0])
    fwd_bwd: list[float] = []
    for r in range(rounds + 3):
        for name, opt in opts.items():
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()  # untimed: brings this optimizer's tensors back into cache
            t0 = time.thread_time()
            for _ in range(per_round):
                opt.step()
            if r >= 3:  # warm-up rounds (M-FAC's window fills after 32 steps either way)
                times[name].append((time.thread_time() - t0) / per_round)
        t0 = time.thread_time()
        model(x).square().mean().backward()
        if r >= 3:
            fwd_bwd.append(time.thread_time() - t0)
    ref = statistics.median(times["torch.AdamW foreach [REF]"])
    rows = []
    for name, opt in opts.items():
        med = statistics.median(times[name])
        note = ""
        if name.startswith("curvlab FRUGAL"):
            note = f"{state_bytes(opt, split) / n_split:.2f} B/param on the split weights"
            if "columns" in name or "rows" in name:
                idx = sum(
                    v.numel() * v.element_size()
                    for _, sel in opt.__dict__.get("_subspace_cache", {}).values()
                    for v in sel.values()
                    if v is not None
                )
                note += f" (+{idx / n_split:.3f} B/param cached indices)"
        rows.append((name, med * 1e3, med / ref, f"{state_bytes(opt) / n:.2f}", note))
    print(
        f"\n### {n:,}-parameter MLP ({'-'.join(map(str, widths))}); plain fwd+bwd (batch 128) "
        f"{statistics.median(fwd_bwd) * 1e3:.3f} ms; {rounds} rounds x {per_round} steps\n"
    )
    print("| optimizer | step ms (median) | x AdamW-foreach | state B/param | note |")
    print("|---|---:|---:|---:|---|")
    for name, ms, ratio, bpp, note in rows:
        print(f"| {name} | {ms:.3f} | {ratio:.2f} | {bpp} | {note} |")
    return [(r[0], r[1], r[2], r[4]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (median over them)")
    parser.add_argument("--per-round", type=int, default=3, help="steps per optimizer per round")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        "(shared with other jobs: compare ratios within a run), device cpu, float32"
    )
    for size in args.sizes:
        bench(SIZES[size], args.rounds, args.per_round)


if __name__ == "__main__":
    main()
