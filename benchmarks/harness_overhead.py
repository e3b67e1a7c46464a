"""Per-step overhead of the benchmark harness over a bare training loop on the same problem.

Both loops run the same problem instance type (same seed, same minibatches), the same optimizer and
the same number of steps. Three comparisons, medians over repeats (alternating order):

* ``clock``: the harness's own seconds clock (batch + ``optimizer.step(closure)``) vs the bare
  loop's ``zero_grad; loss; backward; step`` — the overhead inside the timed region;
* ``end-to-end``: the whole ``execute_run`` (store writes, environment, cost counting, two
  evaluations at step 0 and at the end) vs the bare loop plus the same two evaluations;
* ``with evals``: as end-to-end, with the problem's own evaluation schedule in both (informational:
  that cost is off the harness's clocks by design).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/harness_overhead.py [--steps 2000]
[--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from curvlab.bench.problems import get_problem
from curvlab.bench.runner import environment, execute_run
from curvlab.bench.store import Store
from curvlab.bench.suites import RunSpec


def bare(problem: str, steps: int, every: int, lr: float) -> tuple[float, float, float]:
    """(seconds of the training steps, wall seconds in total, CPU seconds in total)."""
    c_all = time.process_time()
    t_all = time.perf_counter()
    prob = get_problem(problem)
    inst = prob.build(0)
    opt = torch.optim.AdamW(inst.model.parameters(), lr=lr, weight_decay=0.0)
    inst.evaluate()
    train = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = inst.next_batch()
        opt.zero_grad(set_to_none=True)
        loss = inst.loss_fn(inst.model(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())
        train += time.perf_counter() - t0
        if step % every == 0 or step == steps:
            inst.evaluate()
    return train, time.perf_counter() - t_all, time.process_time() - c_all


def harness(problem: str, steps: int, every: int, lr: float) -> tuple[float, float, float]:
    """As :func:`bare`, through ``execute_run`` into a new store (a store runs a run once)."""
    store = Store(Path(tempfile.mkdtemp()) / "overhead.sqlite")
    spec = RunSpec(
        problem,
        "adamw",
        "torch.optim:AdamW",
        {"lr": lr, "weight_decay": 0.0},
        0,
        "defaults",
        0,
        0,
        steps,
        every,
    )
    store.register("overhead", "{}", {}, [spec])
    c_all = time.process_time()
    t_all = time.perf_counter()
    out = execute_run(spec, store.path, store=store)
    total = time.perf_counter() - t_all
    cpu = time.process_time() - c_all
    assert out["status"] == "finished", out
    return float(out["seconds"]), total, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="digits-mlp")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    every_default = get_problem(a.problem).eval_every
    bare(a.problem, 50, 50, a.lr)  # warm-up (imports, caches)
    harness(a.problem, 50, 50, a.lr)
    keys = (
        "bare_clock",
        "h_clock",
        "bare_total",
        "h_total",
        "bare_ev",
        "h_ev",
        "bare_cpu",
        "h_cpu",
    )
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(a.repeats):
        bc, bt, bcpu = bare(a.problem, a.steps, a.steps, a.lr)
        hc, ht, hcpu = harness(a.problem, a.steps, a.steps, a.lr)
        _, bev, _ = bare(a.problem, a.steps, every_default, a.lr)
        _, hev, _ = harness(a.problem, a.steps, every_default, a.lr)
        for k, v in zip(rows, (bc, hc, bt, ht, bev, hev, bcpu, hcpu)):
            rows[k].append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    env = environment()
    print(
        f"problem {a.problem}, AdamW, {a.steps} steps, {a.repeats} repeats (medians); torch "
        f"{env['torch']}, {env['threads']} thread(s), load average {env['loadavg']}"
    )
    print(
        f"  bare step      {1e3 * med['bare_clock'] / a.steps:8.4f} ms   harness clock step "
        f"{1e3 * med['h_clock'] / a.steps:8.4f} ms   overhead "
        f"{100 * (med['h_clock'] / med['bare_clock'] - 1):+6.2f} %"
    )
    print(
        f"  end-to-end     bare {med['bare_total']:7.3f} s   harness {med['h_total']:7.3f} s   "
        f"overhead "
        f"{100 * (med['h_total'] / med['bare_total'] - 1):+6.2f} %"
    )
    print(
        f"  with evals every {every_default}: bare {med['bare_ev']:7.3f} s   harness "
        f"{med['h_ev']:7.3f} s   "
        f"overhead {100 * (med['h_ev'] / med['bare_ev'] - 1):+6.2f} %"
    )
    print(
        f"  end-to-end CPU time (process_time, robust to other load): bare {med['bare_cpu']:7.3f} s"
        f"   harness {med['h_cpu']:7.3f} s   overhead "
        f"{100 * (med['h_cpu'] / med['bare_cpu'] - 1):+6.2f} %"
    )
    best = {k: min(v) for k, v in rows.items()}
    print(
        f"  fastest of {a.repeats} (least disturbed by other load): clock overhead "
        f"{100 * (best['h_clock'] / best['bare_clock'] - 1):+6.2f} %, end-to-end "
        f"{100 * (best['h_total'] / best['bare_total'] - 1):+6.2f} %"
    )
    per = [100 * (h / b - 1) for h, b in zip(rows["h_total"], rows["bare_total"])]
    print(f"  end-to-end overhead per repeat: {', '.join(f'{x:+.1f}%' for x in per)}")


if __name__ == "__main__":
    main()
