"""Compressed communication on 2 gloo processes (CPU, 1 thread each): bytes, step time, loss.

Two families on the same problem (an MLP regression, each rank holding a differently shifted
shard):

- optimizer-side communication (model not wrapped in DDP): Adam with a full-precision gradient
  all-reduce (``OneBitAdam`` that never freezes) vs 1-bit Adam (``OneBitAdam``, warm-up 20%);
  also the drift of the variance after the freeze, had it not been frozen (a shadow v updated
  with all-reduced gradients, outside the timing and the byte count);
- DDP communication hooks with plain SGD: all-reduce (``allreduce_hook``), torch's PowerSGD
  (rank 2) and EControl (top-k 1%, sign).

Bytes: what one rank sends under the ring/bandwidth-optimal cost model of
``curvlab.distributed._comm.wire_bytes``, counted by wrapping ``torch.distributed``'s
collectives. Step time: median over steps of forward + backward + communication + update.

Run: ``PYTHONPATH=src python benchmarks/compressed_comm.py [--steps 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from curvlab.distributed import EControlState, OneBitAdam, econtrol_hook
from curvlab.distributed._comm import count_collectives

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )


def _shard(rank: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(7)) / 32**0.5
    x = torch.randn(n, 32, generator=g) + rank  # heterogeneous inputs
    return x, torch.tanh(x @ teacher) + 0.5 * rank


def _full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return (
            sum(float(((model(x) - y) ** 2).mean()) for x, y in map(_shard, range(WORLD))) / WORLD
        )


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int, after_step: Any = None
) -> dict[str, Any]:
    """Run ``steps`` full-batch steps; per step the bytes sent and the time; loss every 25 steps."""
    x, y = _shard(rank)
    times, sent, curve = [], [], []
    with count_collectives() as counter:
        for t in range(steps):
            before, start = counter["bytes"], time.perf_counter()
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            times.append(time.perf_counter() - start)
            sent.append(counter["bytes"] - before)
            if after_step is not None:
                after_step(t, counter)
            if (t + 1) % 25 == 0:
                curve.append((sum(sent), _full_loss(model)))
    return {"times": times, "sent": sent, "curve": curve, "loss": _full_loss(model)}


def _adam_runs(rank: int, steps: int) -> dict[str, Any]:
    out = {}
    freeze = steps // 5
    for name, fs in (("Adam + all-reduce", 10**9), ("1-bit Adam", freeze)):
        model = _model()
        opt = OneBitAdam(model.parameters(), lr=1e-3, freeze_step=fs)
        shadow: dict[int, torch.Tensor] = {}

        def track(
            t: int, counter: dict[str, int], opt: OneBitAdam = opt, fs: int = fs, shadow=shadow
        ) -> None:
            if t + 1 < fs or fs > steps:
                return
            saved = counter["bytes"]  # the shadow's all-reduce is not counted
            for i, p in enumerate(opt.param_groups[0]["params"]):
                g = p.grad.clone()
                dist.all_reduce(g)
                g /= WORLD
                v = shadow.setdefault(i, opt.state[p]["exp_avg_sq"].clone())
                if t + 1 > fs:
                    v.mul_(0.999).addcmul_(g, g, value=0.001)
            counter["bytes"] = saved

        res = _train(model, opt, rank, steps, track)
        if shadow:
            frozen = [opt.state[p]["exp_avg_sq"] for p in opt.param_groups[0]["params"]]
            num = sum(float((shadow[i] - v).norm() ** 2) for i, v in enumerate(frozen)) ** 0.5
            den = sum(float(v.norm() ** 2) for v in frozen) ** 0.5
            res["v_drift"] = num / den
        res["warmup"] = min(fs, steps)
        out[name] = res
    return out


def _hook_runs(rank: int, steps: int) -> dict[str, Any]:
    hooks = {
        "SGD + all-reduce": lambda: (None, default_hooks.allreduce_hook),
        "SGD + PowerSGD r=2": lambda: (
            powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2
            ),
            powerSGD_hook.powerSGD_hook,
        ),
        "SGD + EControl top-1% (eta = 0.01)": lambda: (
            EControlState("topk", ratio=0.01),
            econtrol_hook,
        ),
        "SGD + EControl sign eta=0.5": lambda: (EControlState("sign", eta=0.5), econtrol_hook),
    }
    out = {}
    for name, make in hooks.items():
        model = DDP(_model())
        state, hook = make()
        model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        res = _train(model, opt, rank, steps)
        res["warmup"] = 2
        out[name] = res
    return out


def _worker(rank: int, init_file: str, out_file: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {**_adam_runs(rank, steps), **_hook_runs(rank, steps)}
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _table(results: dict[str, Any]) -> str:
    n_params = sum(p.numel() for p in _model().parameters())
    fp32 = 2 * (WORLD - 1) * 4 * n_params // WORLD
    head = (
        "| method | final loss | MB sent/rank | bytes/step after warm-up | ratio to fp32 "
        "all-reduce | median step ms | v drift |\n|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, r in results.items():
        after = r["sent"][r["warmup"] :] or r["sent"]
        per_step = statistics.median(after)
        drift = f"{r['v_drift']:.3g}" if "v_drift" in r else ""
        rows.append(
            f"| {name} | {r['loss']:.4f} | {sum(r['sent']) / 1e6:.2f} | {per_step:.0f} | "
            f"{per_step / fp32:.4f} | {1e3 * statistics.median(r['times']):.2f} | {drift} |"
        )
    curves = ["", "loss vs cumulative MB sent (every 25 steps):"]
    for name, r in results.items():
        pts = ", ".join(f"{b / 1e6:.2f}:{loss:.3f}" for b, loss in r["curve"][::2])
        curves.append(f"- {name}: {pts}")
    return f"model: {n_params} fp32 parameters, {WORLD} gloo ranks\n" + "\n".join(rows + curves)


def main() -> None:
    """Spawn the 2 ranks, run every method, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "results.json")
        mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), out_file, args.steps), nprocs=WORLD
        )
        with open(out_file) as f:
            results = json.load(f)
    print(_table(results))
    with open("/proc/loadavg") as f:
        print("loadavg:", f.read().strip())


if __name__ == "__main__":
    main()
