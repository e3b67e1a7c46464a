"""Step time of curvlab's Sophia and AdaHessian against torch AdamW(foreach) and the peers (CPU).

Reads top to bottom:

1. Two MLPs (~100k and ~1M float32 parameters), a random batch of 64, cross-entropy, one thread.
2. Every case runs full training iterations (gradient + curvature when due + update), one per
   round, rounds interleaved round-robin in a shuffled order (so no case runs on a cache warmed by
   its own previous iteration), thread CPU time (the machine is shared; wall time would mostly
   measure waiting for a core), medians over ``--rounds`` × 10 iterations.
   A case's *step* cost is its median iteration minus the median plain forward+backward of the
   same run — for AdamW that is ``step()`` itself; for the closure optimizers it also contains
   whatever their gradient path costs beyond a plain backward (for the peers' AdaHessian/SophiaH
   that is ``backward(create_graph=True)``, which their API needs on every step). Periodic cases
   report the normal step, the refresh step and the amortised mean over a period of 10.
3. State bytes per parameter (tensors of ``optimizer.state`` with at least one dim).
4. Trajectories on identical inputs, float64, where a peer is faithful to the authors:
   curvlab Sophia (manual loop, ``update_curvature(bs=B)``) vs sophia-opt (byte-identical to the
   official ``sophia.py``) with the official training-loop cadence and the same sampled labels;
   curvlab AdaHessian vs torch_optimizer's Adahessian (the official image-classification rule)
   on a small conv net, both fed the same Rademacher probes.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_curvature_step_time.py [--rounds 20]

Peers (``pip install --no-deps``): sophia-opt, pytorch_optimizer, torch-optimizer (+ its import
pytorch-ranger); a peer that does not import is reported and skipped. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import itertools
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.estimators.param_diagonal import hutchinson_diagonal
from curvlab.optim.adahessian import AdaHessian
from curvlab.optim.sophia import Sophia

CLOCK = time.thread_time
SIZES = {"100k": (128, 256, 256, 10), "1M": (512, 1024, 512, 10)}
PERIOD = 10


def mlp(widths: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # benchmark script: a fixed global seed is fine here
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(widths: tuple[int, ...], n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, widths[0], generator=g), torch.randint(0, widths[-1], (n,), generator=g)


def peer(module: str, attr: str) -> tuple[Any, str]:
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as exc:  # peers are optional: report, do not crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"


# --------------------------------------------------------------------------- one case = one loop
class Case:
    """A training loop of one optimizer; ``run_once()`` times one iteration."""

    periodic = False

    def __init__(self, name: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor):
        self.name, self.model, self.X, self.y = name, model, X, y
        self.times: dict[str, list[float]] = {"normal": [], "refresh": []}
        self.opt: torch.optim.Optimizer | None = None
        self.it = 0

    def iteration(self) -> None:
        raise NotImplementedError

    def is_refresh(self) -> bool:
        return False

    def run_once(self) -> None:
        kind = "refresh" if self.periodic and self.is_refresh() else "normal"
        t0 = CLOCK()
        self.iteration()
        self.times[kind].append(CLOCK() - t0)
        self.it += 1


class Plain(Case):
    def iteration(self) -> None:
        self.model.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.X), self.y).backward()


class Backward(Case):
    """torch-standard optimizers: zero_grad, forward, backward, step()."""

    def __init__(self, name, model, X, y, factory, create_graph=False, period=None, step_kw=None):
        super().__init__(name, model, X, y)
        self.opt = factory(list(model.parameters()))
        self.create_graph, self.step_kw = create_graph, step_kw or {}
        self.periodic = period is not None
        self.period = period or 1

    def is_refresh(self) -> bool:  # pytorch_optimizer refreshes when (step - 1) % period == 0
        return self.it % self.period == 0

    def iteration(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.X), self.y).backward(create_graph=self.create_graph)
        self.opt.step(**self.step_kw)
        if self.create_graph:  # break the param↔grad cycle, as the peers' docs ask
            self.opt.zero_grad(set_to_none=True)


class OfficialSophiaG(Backward):
    """sophia-opt (official sophia.py): step(bs) every iteration; after iterations k, 2k, …
    a GNB pass on labels sampled from the logits and update_hessian() (train_sophiag.py)."""

    periodic = True

    def __init__(self, name, model, X, y, cls):
        super().__init__(name, model, X, y, lambda ps: cls(ps, lr=1e-4), step_kw={"bs": len(X)})
        self.periodic = True
        self.gen = torch.Generator().manual_seed(0)

    def is_refresh(self) -> bool:
        return self.it % PERIOD == PERIOD - 1

    def iteration(self) -> None:
        super().iteration()
        if self.is_refresh():
            logits = self.model(self.X)
            probs = torch.softmax(logits.detach(), -1)
            y_hat = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
            F.cross_entropy(logits, y_hat).backward()
            self.opt.update_hessian()
            self.opt.zero_grad(set_to_none=True)


class Closure(Case):
    """curvlab closure optimizers: step(closure) computes the gradient (and curvature) itself."""

    def __init__(self, name, model, X, y, opt, period=None):
        super().__init__(name, model, X, y)
        self.opt, self.periodic, self.period = opt, period is not None, period or 1

    def is_refresh(self) -> bool:
        return self.it % self.period == 0

    def iteration(self) -> None:
        def closure():
            logits = self.model(self.X)
            return F.cross_entropy(logits, self.y), logits

        self.opt.step(closure)


def state_bytes_per_param(opt: torch.optim.Optimizer, n: int) -> float:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total / n


# --------------------------------------------------------------------------- the timing run
def build_cases(widths: tuple[int, ...]) -> tuple[list[Case], list[str]]:
    X, y = batch(widths)
    fresh = lambda: mlp(widths)  # noqa: E731
    notes = []
    cases: list[Case] = [
        Plain("plain forward+backward", fresh(), X, y),
        Backward(
            "torch.AdamW foreach [REF]",
            fresh(),
            X,
            y,
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        ),
        Backward(
            "torch.AdamW fused",
            fresh(),
            X,
            y,
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        ),
    ]
    m = fresh()
    cases.append(
        Closure(
            "curvlab Sophia G (GNB, k=10)", m, X, y, Sophia(m.parameters(), lr=1e-4), period=PERIOD
        )
    )
    m = fresh()
    cases.append(
        Closure(
            "curvlab Sophia G, on_nonfinite='ignore'",
            m,
            X,
            y,
            Sophia(m.parameters(), lr=1e-4, on_nonfinite="ignore"),
            period=PERIOD,
        )
    )
    m = fresh()
    cases.append(
        Closure(
            "curvlab Sophia H (Hutchinson, k=10)",
            m,
            X,
            y,
            Sophia(m.parameters(), lr=1e-4, estimator="hutchinson"),
            period=PERIOD,
        )
    )
    m = fresh()
    cases.append(
        Closure("curvlab AdaHessian (HVP every step)", m, X, y, AdaHessian(m.parameters(), lr=1e-3))
    )
    m = fresh()
    cases.append(
        Closure(
            "curvlab AdaHessian (update_period=10)",
            m,
            X,
            y,
            AdaHessian(m.parameters(), lr=1e-3, update_period=PERIOD),
            period=PERIOD,
        )
    )
    cls, why = peer("sophia_opt", "SophiaG")
    if cls is None:
        notes.append(f"sophia_opt.SophiaG: {why}")
    else:
        cases.append(OfficialSophiaG("sophia_opt.SophiaG (official)", fresh(), X, y, cls))
    cls, why = peer("pytorch_optimizer", "SophiaH")
    if cls is None:
        notes.append(f"pytorch_optimizer.SophiaH: {why}")
    else:
        cases.append(
            Backward(
                "pytorch_optimizer.SophiaH (k=10)",
                fresh(),
                X,
                y,
                lambda ps, c=cls: c(ps, update_period=PERIOD),
                create_graph=True,
                period=PERIOD,
            )
        )
    for module, attr in (("pytorch_optimizer", "AdaHessian"), ("torch_optimizer", "Adahessian")):
        cls, why = peer(module, attr)
        if cls is None:
            notes.append(f"{module}.{attr}: {why}")
            continue
        cases.append(
            Backward(
                f"{module}.{attr}",
                fresh(),
                X,
                y,
                lambda ps, c=cls: c(ps, lr=1e-3),
                create_graph=True,
            )
        )
    return cases, notes


def time_size(label: str, widths: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    cases, notes = build_cases(widths)
    n = sum(p.numel() for p in cases[0].model.parameters())
    for c in cases:  # warm-up period, not timed
        for _ in range(PERIOD):
            c.run_once()
        c.times = {"normal": [], "refresh": []}
    order = list(cases)
    rng = random.Random(0)
    for _ in range(rounds * PERIOD):
        rng.shuffle(order)
        for c in order:
            c.run_once()
    med = lambda xs: statistics.median(xs) * 1e3 if xs else float("nan")  # noqa: E731
    plain = med(cases[0].times["normal"])
    rows = []
    ref = med(cases[1].times["normal"]) - plain
    for c in cases[1:]:
        normal = med(c.times["normal"]) - plain
        refresh = med(c.times["refresh"]) - plain if c.periodic else float("nan")
        amort = (normal * (PERIOD - 1) + refresh) / PERIOD if c.periodic else normal
        rows.append(
            {
                "size": label,
                "params": n,
                "name": c.name,
                "step_ms": normal,
                "x_ref": normal / ref,
                "refresh_ms": refresh,
                "amortised_ms": amort,
                "amortised_x_ref": amort / ref,
                "plain_ms": plain,
                "bytes_per_param": state_bytes_per_param(c.opt, n) if c.opt else 0.0,
            }
        )
    print(
        f"\n### {label} MLP {'-'.join(map(str, widths))} ({n:,} params); plain forward+backward "
        f"{plain:.3f} ms; AdamW-foreach step {ref:.3f} ms"
    )
    for note in notes:
        print(f"  peer unavailable: {note}")
    print(
        "| optimizer | step ms | x ref | refresh step ms | amortised ms (k=10) | amortised x ref "
        "| B/param |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rf = "" if r["refresh_ms"] != r["refresh_ms"] else f"{r['refresh_ms']:.3f}"
        print(
            f"| {r['name']} | {r['step_ms']:.3f} | {r['x_ref']:.2f} | {rf} | "
            f"{r['amortised_ms']:.3f} | {r['amortised_x_ref']:.2f} | {r['bytes_per_param']:.1f} |"
        )
    return rows


# --------------------------------------------------------------------------- trajectories
def sophia_trajectory(steps: int = 30) -> str:
    cls, why = peer("sophia_opt", "SophiaG")
    if cls is None:
        return f"sophia_opt unavailable ({why})"
    X, y = batch((6, 16, 4), n=32)
    X = X.double()
    models = [mlp((6, 16, 4), torch.float64, seed=3) for _ in range(2)]
    hp = {"lr": 2e-2, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1}
    official = cls(models[0].parameters(), **hp)
    ours = Sophia(models[1].parameters(), **hp, update_period=None)
    gens = [torch.Generator().manual_seed(9) for _ in range(2)]
    for it in range(steps):
        for m, opt, gen in zip(models, (official, ours), gens):
            opt.zero_grad()
            F.cross_entropy(m(X), y).backward()
            opt.step(bs=len(X)) if opt is official else opt.step()
            if it % PERIOD == PERIOD - 1:
                logits = m(X)
                y_hat = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)
                opt.zero_grad()
                F.cross_entropy(logits, y_hat.squeeze(1)).backward()
                official.update_hessian() if opt is official else ours.update_curvature(bs=len(X))
    dp = max((p - q).abs().max().item() for p, q in zip(*(m.parameters() for m in models)))
    dh = max(
        (ours.state[q]["hessian"] - len(X) * official.state[p]["hessian"]).abs().max().item()
        for p, q in zip(*(m.parameters() for m in models))
    )
    return (
        f"Sophia vs sophia_opt.SophiaG (official), float64, {steps} steps, GNB every 10: "
        f"max |Δθ| = {dp:.1e}; max |h_curvlab − B·h_official| = {dh:.1e}"
    )


def adahessian_trajectory(steps: int = 20) -> str:
    cls, why = peer("torch_optimizer", "Adahessian")
    if cls is None:
        return f"torch_optimizer unavailable ({why})"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double()
    models = [net, __import__("copy").deepcopy(net)]
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64), torch.arange(8) % 4

    def same_probes(params, grads, outputs, generator):
        """The peer's probe draw (global RNG, 2·randint − 1 per parameter), for identical inputs."""
        z = [2 * torch.randint_like(p, high=2) - 1 for p in params]
        return hutchinson_diagonal(params, grads, probes=z)

    same_probes.create_graph = True  # type: ignore[attr-defined]
    hp = {
        "lr": 0.05,
        "betas": (0.9, 0.999),
        "eps": 1e-4,
        "weight_decay": 1e-3,
        "hessian_power": 1.0,
    }
    peer_opt = cls(models[0].parameters(), **hp)
    ours = AdaHessian(models[1].parameters(), **hp, estimator=same_probes)
    for t in range(steps):
        torch.manual_seed(100 + t)
        peer_opt.zero_grad()
        F.cross_entropy(models[0](X), y).backward(create_graph=True)
        peer_opt.step()
        torch.manual_seed(100 + t)
        ours.step(lambda: F.cross_entropy(models[1](X), y))
    dp = max((p - q).abs().max().item() for p, q in zip(*(m.parameters() for m in models)))
    return (
        f"AdaHessian vs torch_optimizer.Adahessian (official rule), conv net, float64, "
        f"{steps} steps, same probes: max |Δθ| = {dp:.1e}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=20, help="timed periods (10 iterations of every case each)"
    )
    parser.add_argument("--sizes", default="100k,1M", help="comma-separated subset of 100k,1M")
    parser.add_argument("--skip-trajectory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    versions = []
    for dist in ("sophia-opt", "pytorch_optimizer", "torch-optimizer"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads "
        f"{torch.get_num_threads()}, clock: thread CPU time; peers: {', '.join(versions)}"
    )
    print(f"{args.rounds * PERIOD} interleaved rounds of one iteration per case; medians")
    for label in args.sizes.split(","):
        time_size(label, SIZES[label], args.rounds)
    if not args.skip_trajectory:
        print()
        print(sophia_trajectory())
        print(adahessian_trajectory())
    return 0


if __name__ == "__main__":
    sys.exit(main())
