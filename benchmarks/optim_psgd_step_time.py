"""Step time of curvlab's PSGDKron against torch AdamW(foreach) and the PSGD-Kron peers, on CPU.

What is timed: ``optimizer.step()`` alone, with fixed gradients already in ``p.grad`` (one
forward/backward of a batch of 64 done once), on two MLPs (~100k and ~1M parameters), one thread.
Cases run round-robin (interleaved), medians are reported with the ratio to AdamW(foreach=True) and
the optimizer state in bytes per parameter. Peers (optional, skipped if they do not import):
heavyball ``PSGDKron`` (eager, compile disabled) and kron-torch ``Kron``, both with update
probability 1 so that every step refits the preconditioner, in their default (two-sided) factor
layout and with ``memory_save_mode="one_diag"`` (the one-sided layout of the official default
``max_skew=1``). curvlab's two-sided row uses ``max_skew=64``: every matrix two-sided, biases
diagonal, the peers' default layout on these MLPs.

``--official PATH`` points at a copy of the authors' ``psgd.py`` (lixilinx/psgd_torch, not shipped
here): then a float64 trajectory check runs PSGDKron against the official functions with identical
probe streams and prints the largest relative difference of parameters and factors, and the
official ``KronWhiten`` step is timed too (its ``step`` needs a closure, so the time of a plain
forward/backward is subtracted).

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_psgd_step_time.py [--rounds 15]
        [--sizes 100k 1M] [--official /tmp/psgd.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvlab.optim.psgd_kron import PSGDKron, probe_seed
from curvlab.optim.psgd_lra import PSGDLRA

SIZES = {"100k": (128, 256, 256, 10), "1M": (512, 1024, 512, 10)}


def mlp(widths: tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    for st in opt.state.values():
        if isinstance(st, dict):
            visit(st)
    return total


def make_cases(official: Any) -> dict[str, Callable[[list[nn.Parameter]], Any]]:
    cases: dict[str, Callable[[list[nn.Parameter]], Any]] = {
        "torch.AdamW foreach [REF]": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "curvlab.PSGDKron defaults (p=1 phase)": lambda ps: PSGDKron(ps),
        "curvlab.PSGDKron defaults + momentum 0.9": lambda ps: PSGDKron(ps, momentum=0.9),
        "curvlab.PSGDKron Q0.5EQ1.5": lambda ps: PSGDKron(ps, geometry="Q0.5EQ1.5"),
        "curvlab.PSGDKron two-sided (max_skew=64)": lambda ps: PSGDKron(ps, max_skew=64.0),
        "curvlab.PSGDKron apply-only (p=1e-9)": lambda ps: PSGDKron(
            ps, preconditioner_update_probability=1e-9, init_scale=1.0
        ),
        "curvlab.PSGDLRA r=10 (p=1)": lambda ps: PSGDLRA(
            ps, rank=10, preconditioner_update_probability=1.0
        ),
        "curvlab.PSGDLRA r=10 apply-only (p=1e-9)": lambda ps: PSGDLRA(
            ps, rank=10, preconditioner_update_probability=1e-9, init_scale=1.0
        ),
    }
    try:
        import kron_torch

        cases["kron_torch.Kron (p=1, two-sided)"] = lambda ps: kron_torch.Kron(
            ps, lr=1e-3, preconditioner_update_probability=1.0
        )
        cases["kron_torch.Kron (p=1, one_diag)"] = lambda ps: kron_torch.Kron(
            ps, lr=1e-3, preconditioner_update_probability=1.0, memory_save_mode="one_diag"
        )
    except Exception as exc:  # a peer that does not import is skipped
        print(f"# kron_torch skipped: {exc!r}", file=sys.stderr)
    try:
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None
        heavyball.utils.compile_mode_recommended_to_none = None
        cases["heavyball.PSGDKron (p=1, two-sided, eager)"] = lambda ps: heavyball.PSGDKron(
            ps, lr=1e-3, preconditioner_update_probability=1.0
        )
        cases["heavyball.PSGDKron (p=1, one_diag, eager)"] = lambda ps: heavyball.PSGDKron(
            ps, lr=1e-3, preconditioner_update_probability=1.0, memory_save_mode="one_diag"
        )
        cases["heavyball.PSGDLRA r=10 (p=1, eager)"] = lambda ps: heavyball.PSGDLRA(
            ps, lr=1e-3, rank=10, preconditioner_update_probability=1.0
        )
    except Exception as exc:
        print(f"# heavyball skipped: {exc!r}", file=sys.stderr)
    return cases


class _OfficialStep:
    """Official KronWhiten / LRAWhiten (closure-driven) on its own copy of the model."""

    def __init__(self, official: Any, model: nn.Module, x: Any, y: Any, dq: str) -> None:
        self.model = model
        self.ps = list(model.parameters())
        loss_fn = nn.CrossEntropyLoss()
        self.closure = lambda: loss_fn(model(x), y)
        if dq == "LRA":
            self.opt = official.LRAWhiten(self.ps, rank_of_approximation=10,
                                          preconditioner_init_scale=1.0)  # fmt: skip
        else:
            self.opt = official.KronWhiten(self.ps, preconditioner_init_scale=1.0, dQ=dq)
        self.state: dict[Any, Any] = {}

    def step(self) -> None:
        self.opt.step(self.closure)

    def fwdbwd(self) -> None:
        torch.autograd.grad(self.closure(), self.ps)

    def state_bytes(self) -> int:
        if hasattr(self.opt, "_UVd"):
            tensors = list(self.opt._UVd)
        else:
            tensors = [q for ql in self.opt._QLs_exprs for q in ql[0][0]]
        return sum(t.numel() * t.element_size() for t in tensors)


def time_size(name: str, rounds: int, official: Any) -> list[tuple[str, float, float, float]]:
    torch.manual_seed(0)
    widths = SIZES[name]
    base = mlp(widths)
    n_params = sum(p.numel() for p in base.parameters())
    x = torch.randn(64, widths[0])
    y = torch.randint(0, widths[-1], (64,))
    loss_fn = nn.CrossEntropyLoss()
    grads = torch.autograd.grad(loss_fn(base(x), y), list(base.parameters()))
    cases = make_cases(official)
    setups: dict[str, tuple[list[nn.Parameter], Any]] = {}
    for label, make in cases.items():
        ps = [nn.Parameter(p.detach().clone()) for p in base.parameters()]
        opt = make(ps)
        setups[label] = (ps, opt)
    officials = []
    if official is not None:
        for dq in ("Q0.5EQ1.5", "EQ", "LRA"):
            model = mlp(widths)
            model.load_state_dict(base.state_dict())
            off = _OfficialStep(official, model, x, y, dq)
            officials.append(off)
            kind = "LRAWhiten r=10" if dq == "LRA" else f"KronWhiten dQ={dq}"
            setups[f"official psgd.{kind} (closure - fwd/bwd)"] = (off.ps, off)

    times: dict[str, list[float]] = {k: [] for k in setups}
    fb_times: list[float] = []
    for r in range(rounds + 2):  # 2 warm-up rounds
        for label, (ps, opt) in setups.items():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[label].append(dt)
        if officials:
            t0 = time.perf_counter()
            officials[0].fwdbwd()
            if r >= 2:
                fb_times.append(time.perf_counter() - t0)
    fb = statistics.median(fb_times) if fb_times else 0.0
    ref = statistics.median(times["torch.AdamW foreach [REF]"])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        if label.startswith("official"):
            med -= fb
        opt = setups[label][1]
        if isinstance(opt, torch.optim.Optimizer):
            bpp = state_bytes(opt) / n_params
        else:
            bpp = opt.state_bytes() / n_params
        rows.append((label, med * 1e3, med / ref, bpp))
    print(f"\n### {name} MLP {widths}, {n_params:,} params; AdamW-foreach step {ref * 1e3:.3f} ms")
    print("| optimizer | step ms (median) | x AdamW-foreach | state B/param |")
    print("|---|---:|---:|---:|")
    for label, ms, ratio, bpp in rows:
        print(f"| {label} | {ms:.3f} | {ratio:.1f} | {bpp:.2f} |")
    by = {label: ms for label, ms, _, _ in rows}
    # same factor layout: the official default (max_skew=1) is one-sided for non-square matrices
    # and two-sided for square ones; kron-torch/heavyball "one_diag" make one side of a square
    # matrix diagonal too, so they match curvlab's default only when no weight is square (1M).
    for mine, layout in (
        ("curvlab.PSGDKron defaults (p=1 phase)", ("KronWhiten dQ=EQ",)),
        ("curvlab.PSGDKron defaults (p=1 phase)", ("one_diag", "KronWhiten")),
        ("curvlab.PSGDKron Q0.5EQ1.5", ("KronWhiten dQ=Q0.5EQ1.5",)),
        ("curvlab.PSGDKron two-sided (max_skew=64)", ("two-sided",)),
        ("curvlab.PSGDLRA r=10 (p=1)", ("LRA",)),
    ):
        peers = {k: v for k, v in by.items() if not k.startswith("curvlab") and "REF" not in k}
        peers = {k: v for k, v in peers.items() if any(t in k for t in layout)}
        if "LRA" not in layout:
            peers = {k: v for k, v in peers.items() if "LRA" not in k}
        if peers and mine in by:
            best = min(peers, key=peers.__getitem__)
            print(f"{mine} / best of {sorted(peers)}: {by[mine] / peers[best]:.2f}x ({best})")
    return rows


def trajectory_check(official: Any, steps: int = 10) -> None:
    """PSGDKron vs the official functions, float64, identical probe streams."""
    torch.manual_seed(1)
    model = mlp((8, 16, 12, 3), torch.float64)
    ref = mlp((8, 16, 12, 3), torch.float64)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(32, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    for geometry, update in (
        ("EQ", official.update_precond_kron_whiten_eq),
        ("Q0.5EQ1.5", official.update_precond_kron_whiten_q0p5eq1p5),
    ):
        m1 = mlp((8, 16, 12, 3), torch.float64)
        m1.load_state_dict(model.state_dict())
        m2 = mlp((8, 16, 12, 3), torch.float64)
        m2.load_state_dict(model.state_dict())
        p1, p2 = list(m1.parameters()), list(m2.parameters())
        opt = PSGDKron(p1, lr=0.01, preconditioner_update_probability=1.0, geometry=geometry)
        qls = None
        for t in range(steps):
            opt.zero_grad()
            loss_fn(m1(x), y).backward()
            opt.step()
            grads = [g.squeeze() for g in torch.autograd.grad(loss_fn(m2(x), y), p2)]
            with torch.no_grad():
                if qls is None:
                    s = max(torch.mean(g.abs() ** 4) for g in grads)
                    s = (s + 1e-9**4) ** (-1 / 8)
                    qls = [official.init_kron(g, s, float("inf"), 1.0, geometry) for g in grads]
                for j, (ql, g) in enumerate(zip(qls, grads)):
                    torch.manual_seed(probe_seed(0, t, j))
                    update(*ql, g, lr=0.1, betaL=0.9, damping=1e-9)
                for p, ql, g in zip(p2, qls, grads):
                    u = official.precond_grad_kron(*ql, g)
                    a = torch.sqrt(torch.mean(u * u))
                    if a > 2.0:
                        u *= 2.0 / a
                    u.clamp_(-10.0, 10.0)
                    p.sub_(u.view_as(p), alpha=0.01)
        err_p = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(p1, p2))
        err_q = max(
            ((a - b).abs().max() / b.abs().max()).item()
            for p, ql in zip(p1, qls)
            for i, b in enumerate(ql[0][0])
            for a in [opt.state[p][f"Q_{i}"]]
        )
        print(
            f"trajectory vs official psgd.py ({geometry}, float64, {steps} steps, same probes): "
            f"max rel diff params {err_p:.2e}, factors {err_q:.2e}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", nargs="+", default=["100k", "1M"], choices=list(SIZES))
    parser.add_argument("--official", default=None, help="path to the authors' psgd.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    official = None
    if args.official:
        spec = importlib.util.spec_from_file_location("psgd_official", args.official)
        assert spec is not None and spec.loader is not None
        official = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(official)
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, CPU; shared machine (medians)"
    )
    if official is not None:
        trajectory_check(official)
    for size in args.sizes:
        time_size(size, args.rounds, official)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
