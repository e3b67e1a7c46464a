"""Time ``optimizer.step()`` side by side with torch.optim.AdamW(foreach=True); check trajectories.

Reads top to bottom:

1. Three MLPs (~100k, ~1M and ~10M float32 parameters), CPU, one thread; gradients from one backward on a
   random batch, then kept fixed (only ``step()`` is timed).
2. Every optimizer of ``curvlab.optim.OPTIMIZERS`` (so new registry entries appear by themselves),
   a few variants, and the peer packages that import (``pip install --no-deps``); a peer that does
   not import is reported as such. Optimizers with ``closure_mode == "loss"`` are timed on
   ``step(closure)`` minus the median plain forward+backward of the same run; the "update" rows
   of Sophia and AdaHessian time their update alone (``step()`` from ``p.grad`` with a held
   curvature estimate), the rows the ``fused=True`` kernels change. Extra rows: M-FAC windows
   (:data:`MFAC_GRADS`, those over :data:`MFAC_WINDOW_BUDGET` skipped), PSGDKron refitting at
   every step (probability 1, its schedule's first 500 steps) and at the schedule's floor 0.01.
3. Interleaved round-robin timing (one step of each optimizer per round, order shuffled each
   round), thread CPU time, medians; ratio to AdamW foreach and to AdamW fused (torch's one-pass
   kernel, the anchor of curvlab's ``fused=True`` paths, which makes no non-finite check: the
   ``ignore`` rows drop curvlab's, a pass over the gradients) of the same run; state bytes per
   parameter (distinct tensors in ``optimizer.state`` and in param groups).
4. Trajectories on identical inputs, float64: curvlab ADOPT vs the official ADOPT (torch-adopt =
   iShohei220/adopt) and pytorch_optimizer's ADOPT; curvlab DoG/LDoG vs the official dog-optimizer.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_step_time.py [--rounds 30] [--json F]

Never asserted in tests; the machine may be shared, so compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvlab.optim import OPTIMIZERS, create

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
#: CPU time of this thread: on a shared, oversubscribed machine wall-clock time mostly measures
#: how long the process waited for a core; thread CPU time does not (memory contention remains)
CLOCK = time.thread_time

SIZES = {
    "100k": (128, 256, 256, 10),
    "1M": (512, 1024, 512, 10),
    "10M": (2048, 2560, 2048, 10),
}
#: the anchor of the fused paths: torch's own one-pass AdamW kernel
FUSED_REF = "torch.AdamW fused"
DISTRIBUTIONS = {"adopt": "torch-adopt", "dog": "dog-optimizer", "sophia_opt": "sophia-opt"}
#: M-FAC window lengths timed as extra rows (its cost grows with m: time O(m d + m³), memory 4 m d B)
MFAC_GRADS = (8, 16, 32, 64, 128, 1024)
#: M-FAC rows whose window would exceed this many bytes are reported as skipped, not run
MFAC_WINDOW_BUDGET = 6 << 30
REGISTRY_KWARGS: dict[str, dict[str, Any]] = {  # timing only; values do not matter much
    "sgd": {"lr": 1e-3, "momentum": 0.9, "foreach": True},
    "adam": {"lr": 1e-4, "foreach": True},
    "adamw": {"lr": 1e-4, "foreach": True},
}


def mlp(widths: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # benchmark script: a fixed global seed is fine here
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(widths: tuple[int, ...], n: int = 64, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, widths[0], generator=g, dtype=dtype)
    y = torch.randint(0, widths[-1], (n,), generator=g)
    return X, y


def peer(module: str, attr: str, **kwargs: Any) -> tuple[Factory | None, str]:
    """A factory for a peer optimizer, or None and the reason it is unavailable."""
    try:
        mod = importlib.import_module(module)
        if module == "heavyball":
            mod.utils.compile_mode = None  # eager: no torch.compile on this CPU box
        cls = getattr(mod, attr)
    except Exception as exc:  # report, do not crash: peers are optional
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    dist = DISTRIBUTIONS.get(module, module)
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sys.modules[module], "__version__", "?")
    return (lambda ps: cls(ps, **kwargs)), f"{dist} {version}"


def candidates() -> tuple[dict[str, Factory], dict[str, str]]:
    """Name -> factory for everything to time; plus peers that failed to import."""
    opts: dict[str, Factory] = {
        "torch.AdamW foreach [REF]": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch.AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    for name in OPTIMIZERS:
        kw = REGISTRY_KWARGS.get(name, {})
        opts[f"curvlab {name}"] = lambda ps, name=name, kw=kw: create(name, ps, **kw)
    opts["curvlab adopt (single-tensor)"] = lambda ps: create("adopt", ps, foreach=False)
    # compiled kernels (curvlab.optim._fused): the first step compiles (~10-30 s, untimed warm-up)
    opts["curvlab adopt (fused=True)"] = lambda ps: create("adopt", ps, fused=True)
    opts["curvlab dog (fused=True)"] = lambda ps: create("dog", ps, fused=True)
    opts["curvlab frugal (fused=True)"] = lambda ps: create("frugal", ps, fused=True)
    # the update alone, from p.grad and a held curvature estimate; on_nonfinite="ignore" drops
    # the non-finite check (one norm pass over the gradients) that torch's AdamW does not make
    for fused, policy in ((None, "raise"), (True, "raise"), (True, "ignore")):
        tag = ("fused=True" if fused else "foreach") + ("" if policy == "raise" else f", {policy}")
        for name, make in (("sophia", sophia_update), ("adahessian", adahessian_update)):
            opts[f"curvlab {name} update ({tag})"] = functools.partial(make, fused, policy)
    for name in ("adopt", "frugal"):  # the fused kernels alone, without the check's pass
        opts[f"curvlab {name} (fused=True, ignore)"] = lambda ps, n=name: create(
            n, ps, fused=True, on_nonfinite="ignore"
        )
    for m in MFAC_GRADS:
        opts[f"curvlab mfac (num_grads={m})"] = functools.partial(mfac_rows, m)
    # PSGD Kron: every step refits (the schedule's first 500 steps) vs the schedule's floor
    for prob in (1.0, 0.01):
        opts[f"curvlab psgd_kron (update probability {prob})"] = lambda ps, prob=prob: create(
            "psgd_kron", ps, preconditioner_update_probability=prob
        )
    for name in ("adopt", "dog", "ldog"):
        if name in OPTIMIZERS:
            opts[f"curvlab {name} (on_nonfinite=ignore)"] = lambda ps, n=name: create(
                n, ps, on_nonfinite="ignore"
            )
    failed: dict[str, str] = {}
    peers = {
        "official ADOPT (torch-adopt)": ("adopt", "ADOPT", {"lr": 1e-4}),
        "pytorch_optimizer ADOPT": ("pytorch_optimizer", "ADOPT", {"lr": 1e-4}),
        "heavyball ADOPT (eager)": ("heavyball", "ADOPT", {"lr": 1e-4}),
        "official DoG (dog-optimizer)": ("dog", "DoG", {}),
        "official LDoG (dog-optimizer)": ("dog", "LDoG", {}),
        "sophia_opt SophiaG (step only)": ("sophia_opt", "SophiaG", {"lr": 1e-4}),
    }
    for label, (module, attr, kw) in peers.items():
        fac, info = peer(module, attr, **kw)
        if fac is None:
            failed[label] = info
        else:
            opts[f"{label} {info}"] = fac
    return opts, failed


def mfac_rows(m: int, ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    """M-FAC with window ``m``; a window over :data:`MFAC_WINDOW_BUDGET` is skipped (an error row)."""
    need = 4 * m * sum(p.numel() for p in ps)
    if need > MFAC_WINDOW_BUDGET:
        raise MemoryError(f"skipped: the window would take {need / 2**30:.1f} GiB")
    return create("mfac", ps, num_grads=m)


class UpdateOnly:
    """``step()`` of a curvature optimizer without a closure: its update alone, from ``p.grad``."""

    closure_mode = "backward"

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.state, self.param_groups = opt, opt.state, opt.param_groups

    def step(self) -> None:
        self.opt.step()


def sophia_update(fused: bool | None, policy: str, ps: list[nn.Parameter]) -> Any:
    """Sophia stepping from ``p.grad`` (manual loop) with the curvature ``g ⊙ g`` held fixed."""
    opt = create("sophia", ps, update_period=None, fused=fused, on_nonfinite=policy, seed=0)
    opt.update_curvature(diagonal=[p.grad.square() for p in ps])
    return UpdateOnly(opt)


def adahessian_update(fused: bool | None, policy: str, ps: list[nn.Parameter]) -> Any:
    """AdaHessian stepping from ``p.grad``: one fed estimate (of ``Σ p²``), then no refresh."""
    opt = create("adahessian", ps, update_period=10**9, fused=fused, on_nonfinite=policy, seed=0)
    opt.expect_external_curvature("benchmark")
    with torch.enable_grad():
        opt.estimate_curvature(sum((p * p).sum() for p in ps))
    return UpdateOnly(opt)


def state_bytes_per_param(opt: torch.optim.Optimizer, n_params: int) -> float:
    """Distinct tensors in ``opt.state`` (nested too) and in param groups (peers keep x0 there)."""
    seen: set[int] = set()
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for st in opt.state.values():
        visit(st)
    for group in opt.param_groups:
        visit({k: v for k, v in group.items() if k != "params"})
    return total / n_params


def time_size(
    widths: tuple[int, ...], rounds: int, opts: dict[str, Factory]
) -> list[dict[str, Any]]:
    X, y = batch(widths)
    runs: dict[str, dict[str, Any]] = {}
    for label, factory in opts.items():
        model = mlp(widths)
        params = list(model.parameters())
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = factory(params)
        except Exception as exc:
            runs[label] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
            continue
        mode = getattr(type(opt), "closure_mode", "backward")

        def closure(model: nn.Module = model) -> tuple[torch.Tensor, torch.Tensor]:
            # (loss, logits): SophiaG samples its labels from the logits (the closure contract)
            logits = model(X)
            return nn.functional.cross_entropy(logits, y), logits

        grads = [p.grad for p in params]

        def do_step(opt=opt, mode=mode, closure=closure, params=params, grads=grads) -> None:
            for p, g in zip(params, grads):  # some peers (heavyball) set p.grad = None after step
                if p.grad is None:
                    p.grad = g
            if mode == "loss":
                opt.step(closure)
            else:
                opt.step()

        try:
            for _ in range(3):
                do_step()
        except Exception as exc:
            runs[label] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
            continue
        n = sum(p.numel() for p in params)
        runs[label] = {
            "step": do_step,
            "times": [],
            "closure": mode == "loss",
            "bytes": state_bytes_per_param(opt, n),
            "n": n,
        }
    # plain forward+backward, for the closure-driven optimizers
    fb_model = mlp(widths)

    def fwd_bwd() -> None:
        fb_model.zero_grad()
        nn.functional.cross_entropy(fb_model(X), y).backward()

    fb_times: list[float] = []
    live = [(k, v) for k, v in runs.items() if "step" in v]
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(live)  # no optimizer always runs right after the same neighbour
        t = CLOCK()
        fwd_bwd()
        fb_times.append(CLOCK() - t)
        for _, r in live:
            t = CLOCK()
            r["step"]()
            r["times"].append(CLOCK() - t)
    fb = statistics.median(fb_times)
    ref = statistics.median(runs["torch.AdamW foreach [REF]"]["times"])
    fused_ref = (
        statistics.median(runs[FUSED_REF]["times"]) if "times" in runs.get(FUSED_REF, {}) else None
    )
    rows = []
    for label, r in runs.items():
        if "error" in r:
            rows.append({"optimizer": label, "error": r["error"]})
            continue
        med = statistics.median(r["times"])
        eff = med - fb if r["closure"] else med
        rows.append(
            {
                "optimizer": label,
                "step_ms": med * 1e3,
                "x_adamw": eff / ref,
                "x_fused": eff / fused_ref if fused_ref else float("nan"),
                "bytes_per_param": r["bytes"],
                "note": "closure: step incl. fwd+bwd; ratio uses step - fwd+bwd"
                if r["closure"]
                else "",
                "params": r["n"],
            }
        )
    rows.append({"optimizer": "plain forward+backward", "step_ms": fb * 1e3, "x_adamw": fb / ref})
    return rows


# ----------------------------------------------------------------------------- trajectories
def trajectory_diffs(steps: int = 50) -> list[dict[str, Any]]:
    """Max |Δθ| over ``steps`` float64 steps on identical inputs (ours vs a peer)."""
    widths = (8, 16, 4)
    X, y = batch(widths, n=32, dtype=torch.float64, seed=3)
    pairs: list[tuple[str, Factory, str, str, dict[str, Any], dict[str, Any]]] = [
        ("ADOPT", lambda ps: create("adopt", ps, lr=1e-2), "adopt", "ADOPT", {"lr": 1e-2}, {}),
        (
            "ADOPT decoupled wd",
            lambda ps: create("adopt", ps, lr=1e-2, weight_decay=0.1, decouple=True),
            "adopt",
            "ADOPT",
            {"lr": 1e-2, "weight_decay": 0.1, "decouple": True},
            {},
        ),
        (
            "ADOPT",
            lambda ps: create("adopt", ps, lr=1e-2),
            "pytorch_optimizer",
            "ADOPT",
            {"lr": 1e-2},
            {},
        ),
        ("DoG", lambda ps: create("dog", ps), "dog", "DoG", {}, {}),
        ("LDoG", lambda ps: create("ldog", ps), "dog", "LDoG", {}, {}),
        (
            "DoG wd + init_eta",
            lambda ps: create("dog", ps, weight_decay=1e-2, init_eta=1e-3),
            "dog",
            "DoG",
            {"weight_decay": 1e-2, "init_eta": 1e-3},
            {},
        ),
    ]
    out = []
    for what, ours_f, module, attr, kw, _ in pairs:
        fac, info = peer(module, attr, **kw)
        if fac is None:
            out.append({"what": what, "peer": module, "error": info})
            continue
        models = [mlp(widths, torch.float64, seed=5) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = [ours_f(list(models[0].parameters())), fac(list(models[1].parameters()))]
        worst = 0.0
        for _ in range(steps):
            for m, o in zip(models, opts):
                o.zero_grad()
                nn.functional.cross_entropy(m(X), y).backward()
                o.step()
            worst = max(
                worst,
                max(
                    (a - b).abs().max().item()
                    for a, b in zip(models[0].parameters(), models[1].parameters())
                ),
            )
        moved = max(
            (a - b).abs().max().item()
            for a, b in zip(models[0].parameters(), mlp(widths, torch.float64, seed=5).parameters())
        )
        out.append(
            {"what": what, "peer": f"{module} {info}", "max_abs_diff": worst, "max_move": moved}
        )
    return out


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per size")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--traj-steps", type=int, default=50, help="steps of the trajectory check")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument(
        "--only", nargs="*", help="time only optimizers whose label contains one of these"
    )
    ap.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    print("environment:", json.dumps(env))
    print("note: shared machine; medians of interleaved rounds; compare ratios within a run only")
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    print("clock:", "wall (perf_counter)" if args.wall else "thread CPU time (time.thread_time)")
    opts, failed = candidates()
    if args.only:
        keep = [k for k in opts if "[REF]" in k or k == FUSED_REF or any(w in k for w in args.only)]
        opts = {k: opts[k] for k in keep}
    for label, why in failed.items():
        print(f"peer unavailable: {label}: {why}")
    results: dict[str, Any] = {"environment": env, "unavailable": failed, "sizes": {}}
    for size in args.sizes:
        rows = time_size(
            SIZES[size], args.rounds if size == "100k" else max(8, args.rounds // 2), opts
        )
        results["sizes"][size] = rows
        n = next(r["params"] for r in rows if "params" in r)
        print(f"\n### {size} MLP {SIZES[size]} ({n:,} params)")
        print("| optimizer | step ms | x AdamW-foreach | x AdamW-fused | state B/param | note |")
        print("|---|---:|---:|---:|---:|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['optimizer']} | error | | | | {r['error']} |")
                continue
            b = f"{r['bytes_per_param']:.1f}" if "bytes_per_param" in r else ""
            cells = [
                r["optimizer"],
                f"{r['step_ms']:.3f}",
                f"{r['x_adamw']:.2f}",
                f"{r.get('x_fused', float('nan')):.2f}",
                b,
                r.get("note", ""),
            ]
            print("| " + " | ".join(cells) + " |")
    traj = trajectory_diffs(args.traj_steps)
    results["trajectories"] = traj
    print(f"\n### trajectories, float64, {args.traj_steps} steps, MLP (8-16-4), identical inputs")
    print("| curvlab | peer | max abs param diff | max param movement |")
    print("|---|---|---:|---:|")
    for t in traj:
        if "error" in t:
            print(f"| {t['what']} | {t['peer']} | unavailable: {t['error']} | |")
        else:
            print(f"| {t['what']} | {t['peer']} | {t['max_abs_diff']:.3e} | {t['max_move']:.3e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
