"""curvlab on a GPU: HVP throughput against the matmul roofline, estimator and optimizer step times.

What it measures, at 10M and 100M parameters (an MLP ``d → h → h → 10``, batch 256, float32):

* **HVP throughput**: one Hessian-vector product of a built operator (cached graph) costs about
  twice a forward+backward, i.e. ``2 × 6·B·W`` FLOPs for ``W`` weights and batch ``B``. The
  roofline is that count divided by the device's measured dense matmul rate (``--matmul-n`` square
  matmuls, float32); ``roofline`` is the fraction of it the product reaches.
* **Estimators**: wall time of ``eigsh(k=1)`` and ``trace`` (Hutch++, 30 products), each with the
  operator's build, synchronised.
* **Optimizers**: one ``step()`` of every optimizer in ``curvlab.optim.registry`` with gradients
  in place, divided by ``torch.optim.AdamW(fused=True)``'s step (median of ``--reps``); an
  optimizer whose step needs a closure is timed with it (its forward and backward included, said
  in the row), and one that fails (e.g. out of memory at its defaults) is reported with the error.
* **No host synchronisation in a Lanczos iteration**: :func:`check_no_sync_in_lanczos` runs
  ``eigsh``'s iteration step (product, re-orthogonalisation, coefficients) under
  ``torch.cuda.set_sync_debug_mode("error")``; skipped without CUDA.
* **No host synchronisation in an optimizer step**: :func:`check_no_sync_in_steps` runs three
  steps (after one outside the check) of ADOPT, DoG, LDoG, FRUGAL, M-FAC, AdaHessian, SophiaH
  and SophiaG with ``on_nonfinite="ignore"`` (the one policy that reads nothing back) the same
  way; on CPU ``tests/optim/test_no_host_reads.py`` checks the same steps on ``meta``.

Run on a GPU machine (minutes):

    PYTHONPATH=src python benchmarks/gpu.py --device cuda

and, as the smoke test does, on CPU at a tiny size: ``--device cpu --sizes tiny --reps 2``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent.parent / "results"
SIZES = {"tiny": (32, 64), "10M": (1024, 2816), "100M": (4096, 8192)}
BATCH = {"cpu": 32, "cuda": 256}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall seconds of ``fn`` over ``reps`` synchronised calls, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    """The device's measured float32 dense matmul rate in TFLOP/s (``n × n`` by ``n × n``)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, reps) / 1e12


def make_problem(size: str, device: torch.device) -> tuple[nn.Module, tuple[Any, Any], int]:
    """The MLP of the named size on ``device``, one batch, and its number of weights ``W``."""
    d, h = SIZES[size]
    torch.manual_seed(0)  # benchmark script, not library code: the layers' initialisation
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    model = model.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    B = BATCH.get(device.type, 256)
    x = torch.randn(B, d, device=device, generator=g)
    y = torch.randint(0, 10, (B,), device=device, generator=g)
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    return model, (x, y), weights


def hvp_throughput(
    model: nn.Module, data: tuple[Any, Any], weights: int, tflops: float, reps: int
) -> dict[str, float]:
    """Seconds per HVP of a built Hessian operator and the fraction of the roofline it reaches."""
    from curvlab.operators import HessianOperator

    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(H.shape[0], device=H.device)
    with H.fixed():
        t = timed(lambda: H @ v, H.device, reps)
    flops = 2 * 6 * data[0].shape[0] * weights
    return {"hvp_s": t, "hvp_tflops": flops / t / 1e12, "roofline": flops / t / 1e12 / tflops}


def estimator_times(model: nn.Module, data: tuple[Any, Any], reps: int) -> dict[str, Any]:
    """Wall seconds of ``eigsh(k=1)`` and ``trace(m=30)`` (Hutch++), operator build included."""
    import curvlab as cl
    from curvlab.operators import HessianOperator

    loss = nn.CrossEntropyLoss()
    dev = data[0].device
    out: dict[str, Any] = {}

    def eig() -> None:
        g = torch.Generator(device=dev).manual_seed(0)
        out["eigsh_matvecs"] = cl.eigsh(HessianOperator(model, loss, data), generator=g).num_matvecs

    def tr() -> None:
        g = torch.Generator(device=dev).manual_seed(0)
        cl.trace(HessianOperator(model, loss, data), 30, generator=g)

    out["eigsh_s"] = timed(eig, dev, reps)
    out["trace30_s"] = timed(tr, dev, reps)
    return out


def optimizer_steps(model: nn.Module, data: tuple[Any, Any], reps: int) -> dict[str, Any]:
    """Each registered optimizer's step time divided by fused AdamW's (or the error it raised)."""
    from curvlab.optim.registry import available, create

    dev = data[0].device
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def closure() -> torch.Tensor:  # the contract of curvlab's curvature optimizers: no backward
        return loss_fn(model(data[0]), data[1])

    def closure_logits() -> tuple[torch.Tensor, torch.Tensor]:  # Sophia's GNB estimator
        logits = model(data[0])
        return loss_fn(logits, data[1]), logits

    def step_time(opt: torch.optim.Optimizer) -> tuple[float, str]:
        """Time the first form of ``step`` the optimizer accepts: grads, closure, (loss, logits)."""
        forms: list[tuple[Callable[[], Any], str]] = [
            (opt.step, "grads"),
            (lambda: opt.step(closure), "closure (fwd+bwd in)"),
            (lambda: opt.step(closure_logits), "closure -> (loss, logits) (fwd+bwd in)"),
        ]
        for fn, how in forms[:-1]:
            try:
                return timed(fn, dev, reps), how
            except Exception:  # the optimizer wants the next form
                continue
        fn, how = forms[-1]
        return timed(fn, dev, reps), how

    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ref = torch.optim.AdamW(params, lr=1e-6, fused=True)
    base = timed(ref.step, dev, reps)
    del ref
    rows: dict[str, Any] = {"adamw_fused_s": base}
    snapshot = [p.detach().clone() for p in params]
    for name in available():
        grads = [p.grad for p in params]
        try:
            opt = create(name, params, **STEP_OPTIONS.get(name, {}))
            t, how = step_time(opt)
            rows[name] = {"s": t, "vs_fused_adamw": t / base, "step": how}
        except Exception as exc:  # reported, e.g. out of memory at the defaults
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        finally:
            opt = None
            with torch.no_grad():
                for p, s, g in zip(params, snapshot, grads):
                    p.copy_(s)
                    p.grad = g.detach() if g is not None else torch.randn_like(p) * 1e-3
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_no_sync_in_lanczos(model: nn.Module, data: tuple[Any, Any]) -> str:
    """Run three ``eigsh`` iteration steps under ``set_sync_debug_mode("error")`` on CUDA.

    Returns ``"ok"``, ``"skipped (...)"`` without CUDA, or raises the synchronising call's error.
    The step is :func:`curvlab.estimators.eigen.lanczos_step` inside the operator's
    ``fixed()`` block (as ``eigsh`` runs it): product, re-orthogonalisation and the coefficients,
    which ``eigsh`` then reads once per iteration for its convergence check.
    """
    from curvlab.estimators.eigen import lanczos_step
    from curvlab.operators import HessianOperator

    dev = data[0].device
    if dev.type != "cuda":
        return "skipped (no CUDA device)"
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    V = torch.zeros(4, H.shape[0], device=dev)
    V[0] = torch.randn(H.shape[0], device=dev)
    V[0] /= V[0].norm()
    with H.fixed():
        lanczos_step(H, V, 0)  # warm-up outside the check (first-call allocations)
        sync(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for j in range(3):
                w, ab = lanczos_step(H, V, j)
                V[j + 1] = w / ab[1]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return "ok"


#: non-default options of the timed steps: a network's Hessian is indefinite, so Newton's CG
#: (positive definite systems) would raise; MINRES solves the same system, here within 50 HVPs
#: (the default budget, 10 n products, is a full solve: hours at 10M parameters)
STEP_OPTIONS: dict[str, dict[str, Any]] = {"newton": {"solver": "minres", "max_matvecs": 50}}

#: the optimizers whose steps must not synchronise (name, keywords, whether step takes a closure)
SYNC_FREE_STEPS: tuple[tuple[str, dict[str, Any], bool | str], ...] = (
    ("adopt", {}, False),
    ("dog", {}, False),
    ("ldog", {}, False),
    ("frugal", {}, False),
    ("mfac", {}, False),
    ("adahessian", {}, True),
    ("sophia", {"estimator": "hutchinson"}, True),
    ("sophia", {}, "logits"),
    ("psgd_kron", {}, False),
    ("psgd_lra", {}, False),
    ("psgd_xmat", {}, False),
)


def check_no_sync_in_steps(model: nn.Module, data: tuple[Any, Any]) -> dict[str, str]:
    """Three steps of each of :data:`SYNC_FREE_STEPS` under ``set_sync_debug_mode("error")``.

    Returns ``{name: "ok" or the synchronising call's error}``, or ``{"all": "skipped (...)"}``
    without CUDA. The first step (state created, kernels loaded) runs outside the check.
    """
    from curvlab.optim import create

    dev = data[0].device
    if dev.type != "cuda":
        return {"all": "skipped (no CUDA device)"}
    loss_fn = nn.CrossEntropyLoss()
    start = [p.detach().clone() for p in model.parameters()]
    out: dict[str, str] = {}
    for name, kwargs, closure in SYNC_FREE_STEPS:
        opt = create(name, model.parameters(), on_nonfinite="ignore", **kwargs)
        label = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"

        def step(opt: Any = opt, closure: bool | str = closure) -> None:
            opt.zero_grad()
            if closure == "logits":  # SophiaG: (loss, logits)
                opt.step(lambda: (loss_fn(out := model(data[0]), data[1]), out))
            elif closure:
                opt.step(lambda: loss_fn(model(data[0]), data[1]))
            else:
                loss_fn(model(data[0]), data[1]).backward()
                opt.step()

        step()
        sync(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
            out[label] = "ok"
        except RuntimeError as exc:
            out[label] = f"synchronises: {str(exc).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help="comma list of tiny,10M,100M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--matmul-n", type=int, default=None)
    ap.add_argument("--no-optim", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "gpu_latest.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    sizes = args.sizes or ("10M,100M" if dev.type == "cuda" else "tiny")
    mm_n = args.matmul_n or (8192 if dev.type == "cuda" else 256)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    tflops = matmul_tflops(dev, mm_n, args.reps)
    print(
        f"device {dev} ({name}), torch {torch.__version__}: float32 matmul {mm_n}^2 "
        f"{tflops:.2f} TFLOP/s"
    )
    report: dict[str, Any] = {"device": str(dev), "name": name, "matmul_tflops": tflops}
    for size in sizes.split(","):
        model, data, weights = make_problem(size, dev)
        n = sum(p.numel() for p in model.parameters())
        row: dict[str, Any] = {"n": n}
        row.update(hvp_throughput(model, data, weights, tflops, args.reps))
        row.update(estimator_times(model, data, max(1, args.reps // 2)))
        row["no_sync_in_lanczos"] = check_no_sync_in_lanczos(model, data)
        row["no_sync_in_steps"] = check_no_sync_in_steps(model, data)
        print(
            f"[{size}] n={n:,}: HVP {1e3 * row['hvp_s']:.2f} ms = {row['hvp_tflops']:.2f} "
            f"TFLOP/s ({100 * row['roofline']:.0f}% of the matmul roofline); eigsh(k=1) "
            f"{row['eigsh_s']:.3f} s ({row['eigsh_matvecs']} HVPs); trace(m=30) "
            f"{row['trace30_s']:.3f} s; no sync in a Lanczos iteration: "
            f"{row['no_sync_in_lanczos']}; in optimizer steps: {row['no_sync_in_steps']}"
        )
        if not args.no_optim:
            row["optim"] = optimizer_steps(model, data, args.reps)
            print(f"  fused AdamW step {1e3 * row['optim']['adamw_fused_s']:.3f} ms; ÷ it:")
            for opt, r in row["optim"].items():
                if isinstance(r, dict):
                    what = r.get("error") or f"{r['vs_fused_adamw']:.2f}x  [{r['step']}]"
                    print(f"    {opt:<12}{what}")
        report[size] = row
        del model, data
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
