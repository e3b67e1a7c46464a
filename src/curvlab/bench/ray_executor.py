"""Run a suite's runs as Ray tasks; the driver (the calling process) alone writes the store.

``run_suite(..., executor="ray")`` and ``curvlab bench run --executor ray [--address ADDR]`` use
it. Ray is the engine: it places the tasks on the cluster's CPUs and moves their results; nothing
here schedules or transports anything itself.

The driver claims each run in the store (:meth:`~curvlab.bench.store.Store.claim_run`, as the local
pool's workers do) just before it submits the run as a Ray task, at most as many at once as there
are slots. The task runs :func:`curvlab.bench.runner.run_attempt`, the function every executor runs,
with a stand-in for the store: each evaluation and each monitor check is yielded back to the driver
the moment it is made (a Ray streaming generator), and the driver writes it into the store through
the store's own methods; the last item is the run's summary, which the driver writes with
:meth:`~curvlab.bench.store.Store.finish_run`. Workers never see the store's path. So the store's
promises hold as with the local pool:

- resume: a rerun skips finished and diverged runs and restarts the others;
- a ``kill -9`` of the driver loses at most the runs in flight (they stay ``running`` and the next
  invocation restarts them); a lost worker or node fails its task, and the driver restarts that
  run once in a new attempt (twice lost: recorded ``failed``; a task that raised is recorded
  ``failed`` with the error at once);
- each run executes once (claims, and tasks are never retried by Ray itself);
- step-clock records are bit-identical to the local executor's (same seeds, same code, one thread
  per task).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import queue
import socket
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from curvlab._optional import optional_module
from curvlab.bench.runner import environment, run_attempt
from curvlab.bench.suites import RunSpec
from curvlab.errors import ExecutorError, InvalidArgumentError

if TYPE_CHECKING:
    from curvlab.bench.monitoring import MonitorSpec
    from curvlab.bench.runner import Driver
    from curvlab.bench.store import Store

__all__ = ["RAY_MISSING", "import_ray", "ray_session", "run_on_ray"]

#: The message of the error raised when Ray is not installed.
RAY_MISSING = (
    "the Ray executor needs Ray, which is not installed here: pip install curvlab[ray] "
    "(or pip install 'ray>=2.9'), or leave out --executor ray to use the local process pool"
)

#: Seconds to wait for a TCP connection to the cluster's address before calling it unreachable.
CONNECT_TIMEOUT_S = 10.0

# The store's methods a worker's records may call on the driver (nothing else is applied).
_RECORDS = ("add_eval", "add_monitor_values")


def import_ray() -> Any:
    """The ``ray`` module, imported now (Ray is an optional dependency).

    Raises:
        ExecutorError: Ray is not installed (the message says ``pip install curvlab[ray]``).
    """
    try:
        return optional_module("ray", RAY_MISSING)
    except ImportError as exc:
        raise ExecutorError(RAY_MISSING) from exc


def _check_reachable(address: str) -> None:
    """Refuse an address that is not ``HOST:PORT`` or at which nothing accepts a connection."""
    if address == "auto":  # Ray finds the cluster started on this machine
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError(
            f"Ray address {address!r} is not HOST:PORT; give the head node's address as printed "
            "by `ray start --head` (e.g. 10.0.0.1:6379), 'auto', or ray://HOST:10001"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
            "`ray start --head` on the head node, check the host and port, or leave out --address "
            "to start a local Ray instance"
        ) from exc


@contextlib.contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[tuple[Any, int]]:
    """Join the Ray cluster at ``address``, or start a local Ray instance; yield ``(ray, slots)``.

    A Ray session this process has already initialised is used as it is and left running (an
    ``address`` is still checked for reachability); one started here is shut down on leaving.

    Args:
        address: ``HOST:PORT`` of the head node, ``auto``, ``ray://HOST:PORT``, or ``None`` to
            start a local instance with ``workers`` CPUs (default: this machine's cores).
        workers: the runs in flight at once (default: the cluster's CPUs).

    Yields:
        The ``ray`` module and the number of runs to keep in flight.

    Raises:
        ExecutorError: Ray is not installed, or the cluster cannot be reached or joined (the
            message names the address) or offers no CPU.
        InvalidArgumentError: ``address`` is not of a form Ray accepts.
    """
    ray = import_ray()
    if address is not None:
        _check_reachable(address)
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if address is None:
            options["num_cpus"] = workers or os.cpu_count() or 1
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ExecutorError(f"cannot start or join {where}: {exc}") from exc
    try:
        slots = workers or int(ray.cluster_resources().get("CPU", 0))
        if slots < 1:
            raise ExecutorError(
                f"the Ray cluster{f' at {address}' if address else ''} has no CPU to run on; "
                "start worker nodes with `ray start --address=HEAD:6379` or give --workers"
            )
        yield ray, slots
    finally:
        if started:
            ray.shutdown()


class _Records:
    """The store's stand-in inside a Ray task: every write becomes an item for the driver."""

    def __init__(self, put: Callable[[Any], None]) -> None:
        self.put = put

    def add_eval(self, *args: Any) -> None:
        self.put(("add_eval", args))

    def add_monitor_values(self, key: str, step: int, values: Mapping[str, float]) -> None:
        self.put(("add_monitor_values", (key, step, dict(values))))


def ray_task(
    spec_dict: dict[str, Any], attempt: int, monitors: Sequence[MonitorSpec]
) -> Iterator[tuple[str, Any]]:
    """The body of one Ray task: run attempt ``attempt`` of a claimed run, yielding its records.

    Yields ``("add_eval", args)`` and ``("add_monitor_values", args)`` as the run makes them (the
    driver calls the store's method of that name), then ``("finish", (status, summary, env_end))``.
    The run trains in a thread of the task so that its records leave while it goes on.
    """
    torch.set_num_threads(1)
    spec = RunSpec(**spec_dict)
    items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def work() -> None:
        outcome: tuple[str, dict[str, Any], dict[str, Any]] = ("failed", {}, {})
        try:
            outcome = run_attempt(spec, _Records(items.put), attempt, monitors)
        except BaseException as exc:  # run_attempt records Exceptions; this is the rest
            outcome = ("failed", {"error": "".join(traceback.format_exception_only(exc))}, {})
        finally:
            outcome[2]["host"] = platform.node()
            items.put(("finish", outcome))

    threading.Thread(target=work, name="curvlab-ray-run", daemon=True).start()
    while True:
        item = items.get()
        yield item
        if item[0] == "finish":
            return


def run_on_ray(ray: Any, slots: int, todo: Sequence[RunSpec], store: Store, driver: Driver) -> None:
    """Run ``todo`` as Ray tasks, ``slots`` at a time, writing their records into ``store``.

    Args:
        ray: the ``ray`` module of a live session (:func:`ray_session`).
        slots: runs in flight at once.
        todo: the runs to do, in order.
        store: the store; only this process writes it.
        driver: the runner identity, monitors and reporting of
            :func:`curvlab.bench.runner.run_suite`.
    """
    owner, monitors, prog, count, say = driver
    task = ray.remote(num_cpus=1, max_retries=0)(ray_task)
    lost = ray.exceptions.RayError
    pending = list(reversed(todo))
    inflight: dict[Any, tuple[RunSpec, int]] = {}
    retried: set[str] = set()
    done = 0

    def submit(spec: RunSpec) -> bool:
        env = {**environment(), "threads": 1, "executor": "ray"}
        attempt = store.claim_run(spec.run_id, owner, env)
        if attempt is not None:
            inflight[task.remote(asdict(spec), attempt, tuple(monitors))] = (spec, attempt)
        return attempt is not None

    try:
        while pending or inflight:
            while pending and len(inflight) < slots:
                if not submit(spec := pending.pop()):
                    count({"status": "taken"})
                    done += 1
            prog.update(done, len(inflight))
            if not inflight:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for gen in ready:
                spec, attempt = inflight[gen]
                try:
                    kind, args = ray.get(next(gen))
                except (lost, StopIteration) as exc:  # the worker or its node is gone
                    del inflight[gen]
                    crashed = isinstance(exc, ray.exceptions.RayTaskError)  # not lost: raised
                    if spec.run_id not in retried and not crashed:
                        retried.add(spec.run_id)
                        say(f"note: a Ray task was lost ({type(exc).__name__}); its run restarts")
                        pending.append(spec)
                        continue
                    why = (
                        str(exc)[-2000:]
                        if crashed
                        else f"the Ray task was lost twice on this run ({type(exc).__name__})"
                    )
                    store.finish_run(spec.run_id, attempt, "failed", {"error": why})
                    count({"status": "failed", "error": why})
                    done += 1
                    continue
                if kind in _RECORDS:
                    getattr(store, kind)(*args)
                    continue
                status, summary, env_end = args
                store.finish_run(spec.run_id, attempt, status, summary, env_end)
                del inflight[gen]
                count({"status": status, **summary})
                done += 1
    except BaseException:  # Ctrl-C or an error: stop the tasks now, not after their runs
        for gen in inflight:
            with contextlib.suppress(Exception):
                ray.cancel(gen, force=True)
        raise
    prog.update(done, 0)
