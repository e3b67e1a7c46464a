"""Curvature inside every run: the monitors a suite attaches, checked off the clock.

A suite's ``monitors:`` list attaches training-dynamics monitors (:mod:`curvlab.monitors`) to
every run it applies to::

    monitors:
      - {name: sharpness, every: 50}                  # λ_max(H) and λ_max·η/2 (the GD ratio)
      - {name: adam_sharpness, optimizers: [adamw]}   # λ_max(P⁻¹H) against 38/η (Adam's threshold)
      - {name: noise_scale, every: 100, batches: 8}   # B_simple = tr(Σ)/‖G‖² (minibatch problems)

Fields: ``name`` (one of :data:`MONITOR_KINDS`); ``every`` (steps; default the problem's
evaluation period); ``optimizers`` / ``problems`` (labels and problem names it applies to; default
all); ``max_matvecs`` (the sharpness kinds: HVPs per eigen-solve); ``batches`` (noise_scale: k
mini-batches per check, default 8).

The rule: the checks run after the step, outside the timed region and with the global random
state saved and restored, so a run with monitors has the same step-clock records as one without;
their numbers go to the store's ``monitors`` table under the run's id (:class:`StoreSink`). The
probe batch is the run's first training batch (drawn from a second instance of the same seed, so
the training stream is untouched); the noise-scale pool is its first ``batches`` mini-batches.

A monitor that does not fit is refused at load time, before anything runs: ``adam_sharpness`` on
an optimizer without Adam's state (:func:`check_optimizer_fit`, when the suite is parsed), and a
problem the monitor cannot run on, such as ``noise_scale`` on a full-batch problem
(:func:`check_problem_fit`, before the runner starts).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from curvlab.bench.optimizers import make_optimizer, resolve_optimizer
from curvlab.bench.problems import closest, get_problem
from curvlab.bench.sink import MonitorWriter, StoreSink
from curvlab.errors import CurvlabError, MonitorMismatchError, SuiteError, UnknownNameError

if TYPE_CHECKING:
    from curvlab.bench.problems import Problem, ProblemInstance
    from curvlab.bench.suites import OptimizerEntry, RunSpec
    from curvlab.monitors import Monitor, MonitorHandle

__all__ = [
    "MONITOR_KINDS",
    "MonitorSpec",
    "RunMonitors",
    "check_optimizer_fit",
    "check_problem_fit",
    "parse_monitors",
]

#: The monitors a suite can attach.
MONITOR_KINDS = ("sharpness", "adam_sharpness", "noise_scale")
_FIELDS = {
    "sharpness": ("max_matvecs",),
    "adam_sharpness": ("max_matvecs",),
    "noise_scale": ("batches",),
}


@dataclass(frozen=True)
class MonitorSpec:
    """A monitor a suite attaches to its runs (see the module docstring for the fields)."""

    name: str
    every: int | None = None
    optimizers: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    max_matvecs: int | None = None
    batches: int = 8

    def applies(self, problem: str, label: str) -> bool:
        """Whether the monitor is attached to runs of ``label`` on ``problem``."""
        return (not self.problems or problem in self.problems) and (
            not self.optimizers or label in self.optimizers
        )


def _positive(where: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise SuiteError(f"{where}: expected an integer >= {low}, got {v!r}")
    return v


def _names(where: str, v: Any, known: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or not v:
        raise SuiteError(f"{where}: expected a non-empty list of names, got {v!r}")
    for x in v:
        if x not in known:
            raise SuiteError(
                f"{where}: {x!r} is not in the suite.{closest(x, list(known))} The suite has: "
                f"{', '.join(known)}"
            )
    return tuple(v)


def parse_monitors(
    value: Any, entries: Sequence[OptimizerEntry], problems: Sequence[str]
) -> tuple[MonitorSpec, ...]:
    """Validate a suite's ``monitors`` list and check it fits the suite's optimizers.

    Raises:
        SuiteError: a malformed entry (the message names the field).
        UnknownNameError: an unknown monitor name.
        MonitorMismatchError: ``adam_sharpness`` on an optimizer without Adam's state.
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SuiteError(f"monitors: expected a list of {{name: ..., every: ...}}, got {value!r}")
    labels = [e.label for e in entries]
    out = []
    for i, m in enumerate(value):
        where = f"monitors[{i}]"
        m = {"name": m} if isinstance(m, str) else m
        if not isinstance(m, Mapping):
            raise SuiteError(f"{where}: expected a name or a mapping, got {m!r}")
        name = m.get("name")
        if name not in MONITOR_KINDS:
            raise UnknownNameError(
                f"{where}.name: unknown monitor {name!r}.{closest(str(name), list(MONITOR_KINDS))}"
                f" Known monitors: {', '.join(MONITOR_KINDS)}"
            )
        allowed = ("name", "every", "optimizers", "problems", *_FIELDS[name])
        for k in m:
            if k not in allowed:
                raise SuiteError(f"{where}.{k}: unknown field for {name}; allowed: {allowed}")
        spec = MonitorSpec(
            name=name,
            every=_positive(f"{where}.every", m["every"], 1) if "every" in m else None,
            optimizers=_names(f"{where}.optimizers", m["optimizers"], labels)
            if "optimizers" in m
            else (),
            problems=_names(f"{where}.problems", m["problems"], problems)
            if "problems" in m
            else (),
            max_matvecs=_positive(f"{where}.max_matvecs", m["max_matvecs"], 2)
            if "max_matvecs" in m
            else None,
            batches=_positive(f"{where}.batches", m.get("batches", 8), 2),
        )
        out.append(spec)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SuiteError(f"monitors: each monitor may appear once, got {names}")
    for spec in out:
        check_optimizer_fit(spec, entries)
    return tuple(out)


def _adam_type(entry: OptimizerEntry) -> bool:
    """Whether ``entry``'s optimizer keeps Adam's ``betas``/``eps`` and ``exp_avg_sq`` state."""
    p = torch.nn.Parameter(torch.ones(4))
    try:
        opt = make_optimizer(entry.optimizer, [p], {**entry.fixed, **entry.defaults}, seed=0)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = (p**2).sum()
            loss.backward(retain_graph=True)
            return loss

        opt.step(closure)  # type: ignore[arg-type]  # loss-mode optimizers need the tensor
    except (CurvlabError, RuntimeError, TypeError, ValueError):
        return False
    group = opt.param_groups[0]
    return "betas" in group and "eps" in group and "exp_avg_sq" in opt.state.get(p, {})


def check_optimizer_fit(spec: MonitorSpec, entries: Sequence[OptimizerEntry]) -> None:
    """Refuse ``adam_sharpness`` on an optimizer whose preconditioner it cannot read.

    Raises:
        MonitorMismatchError: names the optimizers and how to restrict the monitor.
    """
    if spec.name != "adam_sharpness":
        return
    misfits = []
    for e in entries:
        if spec.optimizers and e.label not in spec.optimizers:
            continue
        try:
            resolve_optimizer(e.optimizer)
        except UnknownNameError:  # a built-in entry not installed here: the runner skips it
            continue
        if not _adam_type(e):
            misfits.append(f"{e.label} ({e.optimizer})")
    if misfits:
        adam = [e.label for e in entries if f"{e.label} ({e.optimizer})" not in misfits]
        raise MonitorMismatchError(
            f"monitors: adam_sharpness needs an Adam-type optimizer (param group with betas and "
            f"eps, an exp_avg_sq state): {', '.join(misfits)} is not; restrict it with "
            f"optimizers: [{', '.join(adam)}] or use sharpness"
        )


def _is_minibatched(problem: Problem, inst: ProblemInstance) -> bool:
    first, second = inst.next_batch(), inst.next_batch()
    return hasattr(problem, "batch_size") and first[0] is not second[0]


def check_problem_fit(monitors: Sequence[MonitorSpec], problems: Sequence[str]) -> None:
    """Build each monitor on a seed-0 instance of every problem it applies to, before any run.

    Raises:
        MonitorMismatchError: the monitor cannot run on a problem (``noise_scale`` on a full-batch
            problem, a probe batch the monitor refuses); the message names both.
    """
    for p in problems:
        specs = [m for m in monitors if not m.problems or p in m.problems]
        if not specs:
            continue
        problem = get_problem(p)
        with _random_state_kept():
            inst = problem.build(0)
            opt = torch.optim.Adam(inst.model.parameters())
            try:
                _build(specs, problem, inst, problem.build(0), torch.Generator(), opt)
            except MonitorMismatchError:
                raise
            except CurvlabError as exc:
                names = ", ".join(m.name for m in specs)
                raise MonitorMismatchError(
                    f"monitors: {names} cannot run on problem {p!r}: {exc}; restrict the monitor "
                    "with problems: [...]"
                ) from exc


def _build(
    specs: Sequence[MonitorSpec],
    problem: Problem,
    inst: ProblemInstance,
    probe: ProblemInstance,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
) -> MonitorHandle:
    """The monitors of ``specs`` on ``inst``'s model, validated against ``optimizer``."""
    from curvlab.monitors import GradientNoiseScale, Sharpness, attach

    k = max([m.batches for m in specs if m.name == "noise_scale"], default=1)
    batches = [probe.next_batch() for _ in range(k)]
    built: list[Monitor] = []
    for m in specs:
        every = m.every or problem.eval_every
        if m.name == "noise_scale":
            if not _is_minibatched(problem, probe):
                raise MonitorMismatchError(
                    f"monitors: noise_scale needs minibatches, and problem {problem.name!r} trains "
                    "full-batch; restrict it with problems: [...] (minibatch problems only)"
                )
            pool = (
                torch.cat([b[0] for b in batches[: m.batches]]),
                torch.cat([b[1] for b in batches[: m.batches]]),
            )
            built.append(
                GradientNoiseScale(
                    inst.model,
                    inst.loss_fn,
                    pool,
                    batch_size=int(batches[0][0].shape[0]),
                    num_batches=m.batches,
                    generator=generator,
                    every=every,
                )
            )
        else:
            built.append(
                Sharpness(
                    inst.model,
                    inst.loss_fn,
                    batches[0],
                    preconditioned=m.name == "adam_sharpness",
                    max_matvecs=m.max_matvecs,
                    generator=generator,
                    every=every,
                    name=m.name,
                )
            )
    return attach(optimizer, built, None)


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore torch's, numpy's and Python's global random state on leaving."""
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)  # noqa: NPY002
            random.setstate(py_state)


class RunMonitors:
    """The monitors of one run, checked off the clock after the due steps.

    Args:
        specs: the suite's monitors (those that apply to the run are attached).
        spec: the run. problem, inst: its problem and instance. optimizer: its optimizer.
        store: where the numbers go (under ``spec.run_id``): the store or a stand-in.
    """

    def __init__(
        self,
        specs: Sequence[MonitorSpec],
        spec: RunSpec,
        problem: Problem,
        inst: ProblemInstance,
        optimizer: torch.optim.Optimizer,
        store: MonitorWriter,
    ) -> None:
        chosen = [m for m in specs if m.applies(spec.problem, spec.label)]
        self.handle: MonitorHandle | None = None
        if not chosen:
            return
        with _random_state_kept():
            generator = torch.Generator().manual_seed(spec.rng_seed)
            probe = problem.build(spec.seed)
            self.handle = _build(chosen, problem, inst, probe, generator, optimizer)
        # checks run from after_step (off the clock), never from the optimizer's step hook
        self.handle.remove()
        self.handle.sink = StoreSink(store, key=spec.run_id)

    def after_step(self, step: int) -> None:
        """Run the monitors due at ``step`` and record their numbers (off the clock)."""
        if self.handle is None:
            return
        due = [m for m in self.handle.monitors if step % m.every == 0]
        if due:
            with _random_state_kept():
                self.handle.step = step
                self.handle.check_now(due)
