"""Cost of each training-dynamics monitor per check: HVPs, gradient evaluations and seconds.

Two problems: (A) the edge-of-stability MLP (digits, 200 examples, 64-32-32-10 tanh, 3,466
parameters, full-batch GD η = 0.45); (B) the tiny-subspace MLP (Fashion-MNIST, 1,000 examples,
784-50-50-10 ReLU, 42,310 parameters, SGD lr 0.1 batch 128; skipped without the Debian package).
Each monitor is attached alone for ``--steps`` steps with a check every ``--every`` steps; we report
the median over checks (and the first check separately for the warm-started eigen-solvers).
Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/monitor_cost.py [--steps 400 --every 20]
Timings are medians on whatever machine runs this; on a shared machine treat them as upper bounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvlab.datasets import digits, fashion_mnist, fashion_mnist_available
from curvlab.monitors import (
    CurvatureLR,
    GradientNoiseScale,
    HistorySink,
    NeuralCollapse,
    Sharpness,
    SubspaceOverlap,
    attach,
)
from curvlab.phenomena._common import seeded_mlp
from curvlab.phenomena.eos import half_square_loss


def _fmnist_problem() -> tuple[nn.Module, Any, Any, Any, Callable[[], torch.optim.Optimizer]]:
    images, y = fashion_mnist("train", 1000)
    x = images.reshape(-1, 784)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                b = 1 / layer.in_features**0.5
                layer.weight.uniform_(-b, b, generator=gen)
                layer.bias.uniform_(-b, b, generator=gen)
    return model, x, y, nn.CrossEntropyLoss(), lambda: torch.optim.SGD(model.parameters(), lr=0.1)


def _measure(
    make: Callable[[], tuple[nn.Module, Any, Any, Any, Callable[[], torch.optim.Optimizer]]],
    monitor_fn: Callable[[nn.Module, Any, Any, Any], Any],
    steps: int,
    batch: int | None,
) -> dict[str, Any]:
    model, x, y, loss_fn, make_opt = make()
    opt = make_opt()
    mon = monitor_fn(model, x, y, loss_fn)
    handle = attach(opt, mon, HistorySink())
    gen = torch.Generator().manual_seed(1)
    step_times = []
    check_times = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen) if batch else slice(None)
        before = handle.seconds[mon.name]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        total = time.perf_counter() - t0
        spent = handle.seconds[mon.name] - before
        if spent > 0:
            check_times.append(spent)
        step_times.append(total - spent)
    handle.remove()
    hist = handle.sink
    hvps = hist.values(f"{mon.name}/matvecs")
    extra = hist.values(f"{mon.name}/preconditioned_matvecs")
    trace_mv = hist.values(f"{mon.name}/trace_matvecs")
    return {
        "checks": len(check_times),
        "first_hvps": hvps[0] if hvps else 0,
        "median_hvps_after_first": statistics.median(hvps[1:]) if len(hvps) > 1 else None,
        "median_precond_hvps_after_first": statistics.median(extra[1:]) if len(extra) > 1 else None,
        "trace_hvps": trace_mv[0] if trace_mv else None,
        "first_check_s": check_times[0] if check_times else None,
        "median_check_s": statistics.median(check_times[1:]) if len(check_times) > 1 else None,
        "median_step_s": statistics.median(step_times),
        "failures": len(handle.failures),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    e = args.every

    def eos_problem() -> Any:
        x, labels = digits(200, standardize=True)
        y = nn.functional.one_hot(labels, 10).float()
        model = seeded_mlp((64, 32, 32, 10), nn.Tanh, 0)
        return model, x, y, half_square_loss, lambda: torch.optim.SGD(model.parameters(), lr=0.45)

    def eos_adam() -> Any:
        model, x, y, loss_fn, _ = eos_problem()
        return model, x, y, loss_fn, lambda: torch.optim.Adam(model.parameters(), lr=1e-3)

    def nc(model: nn.Module, x: Any, y: Any, _l: Any) -> NeuralCollapse:
        labels = y.argmax(1) if y.ndim == 2 else y
        return NeuralCollapse(lambda v: model[:-1](v), model[-1], (x, labels), model=model, every=e)

    monitors: dict[str, Callable[[nn.Module, Any, Any, Any], Any]] = {
        "Sharpness (warm start)": lambda m, x, y, l: Sharpness(m, l, (x, y), every=e),
        "Sharpness (cold start)": lambda m, x, y, l: Sharpness(
            m, l, (x, y), every=e, warm_start=False
        ),
        "Sharpness + trace (30 HVPs)": lambda m, x, y, l: Sharpness(
            m, l, (x, y), every=e, trace=True
        ),
        "SubspaceOverlap (k=10)": lambda m, x, y, l: SubspaceOverlap(m, l, (x, y), k=10, every=e),
        "CurvatureLR": lambda m, x, y, l: CurvatureLR(m, l, (x, y), every=e),
        "GradientNoiseScale (8x16)": lambda m, x, y, l: GradientNoiseScale(
            m, l, (x, y), batch_size=16, num_batches=8, every=e
        ),
        "NeuralCollapse": nc,
    }
    problems: list[tuple[str, Any, int | None, dict[str, Any]]] = [
        ("A: digits MLP, full-batch GD", eos_problem, None, monitors),
        (
            "A': digits MLP, Adam (preconditioned sharpness)",
            eos_adam,
            None,
            {"Sharpness (Adam, P⁻¹H)": lambda m, x, y, l: Sharpness(m, l, (x, y), every=e)},
        ),
    ]
    if fashion_mnist_available():
        problems.append(
            (
                "B: Fashion-MNIST MLP, SGD bs 128",
                _fmnist_problem,
                128,
                {k: v for k, v in monitors.items() if k != "Sharpness + trace (30 HVPs)"},
            )
        )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(f"load average at start: {os.getloadavg()}; steps {args.steps}, check every {e}")
    for title, make, batch, mons in problems:
        print(f"\n## {title}")
        print(
            f"{'monitor':32s} {'HVPs 1st':>8s} {'HVPs later':>10s} {'s/check 1st':>11s} "
            f"{'s/check':>9s} {'s/step':>9s} {'overhead':>8s}"
        )
        for name, fn in mons.items():
            r = _measure(make, fn, args.steps, batch)
            later = r["median_hvps_after_first"]
            if r["median_precond_hvps_after_first"] is not None:
                later = f"{later:g}+{r['median_precond_hvps_after_first']:g}P"
            elif r["trace_hvps"] is not None and later is not None:
                later = f"{later:g}+{r['trace_hvps']:g}tr"
            overhead = (r["median_check_s"] or 0) / e / r["median_step_s"]
            print(
                f"{name:32s} {r['first_hvps']!s:>8s} {later!s:>10s} "
                f"{r['first_check_s'] or 0:11.4f} {r['median_check_s'] or 0:9.4f} "
                f"{r['median_step_s']:9.5f} {overhead:7.1%}"
            )
    print(f"\nload average at end: {os.getloadavg()}")
    print("overhead = (median s/check / every) / median s/step: the slowdown of training.")


if __name__ == "__main__":
    main()
