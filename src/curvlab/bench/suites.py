"""Benchmark suites: which problems, which optimizers, which tracks; YAML validation; run expansion.

A suite expands into runs ``(problem, optimizer label, hyperparameters, seed)`` in two tracks, the
same protocol for every optimizer (the lesson of the Sophia threads: same script, same budget):

* ``defaults`` — one shot with the authors' default hyperparameters, ``seeds`` seeds, budget
  ``budget_factor`` × the problem's budget (AlgoPerf self-tuning ruleset: 1.5×; Crowded Valley's
  one-shot track, Schmidt, Schneider & Hennig 2021, arXiv 2007.01547), constant learning rate
  unless the track names a schedule.
* ``tuned`` — ``trials × studies`` configurations from a scrambled Halton sequence over the
  search space the optimizer's authors recommend, split into ``studies`` studies of ``trials``
  trials; every trial of study ``j`` uses seed ``j`` (AlgoPerf external tuning: 3 studies × 5
  trials, arXiv 2306.07179), the same trial budget for every optimizer, and by default linear
  warm-up (5% of the budget) then cosine decay (``tracks.tuned.schedule``/``warmup``; see
  :mod:`curvlab.bench.optimizers`). The points depend only on the suite seed and the optimizer
  label, so every problem sees the same configurations (a workload-agnostic search space).
* ``calibration`` — only in the suites ``curvlab bench calibrate`` builds (:mod:`.calibrate`):
  the reference's tuned track on its own seeds.

Seeds are disjoint across tracks: the defaults track uses ``1000·seed + s`` (s < 500), the tuned
track ``1000·seed + 500 + j`` (j < 400), the calibration ``1000·seed + 900 + j`` (j < 100), so
time-to-target is never measured on the seeds that set the targets.

**Targets.** Every problem of a suite needs a target threshold on its validation metric, set by
``curvlab bench calibrate`` and read from the suite's calibration file (:func:`targets_path`:
``<suite>.targets.yaml`` next to a YAML suite, ``curvlab/bench/targets/<name>.yaml`` for a shipped
one), or given in the suite (``targets: {problem: value}`` or ``target:`` under a problem). A suite
without one, or a calibrated target beyond what the reference reached, is refused at load time.

YAML format (every field but ``problems`` and ``optimizers`` optional)::

    name: my-suite
    seed: 0
    problems: [digits-mlp, breast-cancer-logreg]      # or a mapping name -> {budget_steps,
                                                      #   eval_every, target}
    targets: {digits-mlp: 0.95, breast-cancer-logreg: 0.1}   # unless calibrated
    optimizers:
      - adamw                                          # a built-in entry (see BUILTIN_OPTIMIZERS)
      - label: sgd-nesterov                            # or a full entry
        optimizer: sgd                                 # registry name or 'package.module:Class'
        fixed: {momentum: 0.9, nesterov: true}         # passed to every run
        defaults: {lr: 0.01}                           # the defaults track's values
        search: {lr: {low: 1.0e-3, high: 1.0, log: true}}   # or a list of choices
        problems: [digits-mlp]                         # optional: only these problems
    tracks:
      defaults: {seeds: 3, budget_factor: 1.5}        # also schedule, warmup (default constant)
      tuned: {trials: 4, studies: 2, schedule: cosine, warmup: 0.05}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlab.bench.optimizers import (
    check_schedule,
    constructor_kwargs,
    resolve_optimizer,
)
from curvlab.bench.problems import PROBLEMS, closest, get_problem
from curvlab.errors import CurvlabError, ImportNotAllowedError, SuiteError, UnknownNameError

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "MAX_RUNS",
    "MAX_SEEDS",
    "MAX_STEPS",
    "SUITES",
    "TRUSTED_IMPORTS",
    "SEED_BASES",
    "OptimizerEntry",
    "RunSpec",
    "SearchDim",
    "Suite",
    "expand_runs",
    "load_suite",
    "parse_suite",
    "problem_infos",
    "targets_path",
]


#: Caps on a suite's counts: seeds, trials and studies each; runs in all; steps of a problem.
MAX_SEEDS = 1000
MAX_RUNS = 100_000
MAX_STEPS = 10_000_000
#: Track -> offset of its seeds (``1000·seed + offset + j``); each track's count stays below the
#: next offset, so the tracks' seeds are disjoint.
SEED_BASES = {"defaults": 0, "tuned": 500, "calibration": 900}
_SEED_LIMITS = {"defaults": 500, "tuned": 400, "calibration": 100}
#: The tuned track's schedule unless the suite says otherwise: 5% linear warm-up, cosine decay.
TUNED_SCHEDULE = {"schedule": "cosine", "warmup": 0.05}
#: ``module:Class`` optimizers from these packages need no ``allow_import`` (installed code).
TRUSTED_IMPORTS = ("torch.optim:", "torch.optim.", "curvlab.optim:", "curvlab.optim.")


@dataclass(frozen=True)
class SearchDim:
    """A hyperparameter's search range: ``[low, high]`` (log-uniform if ``log``) or ``choices``."""

    low: float = 0.0
    high: float = 0.0
    log: bool = True
    choices: tuple[Any, ...] = ()

    def value(self, u: float) -> Any:
        """Map a unit-interval coordinate ``u`` to a value of this dimension."""
        if self.choices:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.log:
            return float(
                math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            )
        return float(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class OptimizerEntry:
    """An optimizer as a suite uses it: label, optimizer name and hyperparameter policy.

    ``problems`` restricts the entry to those problems (empty: every problem of the suite).
    """

    label: str
    optimizer: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    search: Mapping[str, SearchDim] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def _lr(low: float, high: float) -> dict[str, SearchDim]:
    return {"lr": SearchDim(low, high, log=True)}


def _adam_like(low: float, high: float, beta2: tuple[float, ...]) -> dict[str, SearchDim]:
    """The Adam family's search: lr (log), decoupled weight decay (log), beta2 (choices)."""
    return {
        **_lr(low, high),
        "weight_decay": SearchDim(1e-5, 1e-1, log=True),
        "beta2": SearchDim(choices=beta2),
    }


def _sophia(estimator: str, rho: float) -> OptimizerEntry:
    """SophiaG (``gnb``) or SophiaH (``hutchinson``): the authors' defaults, lr and rho searched."""
    label = {"gnb": "sophiag", "hutchinson": "sophiah"}[estimator]
    search = {**_lr(1e-4, 1e-1), "rho": SearchDim(5e-3, 0.5, log=True)}
    return OptimizerEntry(label, "sophia", {"estimator": estimator}, {"rho": rho}, search)


#: DoG and LDoG: c = 1 and no schedule, only r_eps searched (see below).
_DOG_FIXED = {"lr": 1.0, "schedule": "constant"}
_DOG_SEARCH = {"reps_rel": SearchDim(1e-8, 1e-4, log=True)}

#: Built-in entries: the authors' defaults (the defaults track) and the search space they recommend
#: (the tuned track) of each optimizer. AdamW and ADOPT: lr, weight decay, beta2; SGD with
#: momentum: lr and momentum; Sophia: lr and rho (Liu et al. 2023); DoG/LDoG: c = lr = 1 fixed as
#: the authors prescribe (Ivgi, Hinder & Carmon 2023), only the initial movement r_eps (reps_rel)
#: searched, and a constant schedule in every track: DoG is a schedule-free step size, and a
#: multiplier on c also slows the distance r_t that sets DoG's step (on the quick suite, warm-up +
#: cosine left tuned DoG short of every target in 60 of 60 runs, cosine alone in 58 of 60). SophiaG (Gauss-Newton-Bartlett, needs logits, the language-model choice) and SophiaH
#: (Hutchinson, any loss) are separate entries; their defaults are the authors' (lr 1e-4, betas
#: (0.965, 0.99), weight decay 0.1, k = 10; rho 0.04 for SophiaG as in the official code, 0.01 for
#: SophiaH as in the authors' levanter code).
BUILTIN_OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(
        "adamw",
        "adamw",
        {},
        {"lr": 1e-3, "weight_decay": 1e-2},
        _adam_like(1e-4, 3e-1, (0.95, 0.99, 0.999)),
    ),
    "adam": OptimizerEntry(
        "adam",
        "adam",
        {},
        {"lr": 1e-3},
        {**_lr(1e-4, 3e-1), "beta2": SearchDim(choices=(0.95, 0.99, 0.999))},
    ),
    "sgd-momentum": OptimizerEntry(
        "sgd-momentum",
        "sgd",
        {},
        {"lr": 1e-2, "momentum": 0.9},
        {**_lr(1e-3, 1.0), "momentum": SearchDim(choices=(0.5, 0.9, 0.95, 0.99))},
    ),
    "sgd": OptimizerEntry("sgd", "sgd", {}, {"lr": 1e-2}, _lr(1e-3, 3.0)),
    "adopt": OptimizerEntry(
        "adopt",
        "adopt",
        {"decouple": True},
        {"lr": 1e-3},
        _adam_like(1e-4, 3e-1, (0.99, 0.999, 0.9999)),
    ),
    "sophiag": _sophia("gnb", 0.04),
    "sophiah": _sophia("hutchinson", 0.01),
    "adahessian": OptimizerEntry("adahessian", "adahessian", {}, {}, _lr(1e-3, 1.0)),
    "dog": OptimizerEntry("dog", "dog", _DOG_FIXED, {}, _DOG_SEARCH),
    "ldog": OptimizerEntry("ldog", "ldog", _DOG_FIXED, {}, _DOG_SEARCH),
    "psgdkron": OptimizerEntry("psgdkron", "psgdkron", {}, {}, _lr(1e-4, 3e-1)),
    "mfac": OptimizerEntry("mfac", "mfac", {}, {}, _lr(1e-4, 3e-1)),
    "frugal": OptimizerEntry("frugal", "frugal", {}, {}, _lr(1e-4, 3e-1)),
    # torch's own optimizers, always available (useful while the registry is being filled).
    "torch-adamw": OptimizerEntry(
        "torch-adamw", "torch.optim:AdamW", {"weight_decay": 0.0}, {"lr": 1e-3}, _lr(1e-4, 3e-1)
    ),
    "torch-sgd-momentum": OptimizerEntry(
        "torch-sgd-momentum", "torch.optim:SGD", {"momentum": 0.9}, {"lr": 1e-2}, _lr(1e-3, 1.0)
    ),
}


@dataclass(frozen=True)
class Suite:
    """A validated suite (see the module docstring for the YAML form).

    ``targets`` maps each problem to its target threshold; ``schedules`` maps a track to the
    schedule keys its runs get (``{"tuned": {"schedule": "cosine", "warmup": 0.05}}``);
    ``calibration`` is the provenance of calibrated targets (empty when the suite gave them).
    """

    name: str
    problems: tuple[str, ...]
    optimizers: tuple[OptimizerEntry, ...]
    seed: int = 0
    default_seeds: int = 3
    budget_factor: float = 1.5
    trials: int = 4
    studies: int = 2
    tracks: tuple[str, ...] = ("defaults", "tuned")
    problem_overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    monitors: tuple[Any, ...] = ()  # curvlab.bench.monitoring.MonitorSpec
    targets: Mapping[str, float] = field(default_factory=dict)
    schedules: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: {"tuned": dict(TUNED_SCHEDULE)}
    )
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """A canonical JSON form (stored with the runs)."""
        return json.dumps(asdict(self), sort_keys=True, default=str)


@dataclass(frozen=True)
class RunSpec:
    """One run: a problem, an optimizer with hyperparameters, a seed, its place in the tracks."""

    problem: str
    label: str
    optimizer: str
    hparams: Mapping[str, Any]
    seed: int
    track: str
    study: int
    trial: int
    budget_steps: int
    eval_every: int
    target: float = math.nan

    @property
    def run_id(self) -> str:
        """Content hash of the run's definition: rerunning a suite finds the same ids."""
        key = json.dumps(
            [
                self.problem,
                self.label,
                self.optimizer,
                dict(self.hparams),
                self.seed,
                self.track,
                self.study,
                self.trial,
                self.budget_steps,
                self.eval_every,
                self.target,
            ],
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    @property
    def rng_seed(self) -> int:
        """The run's random seed (global generators, optimizer probes): a hash of its place.

        It depends on the problem, the optimizer, the track, study, trial and seed, not on the
        hyperparameters, so a tuned track's trials share their random numbers.
        """
        key = json.dumps(
            [
                self.problem,
                self.label,
                self.optimizer,
                self.track,
                self.study,
                self.trial,
                self.seed,
            ]
        )
        return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


# ----------------------------------------------------------------------------------------------
# validation


def _fail(where: str, msg: str) -> SuiteError:
    return SuiteError(f"{where}: {msg}")


def _int(where: str, v: Any, low: int = 0, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _fail(where, f"expected an integer >= {low}, got {v!r}")
    if high is not None and v > high:
        raise _fail(where, f"{v} is above the limit of {high}; split the work into several suites")
    return v


def _num(where: str, v: Any, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(where, f"expected a number, got {v!r}")
    if positive and v <= 0:
        raise _fail(where, f"expected a positive number, got {v!r}")
    return float(v)


def _mapping(where: str, v: Any) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _fail(where, f"expected a mapping, got {type(v).__name__} {v!r}")
    for k in v:
        if not isinstance(k, str):
            raise _fail(where, f"keys must be strings, got {k!r}")
    return v


def _check_keys(where: str, m: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for k in m:
        if k not in allowed:
            raise _fail(
                f"{where}.{k}",
                f"unknown field.{closest(k, list(allowed))} Allowed: {', '.join(allowed)}",
            )


def _search(where: str, v: Any) -> dict[str, SearchDim]:
    out: dict[str, SearchDim] = {}
    for name, dim in _mapping(where, v).items():
        w = f"{where}.{name}"
        if isinstance(dim, list):
            if not dim:
                raise _fail(w, "a list of choices must not be empty")
            out[name] = SearchDim(choices=tuple(dim))
            continue
        d = _mapping(w, dim)
        _check_keys(w, d, ("low", "high", "log"))
        if "low" not in d or "high" not in d:
            raise _fail(w, "needs 'low' and 'high' (or give a list of choices)")
        log = d.get("log", True)
        if not isinstance(log, bool):
            raise _fail(f"{w}.log", f"expected true or false, got {log!r}")
        low = _num(f"{w}.low", d["low"], positive=log)
        high = _num(f"{w}.high", d["high"], positive=log)
        if high < low:
            raise _fail(w, f"high ({high:g}) is below low ({low:g})")
        out[name] = SearchDim(low, high, log)
    return out


def _optimizer_entry(where: str, v: Any, allow_import: bool) -> OptimizerEntry:
    if isinstance(v, str):
        if v in BUILTIN_OPTIMIZERS:
            return BUILTIN_OPTIMIZERS[v]
        raise _fail(
            where,
            f"no built-in entry {v!r}.{closest(v, list(BUILTIN_OPTIMIZERS))} Built-in: "
            f"{', '.join(sorted(BUILTIN_OPTIMIZERS))}; or give a mapping with label, optimizer, "
            "fixed, defaults, search",
        )
    m = _mapping(where, v)
    _check_keys(where, m, ("label", "optimizer", "fixed", "defaults", "search", "problems"))
    base = BUILTIN_OPTIMIZERS.get(str(m.get("optimizer", m.get("label", ""))))
    label = m.get("label", m.get("optimizer"))
    if not isinstance(label, str) or not label:
        raise _fail(f"{where}.label", "an optimizer entry needs a 'label' or an 'optimizer' name")
    opt = m.get("optimizer", base.optimizer if base else label)
    if not isinstance(opt, str):
        raise _fail(f"{where}.optimizer", f"expected a name, got {opt!r}")
    if base is not None and opt == base.label:
        opt = base.optimizer
    if ":" in opt and not allow_import and not opt.startswith(TRUSTED_IMPORTS):
        raise ImportNotAllowedError(
            f"{where}.optimizer: {opt!r} imports and runs Python code from the suite; if you trust "
            "it, pass --allow-import (allow_import=True), or name a registered optimizer"
        )
    fixed = dict(_mapping(f"{where}.fixed", m.get("fixed", base.fixed if base else {})))
    defaults = dict(_mapping(f"{where}.defaults", m.get("defaults", base.defaults if base else {})))
    search = (
        _search(f"{where}.search", m["search"])
        if "search" in m
        else dict(base.search if base else {})
    )
    # a fixed value holds in every run: it replaces the inherited default and search dimension,
    # and may not also be given as a default or a search dimension of the entry itself
    for key in fixed:
        for part, given in (("defaults", defaults), ("search", search)):
            if key in given and part in m:
                raise _fail(
                    f"{where}.fixed.{key}",
                    f"also given in {part}; a hyperparameter is either fixed or in {part}",
                )
            given.pop(key, None)
    only = m.get("problems", list(base.problems) if base else [])
    if not isinstance(only, list) or not all(isinstance(x, str) for x in only):
        raise _fail(f"{where}.problems", f"expected a list of problem names, got {only!r}")
    return OptimizerEntry(label, opt, fixed, defaults, search, tuple(only))


def _refusal(cls: type, fields: Mapping[str, Any]) -> Exception | None:
    """The exception ``cls`` raises when built on a dummy parameter with ``fields`` (paths such as
    ``fixed.lr`` -> value), if any."""
    hparams = {f.split(".", 1)[1]: v for f, v in fields.items()}
    try:
        check_schedule(hparams)
        cls([torch.nn.Parameter(torch.zeros(16, 16))], **constructor_kwargs(cls, hparams))
    except (CurvlabError, ValueError, TypeError) as exc:
        return exc
    return None


def _check_hyperparameters(where: str, e: OptimizerEntry) -> None:
    """Build the optimizer with every value the suite can give it; name the first it refuses.

    A built-in entry whose optimizer is not installed here is left to the runner (skipped with a
    note); any other unknown optimizer raises now.
    """
    try:
        cls = resolve_optimizer(e.optimizer)
    except UnknownNameError as exc:
        if BUILTIN_OPTIMIZERS.get(e.label) == e:
            return
        raise UnknownNameError(f"{where}.optimizer: {exc}") from exc
    # every value set a run can get: the defaults track's, and each search value with the fixed
    fixed = {f"fixed.{k}": v for k, v in e.fixed.items()}
    combos = [{**fixed, **{f"defaults.{k}": v for k, v in e.defaults.items()}}]
    for name, dim in e.search.items():
        combos += [{**fixed, f"search.{name}": v} for v in dim.choices or (dim.low, dim.high)]
    for combo in combos:
        refused = _refusal(cls, combo)
        if refused is None:
            continue
        # blame the first field without which the rest is accepted
        culprit = next((f for f in combo if _refusal(cls, _without(combo, f)) is None), None)
        shown = {f.split(".", 1)[1]: v for f, v in combo.items()}
        raise _fail(
            f"{where}.{culprit}" if culprit else where,
            f"{e.optimizer} refuses {shown}: {type(refused).__name__}: {refused}",
        )


def _without(combo: Mapping[str, Any], field: str) -> dict[str, Any]:
    return {f: v for f, v in combo.items() if f != field}


def _track_schedule(
    where: str, track: Mapping[str, Any], default: Mapping[str, Any]
) -> dict[str, Any]:
    """The schedule keys of a track's runs (``schedule``, ``warmup``), checked."""
    sched = {**default, **{k: track[k] for k in ("schedule", "warmup") if k in track}}
    try:
        check_schedule(sched)
    except CurvlabError as exc:
        raise _fail(where, str(exc)) from None
    return sched if sched.get("schedule", "constant") != "constant" else {}


def _more_demanding(threshold: float, reference: float, higher_is_better: bool) -> float:
    """How far ``threshold`` lies beyond ``reference`` in the metric's better direction (<= 0:
    not beyond)."""
    return threshold - reference if higher_is_better else reference - threshold


def _targets(
    top: Mapping[str, Any],
    names: Sequence[str],
    budgets: Mapping[str, int],
    inline: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
) -> dict[str, float]:
    """Each problem's target threshold from the suite (``targets``, ``problems.<p>.target``) or its
    calibration file, with the calibration's consistency checks."""
    given = dict(_mapping("targets", top.get("targets")))
    for p, v in inline.items():
        if p in given:
            raise _fail(f"problems.{p}.target", "also given in 'targets'; give it once")
        given[p] = v
    out: dict[str, float] = {}
    for p, v in given.items():
        if p not in names:
            raise _fail(f"targets.{p}", f"not a problem of this suite ({', '.join(names)})")
        out[p] = _num(f"targets.{p}", v)
    cal = _mapping("calibration.targets", (calibration or {}).get("targets"))
    for p, entry in cal.items():
        if p not in names:
            continue  # a problem since dropped from the suite
        where = f"calibration.targets.{p}"
        e = _mapping(where, entry)
        if p in out:
            raise _fail(
                f"targets.{p}",
                "is also calibrated (the suite's targets file); remove one of the two",
            )
        target = get_problem(p).target
        if e.get("metric") != target.metric:
            raise _fail(
                where,
                f"calibrated on the metric {e.get('metric')!r} but the problem's target metric is "
                f"{target.metric!r}; run `curvlab bench calibrate` again",
            )
        budget = _int(f"{where}.budget_steps", e.get("budget_steps"), 1)
        if budget != budgets[p]:
            raise _fail(
                where,
                f"calibrated for a budget of {budget} steps but the suite gives {budgets[p]}; run "
                "`curvlab bench calibrate` again",
            )
        threshold = _num(f"{where}.threshold", e.get("threshold"))
        reference = _num(f"{where}.reference_value", e.get("reference_value"))
        beyond = _more_demanding(threshold, reference, target.higher_is_better)
        if beyond > 0:
            raise _fail(
                where,
                f"the target {target.metric} {'>=' if target.higher_is_better else '<='} "
                f"{threshold:g} is beyond what the reference reached ({reference:g}) by "
                f"{beyond:g}; the reference never reaches it: loosen it or run `curvlab bench "
                "calibrate` again",
            )
        out[p] = threshold
    return out


def parse_suite(
    data: Any,
    source: str = "suite",
    *,
    allow_import: bool = False,
    calibration: Mapping[str, Any] | None = None,
    require_targets: bool = True,
) -> Suite:
    """Validate a suite given as plain data (the parsed YAML) and return a :class:`Suite`.

    Every hyperparameter the suite can give an optimizer (fixed, defaults, the ends of each search
    range, every choice) is tried on a dummy parameter, so a value the optimizer refuses is an
    error here, before anything runs. Counts are bounded (:data:`MAX_SEEDS`, :data:`MAX_RUNS`,
    and per track below the next track's seeds, :data:`SEED_BASES`). Every problem needs a
    target, given in the suite or calibrated (``calibration``, the parsed targets file).

    Args:
        data: the parsed YAML.
        source: where it came from (the messages' prefix).
        allow_import: allow entries ``optimizer: "module:Class"`` outside ``torch.optim`` and
            ``curvlab.optim`` (they import and run code named by the suite).
        calibration: the suite's calibration (``curvlab bench calibrate``'s targets file), if any.
        require_targets: refuse a problem without a target (``calibrate`` itself passes False).

    Raises:
        SuiteError: the message starts with the path of the bad field, e.g.
            ``"s.yaml: tracks.tuned.trials: expected an integer >= 1, got 0"``; a problem without
            a target (it says to run ``curvlab bench calibrate``); a calibrated target beyond what
            the reference reached (it says by how much).
        ImportNotAllowedError: a ``module:Class`` optimizer without ``allow_import``.
        UnknownNameError: an unknown problem or optimizer name (lists the known ones).

    Example:
        >>> s = parse_suite({"problems": ["digits-mlp"], "optimizers": ["adamw"],
        ...                  "targets": {"digits-mlp": 0.95}})
        >>> (s.problems, s.optimizers[0].label, s.targets)
        (('digits-mlp',), 'adamw', {'digits-mlp': 0.95})
        >>> bad = {"problems": ["digits-mlp"], "optimizers": ["adamw"],
        ...        "tracks": {"tuned": {"trials": 0}}}
        >>> parse_suite(bad, require_targets=False)
        Traceback (most recent call last):
        ...
        curvlab.errors.SuiteError: suite: tracks.tuned.trials: expected an integer >= 1, got 0
    """
    try:
        top = _mapping("(top level)", data)
        _check_keys(
            "(top level)",
            top,
            ("name", "seed", "problems", "optimizers", "tracks", "monitors", "targets"),
        )
        name = top.get("name", Path(source).stem)
        if not isinstance(name, str):
            raise _fail("name", f"expected a string, got {name!r}")
        seed = _int("seed", top.get("seed", 0))
        probs = top.get("problems")
        if probs is None:
            raise _fail("problems", "missing: list the problems to run (see `curvlab bench list`)")
        overrides: dict[str, dict[str, int]] = {}
        inline_targets: dict[str, Any] = {}
        if isinstance(probs, Mapping):
            names = list(probs)
            for p, ov in probs.items():
                ovm = _mapping(f"problems.{p}", ov)
                _check_keys(f"problems.{p}", ovm, ("budget_steps", "eval_every", "target"))
                if "target" in ovm:
                    inline_targets[p] = ovm["target"]
                overrides[p] = {
                    k: _int(f"problems.{p}.{k}", x, 1, MAX_STEPS)
                    for k, x in ovm.items()
                    if k != "target"
                }
        elif isinstance(probs, list):
            names = probs
        else:
            raise _fail("problems", f"expected a list or mapping of problem names, got {probs!r}")
        if not names:
            raise _fail("problems", "is empty")
        for i, p in enumerate(names):
            if not isinstance(p, str):
                raise _fail(f"problems[{i}]", f"expected a problem name, got {p!r}")
            if p not in PROBLEMS:
                known = sorted(PROBLEMS)
                raise UnknownNameError(
                    f"{source}: problems[{i}]: unknown problem {p!r}.{closest(p, known)} "
                    f"Known problems: {', '.join(known)}"
                )
        opts = top.get("optimizers")
        if not isinstance(opts, list) or not opts:
            raise _fail("optimizers", f"expected a non-empty list, got {opts!r}")
        entries = tuple(
            _optimizer_entry(f"optimizers[{i}]", o, allow_import) for i, o in enumerate(opts)
        )
        labels = [e.label for e in entries]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise _fail(
                "optimizers", f"duplicate labels {sorted(dup)}; give each entry a distinct 'label'"
            )
        for i, e in enumerate(entries):
            _check_hyperparameters(f"optimizers[{i}]", e)
            for p in e.problems:
                if p not in PROBLEMS:
                    raise _fail(
                        f"optimizers[{i}].problems",
                        f"unknown problem {p!r}.{closest(p, sorted(PROBLEMS))}",
                    )
        tracks = _mapping("tracks", top.get("tracks", {"defaults": {}, "tuned": {}}))
        _check_keys("tracks", tracks, ("defaults", "tuned"))
        d = _mapping("tracks.defaults", tracks.get("defaults"))
        _check_keys("tracks.defaults", d, ("seeds", "budget_factor", "schedule", "warmup"))
        t = _mapping("tracks.tuned", tracks.get("tuned"))
        _check_keys("tracks.tuned", t, ("trials", "studies", "schedule", "warmup"))
        for e_i, e in enumerate(entries):
            if "tuned" in tracks and not e.search:
                raise _fail(
                    f"optimizers[{e_i}].search",
                    f"{e.label!r} has no search space for the tuned track",
                )
        budgets = {
            p: overrides.get(p, {}).get("budget_steps", get_problem(p).budget_steps) for p in names
        }
        targets = _targets(top, names, budgets, inline_targets, calibration)
        suite = Suite(
            name=name,
            problems=tuple(names),
            optimizers=entries,
            seed=seed,
            default_seeds=_int(
                "tracks.defaults.seeds", d.get("seeds", 3), 1, _SEED_LIMITS["defaults"]
            ),
            budget_factor=_num("tracks.defaults.budget_factor", d.get("budget_factor", 1.5), True),
            trials=_int("tracks.tuned.trials", t.get("trials", 4), 1, MAX_SEEDS),
            studies=_int("tracks.tuned.studies", t.get("studies", 2), 1, _SEED_LIMITS["tuned"]),
            tracks=tuple(k for k in ("defaults", "tuned") if k in tracks),
            problem_overrides=overrides,
            monitors=_monitors(top.get("monitors"), entries, names),
            targets=targets,
            schedules={
                "defaults": _track_schedule("tracks.defaults", d, {}),
                "tuned": _track_schedule("tracks.tuned", t, TUNED_SCHEDULE),
            },
            calibration=dict(calibration or {}),
        )
        per_entry = ("defaults" in suite.tracks) * suite.default_seeds + (
            "tuned" in suite.tracks
        ) * suite.trials * suite.studies
        total = len(names) * len(entries) * per_entry
        if total > MAX_RUNS:
            raise _fail(
                "tracks",
                f"the suite expands to {total} runs, above the limit of {MAX_RUNS}; use fewer "
                "seeds, trials, studies, problems or optimizers",
            )
        missing = [p for p in names if p not in targets]
        if require_targets and missing:
            raise _fail(
                "targets",
                f"no target for {', '.join(missing)}; run `curvlab bench calibrate --suite "
                f"{source} --store PATH` (it sets each target from tuned AdamW), or give "
                "'targets: {problem: value}'",
            )
        return suite
    except (SuiteError, UnknownNameError) as exc:
        if str(exc).startswith(f"{source}: "):
            raise
        raise type(exc)(f"{source}: {exc}") from None


def _monitors(
    value: Any, entries: Sequence[OptimizerEntry], problems: Sequence[str]
) -> tuple[Any, ...]:
    """The suite's ``monitors`` list, validated (:func:`curvlab.bench.monitoring.parse_monitors`)."""
    from curvlab.bench.monitoring import parse_monitors

    return parse_monitors(value, entries, problems)


QUICK: dict[str, Any] = {
    "name": "quick",
    "seed": 0,
    "problems": ["quadratic-k1e4", "breast-cancer-logreg", "digits-softmax", "digits-mlp"],
    "optimizers": ["adamw", "sgd-momentum", "adopt", "sophiah", "dog"],
    # an odd number of studies, so that the median over studies is one study's time (AlgoPerf: 3)
    "tracks": {
        "defaults": {"seeds": 3, "budget_factor": 1.5},
        "tuned": {"trials": 5, "studies": 3},
    },
    "monitors": [{"name": "sharpness", "every": 50}],
}

STANDARD: dict[str, Any] = {
    "name": "standard",
    "seed": 0,
    "problems": [
        "quadratic-k1e2",
        "quadratic-k1e4",
        "breast-cancer-logreg",
        "digits-softmax",
        "digits-mlp",
        "fashion-cnn",
        "charlm-pydoc",
    ],
    "optimizers": [
        "adamw",
        "sgd-momentum",
        "adopt",
        {"label": "sophiag", "problems": ["charlm-pydoc"]},
        "sophiah",
        "dog",
    ],
    "tracks": {
        "defaults": {"seeds": 3, "budget_factor": 1.5},
        "tuned": {"trials": 5, "studies": 3},
    },
}

#: Named suites. ``quick`` needs only data shipped with the Python dependencies (``make demo``);
#: ``standard`` also needs Debian's dataset-fashion-mnist. Their calibrated targets ship in
#: ``curvlab/bench/targets/<name>.yaml``.
SUITES: dict[str, dict[str, Any]] = {"quick": QUICK, "standard": STANDARD}


def targets_path(name_or_path: str) -> Path:
    """Where the calibrated targets of a suite live: ``curvlab/bench/targets/<name>.yaml`` for a
    shipped suite, ``<stem>.targets.yaml`` next to a YAML suite file.

    Example:
        >>> targets_path("my/suite.yaml").as_posix()
        'my/suite.targets.yaml'
    """
    if name_or_path in SUITES:
        return Path(__file__).parent / "targets" / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    return path.with_name(f"{path.stem}.targets.yaml")


def _read_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the {what}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: {_yaml_problem(exc)}") from exc


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML parser error: where it is and what is wrong (no caret drawing)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {' '.join(str(problem).split())}"


def load_suite(
    name_or_path: str, *, allow_import: bool = False, require_targets: bool = True
) -> Suite:
    """A named suite (``quick``, ``standard``) or a YAML file, validated (:func:`parse_suite`),
    with its calibrated targets (:func:`targets_path`) when the file exists.

    Raises:
        ImportNotAllowedError: a ``module:Class`` optimizer without ``allow_import``.
        SuiteError: unreadable or invalid file (message points at the field); a problem without a
            target (run ``curvlab bench calibrate``), or a calibrated target the reference never
            reached.
        UnknownNameError: neither a known suite name nor an existing file.
    """
    if name_or_path in SUITES:
        data, source = SUITES[name_or_path], name_or_path
    else:
        path = Path(name_or_path)
        if not path.exists():
            known = sorted(SUITES)
            raise UnknownNameError(
                f"unknown suite {name_or_path!r}.{closest(name_or_path, known)} Give one of "
                f"{', '.join(known)} or the path of a YAML suite file"
            )
        data, source = _read_yaml(path, "suite file"), str(path)
    cal_path = targets_path(name_or_path)
    calibration = _read_yaml(cal_path, "targets file") if cal_path.exists() else None
    if calibration is not None and not isinstance(calibration, Mapping):
        raise SuiteError(f"{cal_path}: expected a mapping with 'targets'; run calibrate again")
    return parse_suite(
        data,
        source,
        allow_import=allow_import,
        calibration=calibration,
        require_targets=require_targets,
    )


def problem_infos(suite: Suite) -> dict[str, dict[str, Any]]:
    """Each problem's declared metadata with the suite's overrides and target threshold (NaN
    where the suite has none), as the store records it.

    Example:
        >>> s = parse_suite({"problems": ["digits-mlp"], "optimizers": ["adamw"],
        ...                  "targets": {"digits-mlp": 0.95}})
        >>> problem_infos(s)["digits-mlp"]["target_threshold"]
        0.95
    """
    out = {}
    for p in suite.problems:
        info = get_problem(p).info()
        info.update(suite.problem_overrides.get(p, {}))
        info["target_threshold"] = float(suite.targets.get(p, math.nan))
        cal = _mapping("calibration.targets", suite.calibration.get("targets")).get(p)
        if cal is not None:
            info["target_calibration"] = {
                **dict(_mapping("calibration.provenance", suite.calibration.get("provenance"))),
                **dict(cal),
            }
        out[p] = info
    return out


def _unit_points(n: int, d: int, seed: int) -> list[list[float]]:
    if d == 0:
        return [[] for _ in range(n)]
    from scipy.stats import qmc

    return qmc.Halton(d=d, scramble=True, seed=seed).random(n).tolist()  # type: ignore[no-any-return]


def expand_runs(suite: Suite, problem_info: Mapping[str, Mapping[str, Any]]) -> list[RunSpec]:
    """All runs of ``suite``; ``problem_info[name]`` supplies ``budget_steps`` and ``eval_every``.

    Runs are ordered problem by problem, defaults track first, so partial results are usable early.
    Every run carries its problem's target threshold (NaN where the suite has none) and its
    track's schedule (:attr:`Suite.schedules`) under the entry's own values.
    """
    runs: list[RunSpec] = []
    for p in suite.problems:
        info = {**problem_info[p], **suite.problem_overrides.get(p, {})}
        budget, every = int(info["budget_steps"]), int(info["eval_every"])
        target = float(suite.targets.get(p, math.nan))
        for e in suite.optimizers:
            if e.problems and p not in e.problems:
                continue
            for track in suite.tracks:
                base = suite.seed * 1000 + SEED_BASES[track]
                sched = suite.schedules.get(track, {})
                if track == "defaults":
                    hp = {**sched, **e.fixed, **e.defaults}
                    steps = math.ceil(suite.budget_factor * budget)
                    for s in range(suite.default_seeds):
                        runs.append(
                            RunSpec(
                                p,
                                e.label,
                                e.optimizer,
                                hp,
                                base + s,
                                track,
                                s,
                                0,
                                steps,
                                every,
                                target,
                            )
                        )
                    continue
                dims = sorted(e.search)
                pts = _unit_points(
                    suite.trials * suite.studies, len(dims), suite.seed * 7919 + len(dims)
                )
                for j in range(suite.studies):
                    for k in range(suite.trials):
                        u = pts[j * suite.trials + k]
                        hp = {
                            **sched,
                            **e.fixed,
                            **{n: e.search[n].value(x) for n, x in zip(dims, u)},
                        }
                        runs.append(
                            RunSpec(
                                p,
                                e.label,
                                e.optimizer,
                                hp,
                                base + j,
                                track,
                                j,
                                k,
                                budget,
                                every,
                                target,
                            )
                        )
    return runs
