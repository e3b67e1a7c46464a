"""The runner: one training script for every optimizer, three clocks, parallel workers, resume.

A run is ``(problem, optimizer, hyperparameters, seed)``. Its loop, identical for every optimizer::

    evaluate at step 0 (off the clock)
    for step in 1..budget:
        [clock on]  batch = next_batch(); loss = optimizer.step(closure); schedule.step() [clock off]
        steps += 1; gradient-equivalents += cost of the step (curvlab.bench.optimizers rule)
        non-finite loss -> record "diverged" at this step and stop
        every eval_every steps and at the budget: evaluate (off the clock) and commit the record

The closure follows the project-wide contract: optimizers with ``closure_mode == "backward"``
(torch-standard) get ``zero_grad; loss = loss_fn(model(x), y); loss.backward(); return loss``; those
with ``closure_mode == "loss"`` get a closure that returns ``(loss, logits)`` (logits flattened to
``[N, classes]``) — or just ``loss`` for problems without logits — and never calls backward.

Evaluation happens on a fixed step schedule, outside the timed region, in the same code path for
every optimizer; it computes what the problem declares (its validation and test splits): the run
reaches its target when the problem's target metric, on the validation split, crosses the suite's
threshold (:attr:`RunSpec.target <curvlab.bench.suites.RunSpec.target>`), and its final quality is
the problem's final metric, on the test split, at the last evaluation (AlgoPerf issues #719 and #858 are the failure modes avoided). The seconds clock
covers only batch drawing and ``optimizer.step`` (which includes the closure).

Workers are spawned processes (default: one per core), each with ``torch.set_num_threads(1)``;
each writes its own records to the store. A worker dies with its runner in every phase: on Linux
the kernel kills it (``PR_SET_PDEATHSIG``), and everywhere a watchdog thread exits it once its
parent is gone; its run stays ``running`` and the next invocation restarts it.

Several runners may share one store: each run is claimed atomically before it starts
(:meth:`curvlab.bench.store.Store.claim_run`), a runner refreshes its runs' heartbeat every
:data:`HEARTBEAT_S` seconds from a thread, and runs held by another live runner are left to it.

Reproducibility: before a run builds its problem, the worker seeds ``torch``, ``numpy`` and
``random`` from :attr:`RunSpec.rng_seed <curvlab.bench.suites.RunSpec.rng_seed>`, and optimizers
that take a ``generator`` get one seeded from it, so a rerun gives bit-identical step-clock records
whatever the worker and the order.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypedDict

import numpy as np
import torch

from curvlab._workers import one_thread_worker
from curvlab.bench.monitoring import MonitorSpec, RunMonitors, check_problem_fit
from curvlab.bench.optimizers import (
    CostModel,
    closure_mode_of,
    make_optimizer,
    make_scheduler,
    resolve_optimizer,
)
from curvlab.bench.problems import get_problem
from curvlab.bench.sink import MonitorWriter
from curvlab.bench.store import (
    DONE_STATUSES,
    Store,
    check_store_path,
    disk_full_error,
    new_owner,
)
from curvlab.bench.suites import BUILTIN_OPTIMIZERS, RunSpec, Suite, expand_runs, problem_infos
from curvlab.errors import InvalidArgumentError, UnknownNameError, UnknownOptionError, WorkerError

__all__ = [
    "EXECUTORS",
    "Driver",
    "HEARTBEAT_S",
    "RunOptions",
    "RunRecorder",
    "SuiteResult",
    "environment",
    "execute_run",
    "run_attempt",
    "run_suite",
]

#: Seconds between two heartbeats of a runner (far below the store's ``STALE_AFTER_S``).
HEARTBEAT_S = 5.0


def environment() -> dict[str, Any]:
    """The measurement environment: versions, threads, cores and the load average now."""
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover - platforms without getloadavg
        load = []
    from curvlab import __version__

    return {
        "curvlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": load,
        "time": time.time(),
    }


def _float_loss(loss: Any) -> float:
    if isinstance(loss, tuple):
        loss = loss[0]
    if isinstance(loss, float):
        return loss
    if loss is None:
        return math.nan
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def execute_run(
    spec: RunSpec,
    store_path: str | os.PathLike[str],
    *,
    owner: str | None = None,
    store: Store | None = None,
    monitors: Sequence[MonitorSpec] = (),
) -> dict[str, Any]:
    """Claim ``spec`` and run it to its budget, committing each evaluation and the summary.

    Args:
        spec: the run.
        store_path: the SQLite store (opened here unless ``store`` is given).
        owner: the runner identity the run is claimed for (default: a fresh one).
        store: an already open store (in-process execution).
        monitors: the suite's monitors; those that apply to the run are checked off the clock
            (:mod:`curvlab.bench.monitoring`).

    Returns:
        The summary written to the ``runs`` row, plus ``status``; ``{"status": "taken"}`` when the
        run is done or held by another live runner (nothing was run).
    """
    own = store is None
    st = store if store is not None else Store(store_path)
    try:
        attempt = st.claim_run(spec.run_id, owner or new_owner(), environment())
        if attempt is None:
            return {"status": "taken"}
        status, summary, env_end = run_attempt(spec, st, attempt, monitors)
        st.finish_run(spec.run_id, attempt, status, summary, env_end)
        return {"status": status, **summary}
    finally:
        if own:
            st.close()


class RunRecorder(MonitorWriter, Protocol):
    """Where a run's evaluations and monitor values go: a :class:`~curvlab.bench.store.Store`, or a
    stand-in that hands them to the process that writes the store (the Ray executor's workers)."""

    def add_eval(self, *args: Any, **kwargs: Any) -> None:
        """Record one evaluation, as :meth:`Store.add_eval <curvlab.bench.store.Store.add_eval>`."""


def run_attempt(
    spec: RunSpec, st: RunRecorder, attempt: int, monitors: Sequence[MonitorSpec] = ()
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Train attempt ``attempt`` of the claimed run ``spec``, recording each evaluation into ``st``.

    This is what every executor runs for one run (in-process, a pool worker, a Ray task); an
    exception of the run is its outcome (``failed`` with the error), not the caller's.

    Returns:
        ``(status, summary, env_end)``: the arguments of
        :meth:`~curvlab.bench.store.Store.finish_run` after ``run_id`` and ``attempt``.
    """
    try:
        status, summary = _train(spec, st, attempt, monitors)
    except sqlite3.Error as exc:  # the store failed, not the run: the suite cannot go on
        full = disk_full_error(Path(getattr(st, "path", "")), exc)
        if full is not None:
            raise full from exc
        raise
    except Exception as exc:  # recorded, the suite goes on
        status = "failed"
        summary = {
            "error": "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
        }
    env = environment()
    return status, summary, {"loadavg": env["loadavg"], "time": env["time"]}


def seed_everything(seed: int) -> None:
    """Seed ``torch``, ``numpy`` and ``random`` (the global generators) from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator is the one to seed
    random.seed(seed)


def _train(
    spec: RunSpec, st: RunRecorder, attempt: int, monitors: Sequence[MonitorSpec] = ()
) -> tuple[str, dict[str, Any]]:
    seed_everything(spec.rng_seed)
    problem = get_problem(spec.problem)
    inst = problem.build(spec.seed)
    # the problem names the metric (on its validation split), the suite gives the threshold
    target = replace(problem.target, threshold=spec.target)
    opt = make_optimizer(spec.optimizer, inst.model.parameters(), spec.hparams, seed=spec.rng_seed)
    scheduler = make_scheduler(opt, spec.hparams, spec.budget_steps)
    cost = CostModel(opt)
    checks = RunMonitors(monitors, spec, problem, inst, opt, st)
    loss_mode = closure_mode_of(opt) == "loss"
    logits = inst.outputs_are_logits
    loss_and_outputs = inst.loss_and_outputs
    next_batch = inst.next_batch
    clock = time.perf_counter

    steps, ge, hvps, secs = 0, 0.0, 0, 0.0
    ttt: dict[str, Any] = {}
    last: dict[str, float] = {}
    calls = [0]
    batch: list[Any] = [None, None]

    def closure_backward() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_and_outputs(batch[0], batch[1])
        loss.backward()
        return loss

    def closure_loss() -> Any:
        calls[0] += 1
        loss, out = loss_and_outputs(batch[0], batch[1])
        return (loss, out.reshape(-1, out.shape[-1])) if logits else loss

    closure: Callable[[], Any] = closure_loss if loss_mode else closure_backward

    def record(train_loss: float) -> bool:
        """Evaluate off the clock and commit; returns False if the metric is non-finite."""
        nonlocal last
        metrics = inst.evaluate()
        last = metrics
        st.add_eval(spec.run_id, attempt, steps, ge, hvps, secs, train_loss, metrics)
        value = float(metrics[target.metric])
        if not ttt and target.reached(value):
            ttt.update(ttt_steps=steps, ttt_grad_evals=ge, ttt_seconds=secs)
        return math.isfinite(value)

    def summary(train_loss: float) -> dict[str, Any]:
        return {
            "steps": steps,
            "grad_evals": ge,
            "hvp_evals": hvps,
            "seconds": secs,
            "final_metric": float(last.get(problem.final_metric, math.nan)),
            "final_loss": float(last.get("loss", train_loss)),
            **ttt,
        }

    record(math.nan)
    train_loss = math.nan
    budget, every = spec.budget_steps, spec.eval_every
    for step in range(1, budget + 1):
        calls[0] = 0
        t0 = clock()
        batch[0], batch[1] = next_batch()
        try:
            loss = opt.step(closure)
        except FloatingPointError:  # NonFiniteError from optimizers with on_nonfinite="raise"
            loss = math.nan
        if scheduler is not None:
            scheduler.step()
        train_loss = _float_loss(loss)
        secs += clock() - t0
        steps = step
        dge, dh = cost.step_cost(calls[0])
        ge += dge
        hvps += dh
        if not math.isfinite(train_loss):
            return "diverged", {**summary(train_loss), "diverged_step": step, "final_metric": None}
        checks.after_step(step)
        if step % every == 0 or step == budget:
            if not record(train_loss):
                return "diverged", {
                    **summary(train_loss),
                    "diverged_step": step,
                    "final_metric": None,
                }
    return "finished", summary(train_loss)


# ------------------------------------------------------------------------------------------------
# the suite


def _worker_init(runner_pid: int, owner: str, started: Any) -> None:
    global _WORKER_OWNER
    one_thread_worker(runner_pid)
    _WORKER_OWNER = owner
    started.set()  # this pool's workers get past their bootstrap (see _run_pool)


_WORKER_OWNER: str | None = None


def _worker_run(
    spec_dict: dict[str, Any], store_path: str, monitors: Sequence[MonitorSpec]
) -> dict[str, Any]:
    return execute_run(RunSpec(**spec_dict), store_path, owner=_WORKER_OWNER, monitors=monitors)


class _Heartbeat:
    """A thread that refreshes the heartbeat of ``owner``'s runs every :data:`HEARTBEAT_S` s."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path, self.owner = path, owner
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="curvlab-heartbeat", daemon=True)

    def _loop(self) -> None:
        st = Store(self.path)
        try:
            while not self.stop.wait(HEARTBEAT_S):
                try:
                    st.heartbeat(self.owner)
                except sqlite3.Error:  # busy or full disk: the next beat tries again
                    continue
        finally:
            st.close()

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _mp_context() -> Any:
    """``spawn``: fresh interpreters (no inherited threads or locks). Not ``forkserver``: its
    workers hold the server's liveness pipe, so after a ``kill -9`` of the runner the server and
    its idle workers would wait on each other forever; spawned workers see EOF and exit."""
    return multiprocessing.get_context("spawn")


@dataclass
class SuiteResult:
    """What :func:`run_suite` did: counts by outcome, skipped optimizers and the wall time.

    ``taken`` counts the runs another runner on the same store finished or holds.
    """

    store: str
    total: int = 0
    already_done: int = 0
    skipped_optimizers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: int = 0
    diverged: int = 0
    failed: int = 0
    taken: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (for JSON output)."""
        return asdict(self)


class Driver(NamedTuple):
    """What :func:`run_suite` hands an executor besides the runs: the runner identity the runs are
    claimed for, the suite's monitors, the progress display, the outcome counter (``tally``) and
    the note printer."""

    owner: str
    monitors: Sequence[MonitorSpec]
    progress: _Progress
    tally: Callable[[Mapping[str, Any]], None]
    say: Callable[[str], None]


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.running = total, 0, 0
        self.t0 = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.last_print = 0.0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def update(self, done: int, running: int, note: str = "") -> None:
        delta, self.done, self.running = done - self.done, done, running
        if self.bar is not None:
            self.bar.update(delta)
            self.bar.set_postfix_str(f"running={running} {note}".strip())
            return
        now = time.monotonic()
        if self.enabled and (now - self.last_print > 10.0 or done == self.total):
            self.last_print = now
            el = now - self.t0
            eta = el / done * (self.total - done) if done else float("nan")
            eta_s = f"{eta / 60:.1f} min" if math.isfinite(eta) else "?"
            print(
                f"[curvlab bench] {done}/{self.total} runs done, {running} running, ETA {eta_s} "
                f"{note}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _usable_entries(suite: Suite, log: Callable[[str], None]) -> tuple[Suite, list[str]]:
    keep, skipped = [], []
    for e in suite.optimizers:
        try:
            resolve_optimizer(e.optimizer)
        except UnknownNameError:
            if BUILTIN_OPTIMIZERS.get(e.label) == e:
                skipped.append(e.label)
                log(
                    f"note: optimizer {e.label!r} ({e.optimizer}) is not in curvlab's registry "
                    f"here; skipped"
                )
                continue
            raise
        keep.append(e)
    if not keep:
        raise UnknownNameError(
            f"none of the suite's optimizers is available ({', '.join(skipped)}); name registered "
            f"ones "
            "(`curvlab bench list`) or import paths such as 'torch.optim:AdamW'"
        )
    return Suite(**{**asdict_shallow(suite), "optimizers": tuple(keep)}), skipped


def asdict_shallow(obj: Any) -> dict[str, Any]:
    """Field name -> value without recursing (dataclasses.asdict would convert entries)."""
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def plan_runs(suite: Suite) -> list[RunSpec]:
    """Validate problems (data present) and expand the suite into its runs."""
    for p in suite.problems:
        get_problem(p).check_data()
    return expand_runs(suite, problem_infos(suite))


EXECUTORS = ("local", "ray")


class RunOptions(TypedDict, total=False):
    """How :func:`run_suite` runs a suite (its keyword options, described there), as one value.

    An entry point that runs a suite on the caller's behalf takes ``**options:
    Unpack[RunOptions]`` and passes them on unchanged (:func:`curvlab.bench.calibrate.calibrate`).
    """

    workers: int | None
    progress: bool
    log: Callable[[str], None] | None
    executor: str
    address: str | None


def run_suite(
    suite: Suite,
    store_path: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: str = "local",
    address: str | None = None,
) -> SuiteResult:
    """Run every unfinished run of ``suite`` into the store at ``store_path``.

    Before any run starts, and before the store is created: the store path is checked (writable,
    not a newer schema), missing optimizers of built-in entries are skipped with a note (unknown
    names of explicit entries raise), every problem's data is checked, and the executor is started.
    Finished and diverged runs already in the store are skipped; runs left ``running`` (a killed
    process) or ``failed`` are restarted.

    Args:
        suite: a validated suite (:func:`curvlab.bench.suites.load_suite`).
        store_path: SQLite file (created).
        workers: parallel processes (default ``os.cpu_count()``); 0 runs in this process. With
            ``executor="ray"``: the runs in flight at once (default: the cluster's CPUs), and the
            CPUs of a local Ray instance this call starts.
        progress: progress display on stderr (tqdm on a TTY, periodic lines otherwise).
        log: where notes go (default: stderr).
        executor: ``"local"`` (a process pool on this machine) or ``"ray"`` (Ray tasks; this
            process stays the only writer of the store, :mod:`curvlab.bench.ray_executor`).
        address: with ``executor="ray"``, the cluster to join (``HOST:PORT`` of the head node,
            ``auto`` or ``ray://HOST:PORT``); default: start a local Ray instance.

    Returns:
        A :class:`SuiteResult`.

    Raises:
        StoreError, UnknownNameError, DataNotFoundError: before any run starts.
        MonitorMismatchError: a monitor of the suite cannot run on one of its problems.
        InvalidArgumentError: a negative ``workers``, ``workers=0`` with Ray, or an ``address``
            without Ray or not of the form ``HOST:PORT``.
        UnknownOptionError: an ``executor`` other than ``"local"`` and ``"ray"``.
        ExecutorError: Ray is not installed or the cluster at ``address`` cannot be reached.
    """
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    _check_executor(workers, executor, address)
    t0 = time.monotonic()
    path = check_store_path(store_path)
    suite, skipped = _usable_entries(suite, say)
    specs = plan_runs(suite)
    check_problem_fit(suite.monitors, suite.problems)
    with contextlib.ExitStack() as engine:
        engine.enter_context(_full_disk_says_so(path))
        if executor == "ray":
            from curvlab.bench.ray_executor import ray_session, run_on_ray

            ray, slots = engine.enter_context(ray_session(address, workers))
        store = engine.enter_context(contextlib.closing(Store(path)))
        suite_doc = json.loads(suite.to_json())
        suite_doc["skipped_optimizers"] = skipped
        store.register(
            suite.name, json.dumps(suite_doc, sort_keys=True), problem_infos(suite), specs
        )
        status = store.status_of([s.run_id for s in specs])
        todo = [s for s in specs if status.get(s.run_id) not in DONE_STATUSES]
        result = SuiteResult(
            store=str(path),
            total=len(specs),
            already_done=len(specs) - len(todo),
            skipped_optimizers=skipped,
        )
        n_workers = (os.cpu_count() or 1) if workers is None else workers
        owner = new_owner()
        prog = _Progress(len(todo), progress)

        def count(out: Mapping[str, Any]) -> None:
            s = out.get("status", "failed")
            if s in ("finished", "diverged", "taken"):
                setattr(result, s, getattr(result, s) + 1)
            else:
                result.failed += 1
                say(f"note: a run failed: {str(out.get('error', ''))[:300]}")

        try:
            with _Heartbeat(path, owner):
                if executor == "ray":
                    run_on_ray(
                        ray, slots, todo, store, Driver(owner, suite.monitors, prog, count, say)
                    )
                elif n_workers == 0:
                    for i, spec in enumerate(todo):
                        prog.update(i, 1)
                        count(
                            execute_run(
                                spec, path, owner=owner, store=store, monitors=suite.monitors
                            )
                        )
                    prog.update(len(todo), 0)
                else:
                    _run_pool(todo, str(path), owner, n_workers, prog, count, say, suite.monitors)
        finally:
            prog.close()
            # Runs this runner still holds (Ctrl-C, an error) go back to the queue.
            store.release(owner)
    if result.taken:
        say(f"note: {result.taken} runs were done or in progress by another runner on this store")
    result.seconds = time.monotonic() - t0
    return result


@contextlib.contextmanager
def _full_disk_says_so(path: Path) -> Iterator[None]:
    """Turn an SQLite error of a full disk under the store at ``path`` into its StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        full = disk_full_error(path, exc)
        if full is None:
            raise
        raise full from exc


def _check_executor(workers: int | None, executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise UnknownOptionError(
            f"executor must be one of {', '.join(EXECUTORS)} (the local process pool is the "
            f"default), got {executor!r}"
        )
    if workers is not None and (isinstance(workers, bool) or workers < 0):
        raise InvalidArgumentError(
            f"workers must be 0 (in this process) or a positive number of processes, got {workers}"
        )
    if executor == "ray" and workers == 0:
        raise InvalidArgumentError(
            "workers=0 (in this process) and executor='ray' exclude each other; give a positive "
            "number of runs in flight, or leave workers out to use the cluster's CPUs"
        )
    if address is not None and executor != "ray":
        raise InvalidArgumentError(
            f"address {address!r} is the address of a Ray cluster: use it with executor='ray' "
            f"(--executor ray)"
        )


def _run_pool(
    todo: list[RunSpec],
    path: str,
    owner: str,
    n_workers: int,
    prog: _Progress,
    count: Callable[[Mapping[str, Any]], None],
    say: Callable[[str], None],
    monitors: Sequence[MonitorSpec] = (),
) -> None:
    ctx = _mp_context()
    pending = list(reversed(todo))
    retries: dict[str, int] = {}
    done = 0
    # Pools in a row none of whose workers got past its bootstrap (importing the main module, as
    # a script without a `__main__` guard makes it fail). Deaths of started workers do not count:
    # each costs its run a retry, and a run that kills two workers is marked failed.
    stillborn = 0
    while pending:
        started = ctx.Event()
        pool = cf.ProcessPoolExecutor(
            n_workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(os.getpid(), owner, started),
        )
        try:
            inflight: dict[cf.Future[dict[str, Any]], RunSpec] = {}
            broken = False
            while (pending or inflight) and not broken:
                while pending and len(inflight) < n_workers:
                    spec = pending.pop()
                    inflight[pool.submit(_worker_run, asdict(spec), path, monitors)] = spec
                prog.update(done, len(inflight))
                finished, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    spec = inflight.pop(fut)
                    try:
                        out = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True
                        if not started.is_set():  # no worker ran it: not the run's fault
                            pending.append(spec)
                            continue
                        retries[spec.run_id] = retries.get(spec.run_id, 0) + 1
                        if retries[spec.run_id] <= 1:
                            pending.append(spec)
                        else:
                            _mark_failed(path, spec, "the worker process died twice on this run")
                            count({"status": "failed", "error": "worker died"})
                            done += 1
                        continue
                    count(out)
                    done += 1
            if broken:
                for fut, spec in inflight.items():
                    if fut.done() and fut.exception() is None:
                        count(fut.result())
                        done += 1
                    else:
                        pending.append(spec)
                say("note: a worker process died; its run will be restarted in a fresh pool")
        except BaseException:  # Ctrl-C or an error: stop the workers now, not after their runs
            _kill_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        stillborn = 0 if started.is_set() else stillborn + 1
        if stillborn >= 3:
            raise WorkerError(
                "worker processes keep dying before they can start a run (3 pools in a row); if "
                "you called run_suite from a script, guard it with `if __name__ == '__main__':` "
                "(spawned workers re-import the main module), or use workers=0"
            )
    prog.update(done, 0)


def _kill_workers(pool: cf.ProcessPoolExecutor) -> None:
    # the executor has no public way to stop a running task; its process table is the handle
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.join()


def _mark_failed(path: str, spec: RunSpec, why: str) -> None:
    st = Store(path)
    try:
        row = st.runs(run_id=spec.run_id)
        if row:
            st.finish_run(spec.run_id, int(row[0]["attempt"]), "failed", {"error": why})
    finally:
        st.close()
