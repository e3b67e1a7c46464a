"""Benchmark suites: which problems, which optimizers, which tracks; YAML validation; run expansion.

A suite expands into runs ``(problem, optimizer label, hyperparameters, seed)`` in two tracks, the
same protocol for every optimizer (the lesson of the Sophia threads: same script, same budget):

* ``defaults`` — one shot with the optimizer's declared default hyperparameters, ``seeds`` seeds,
  budget ``budget_factor`` × the problem's budget (AlgoPerf self-tuning ruleset: 1.5×; Crowded
  Valley's one-shot track, Schmidt, Schneider & Hennig 2021, arXiv 2007.01547).
* ``tuned`` — ``trials × studies`` configurations from a scrambled Halton sequence over the
  declared search space, split into ``studies`` studies of ``trials`` trials; every trial of study
  ``j`` uses seed ``j`` (AlgoPerf external tuning: 3 studies × 5 trials, arXiv 2306.07179). The
  points depend only on the suite seed and the optimizer label, so every problem sees the same
  configurations (a workload-agnostic search space).

YAML format (every field but ``problems`` and ``optimizers`` optional)::

    name: my-suite
    seed: 0
    problems: [digits-mlp, breast-cancer-logreg]      # or a mapping name -> {budget_steps,
    eval_every}
    optimizers:
      - adamw                                          # a built-in entry (see BUILTIN_OPTIMIZERS)
      - label: sgd-nesterov                            # or a full entry
        optimizer: sgd                                 # registry name or 'package.module:Class'
        fixed: {momentum: 0.9, nesterov: true}         # passed to every run
        defaults: {lr: 0.01}                           # the defaults track's values
        search: {lr: {low: 1.0e-3, high: 1.0, log: true}}   # or a list of choices
    tracks:
      defaults: {seeds: 3, budget_factor: 1.5}
      tuned: {trials: 4, studies: 2}
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

from curvlab.bench.optimizers import resolve_optimizer
from curvlab.bench.problems import PROBLEMS, closest
from curvlab.errors import CurvlabError, ImportNotAllowedError, SuiteError, UnknownNameError

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "MAX_RUNS",
    "MAX_SEEDS",
    "MAX_STEPS",
    "SUITES",
    "TRUSTED_IMPORTS",
    "OptimizerEntry",
    "RunSpec",
    "SearchDim",
    "Suite",
    "expand_runs",
    "load_suite",
    "parse_suite",
]


#: Caps on a suite's counts: seeds, trials and studies each; runs in all; steps of a problem.
MAX_SEEDS = 1000
MAX_RUNS = 100_000
MAX_STEPS = 10_000_000
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
    """An optimizer as a suite uses it: label, optimizer name and hyperparameter policy."""

    label: str
    optimizer: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    search: Mapping[str, SearchDim] = field(default_factory=dict)


def _lr(low: float, high: float) -> dict[str, SearchDim]:
    return {"lr": SearchDim(low, high, log=True)}


#: Built-in entries: the declared defaults and search space of each optimizer. Weight decay is fixed
#: to 0 because the problems carry their own regularisation (the convex problems' f* assumes it).
BUILTIN_OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry("adamw", "adamw", {"weight_decay": 0.0}, {"lr": 1e-3}, _lr(1e-4, 3e-1)),
    "adam": OptimizerEntry("adam", "adam", {}, {"lr": 1e-3}, _lr(1e-4, 3e-1)),
    "sgd-momentum": OptimizerEntry(
        "sgd-momentum", "sgd", {"momentum": 0.9}, {"lr": 1e-2}, _lr(1e-3, 1.0)
    ),
    "sgd": OptimizerEntry("sgd", "sgd", {}, {"lr": 1e-2}, _lr(1e-3, 3.0)),
    "adopt": OptimizerEntry("adopt", "adopt", {"weight_decay": 0.0}, {"lr": 1e-3}, _lr(1e-4, 3e-1)),
    # SophiaH (Hutchinson HVPs) works on every problem; SophiaG's Gauss-Newton-Bartlett estimator
    # needs logits, so it fails on the regression problems (recorded as failed runs).
    "sophia": OptimizerEntry(
        "sophia", "sophia", {"weight_decay": 0.0, "estimator": "hutchinson"}, {}, _lr(1e-4, 3e-1)
    ),
    "sophiag": OptimizerEntry(
        "sophiag", "sophia", {"weight_decay": 0.0, "estimator": "gnb"}, {}, _lr(1e-4, 3e-1)
    ),
    "adahessian": OptimizerEntry(
        "adahessian", "adahessian", {"weight_decay": 0.0}, {}, _lr(1e-3, 1.0)
    ),
    "dog": OptimizerEntry("dog", "dog", {}, {}, _lr(0.1, 10.0)),
    "ldog": OptimizerEntry("ldog", "ldog", {}, {}, _lr(0.1, 10.0)),
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
    """A validated suite (see the module docstring for the YAML form)."""

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
    _check_keys(where, m, ("label", "optimizer", "fixed", "defaults", "search"))
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
    return OptimizerEntry(label=label, optimizer=opt, fixed=fixed, defaults=defaults, search=search)


def _refusal(cls: type, fields: Mapping[str, Any]) -> Exception | None:
    """The exception ``cls`` raises when built on a dummy parameter with ``fields`` (paths such as
    ``fixed.lr`` -> value), if any."""
    hparams = {f.split(".", 1)[1]: v for f, v in fields.items()}
    try:
        cls([torch.nn.Parameter(torch.zeros(16, 16))], **hparams)
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


def parse_suite(data: Any, source: str = "suite", *, allow_import: bool = False) -> Suite:
    """Validate a suite given as plain data (the parsed YAML) and return a :class:`Suite`.

    Every hyperparameter the suite can give an optimizer (fixed, defaults, the ends of each search
    range, every choice) is tried on a dummy parameter, so a value the optimizer refuses is an
    error here, before anything runs. Counts are bounded (:data:`MAX_SEEDS`, :data:`MAX_RUNS`).

    Args:
        data: the parsed YAML.
        source: where it came from (the messages' prefix).
        allow_import: allow entries ``optimizer: "module:Class"`` outside ``torch.optim`` and
            ``curvlab.optim`` (they import and run code named by the suite).

    Raises:
        SuiteError: the message starts with the path of the bad field, e.g.
            ``"s.yaml: tracks.tuned.trials: expected an integer >= 1, got 0"``.
        ImportNotAllowedError: a ``module:Class`` optimizer without ``allow_import``.
        UnknownNameError: an unknown problem or optimizer name (lists the known ones).

    Example:
        >>> s = parse_suite({"problems": ["digits-mlp"], "optimizers": ["adamw"]})
        >>> (s.problems, s.optimizers[0].label)
        (('digits-mlp',), 'adamw')
        >>> bad = {"problems": ["digits-mlp"], "optimizers": ["adamw"],
        ...        "tracks": {"tuned": {"trials": 0}}}
        >>> parse_suite(bad)
        Traceback (most recent call last):
        ...
        curvlab.errors.SuiteError: suite: tracks.tuned.trials: expected an integer >= 1, got 0
    """
    try:
        top = _mapping("(top level)", data)
        _check_keys(
            "(top level)", top, ("name", "seed", "problems", "optimizers", "tracks", "monitors")
        )
        name = top.get("name", Path(source).stem)
        if not isinstance(name, str):
            raise _fail("name", f"expected a string, got {name!r}")
        seed = _int("seed", top.get("seed", 0))
        probs = top.get("problems")
        if probs is None:
            raise _fail("problems", "missing: list the problems to run (see `curvlab bench list`)")
        overrides: dict[str, dict[str, int]] = {}
        if isinstance(probs, Mapping):
            names = list(probs)
            for p, ov in probs.items():
                ovm = _mapping(f"problems.{p}", ov)
                _check_keys(f"problems.{p}", ovm, ("budget_steps", "eval_every"))
                overrides[p] = {
                    k: _int(f"problems.{p}.{k}", x, 1, MAX_STEPS) for k, x in ovm.items()
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
        tracks = _mapping("tracks", top.get("tracks", {"defaults": {}, "tuned": {}}))
        _check_keys("tracks", tracks, ("defaults", "tuned"))
        d = _mapping("tracks.defaults", tracks.get("defaults"))
        _check_keys("tracks.defaults", d, ("seeds", "budget_factor"))
        t = _mapping("tracks.tuned", tracks.get("tuned"))
        _check_keys("tracks.tuned", t, ("trials", "studies"))
        for e_i, e in enumerate(entries):
            if "tuned" in tracks and not e.search:
                raise _fail(
                    f"optimizers[{e_i}].search",
                    f"{e.label!r} has no search space for the tuned track",
                )
        suite = Suite(
            name=name,
            problems=tuple(names),
            optimizers=entries,
            seed=seed,
            default_seeds=_int("tracks.defaults.seeds", d.get("seeds", 3), 1, MAX_SEEDS),
            budget_factor=_num("tracks.defaults.budget_factor", d.get("budget_factor", 1.5), True),
            trials=_int("tracks.tuned.trials", t.get("trials", 4), 1, MAX_SEEDS),
            studies=_int("tracks.tuned.studies", t.get("studies", 2), 1, MAX_SEEDS),
            tracks=tuple(k for k in ("defaults", "tuned") if k in tracks),
            problem_overrides=overrides,
            monitors=_monitors(top.get("monitors"), entries, names),
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
    "optimizers": ["adamw", "sgd-momentum", "adopt", "sophia", "dog"],
    # an odd number of studies, so that the median over studies is one study's time (AlgoPerf: 3)
    "tracks": {
        "defaults": {"seeds": 3, "budget_factor": 1.5},
        "tuned": {"trials": 3, "studies": 3},
    },
    "monitors": [{"name": "sharpness", "every": 50}],
}

STANDARD: dict[str, Any] = {
    "name": "standard",
    "seed": 0,
    "problems": [
        "quadratic-k1e2",
        "quadratic-k1e4",
        "quadratic-k1e6",
        "noisy-quadratic",
        "breast-cancer-logreg",
        "digits-softmax",
        "sensing-symmetric",
        "sensing-asymmetric",
        "deep-linear",
        "digits-mlp",
        "digits-cnn",
        "fashion-mlp",
        "fashion-cnn",
        "charlm-pydoc",
    ],
    "optimizers": [
        "adamw",
        "sgd-momentum",
        "adopt",
        "sophia",
        "adahessian",
        "dog",
        "ldog",
        "psgdkron",
        "mfac",
        "frugal",
    ],
    "tracks": {
        "defaults": {"seeds": 5, "budget_factor": 1.5},
        "tuned": {"trials": 5, "studies": 3},
    },
}

#: Named suites. ``quick`` needs only data shipped with the Python dependencies (``make demo``);
#: ``standard`` also needs Debian's dataset-fashion-mnist.
SUITES: dict[str, dict[str, Any]] = {"quick": QUICK, "standard": STANDARD}


def load_suite(name_or_path: str, *, allow_import: bool = False) -> Suite:
    """A named suite (``quick``, ``standard``) or a YAML file, validated (:func:`parse_suite`).

    Raises:
        ImportNotAllowedError: a ``module:Class`` optimizer without ``allow_import``.
        SuiteError: unreadable or invalid file (message points at the field).
        UnknownNameError: neither a known suite name nor an existing file.
    """
    if name_or_path in SUITES:
        return parse_suite(SUITES[name_or_path], name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        known = sorted(SUITES)
        raise UnknownNameError(
            f"unknown suite {name_or_path!r}.{closest(name_or_path, known)} Give one of "
            f"{', '.join(known)} or the path of a YAML suite file"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SuiteError(f"{path}: cannot read the suite file: {exc}") from exc
    return parse_suite(data, str(path), allow_import=allow_import)


def _unit_points(n: int, d: int, seed: int) -> list[list[float]]:
    if d == 0:
        return [[] for _ in range(n)]
    from scipy.stats import qmc

    return qmc.Halton(d=d, scramble=True, seed=seed).random(n).tolist()  # type: ignore[no-any-return]


def expand_runs(suite: Suite, problem_info: Mapping[str, Mapping[str, Any]]) -> list[RunSpec]:
    """All runs of ``suite``; ``problem_info[name]`` supplies ``budget_steps`` and ``eval_every``.

    Runs are ordered problem by problem, defaults track first, so partial results are usable early.
    """
    runs: list[RunSpec] = []
    for p in suite.problems:
        info = {**problem_info[p], **suite.problem_overrides.get(p, {})}
        budget, every = int(info["budget_steps"]), int(info["eval_every"])
        for e in suite.optimizers:
            if "defaults" in suite.tracks:
                hp = {**e.fixed, **e.defaults}
                for s in range(suite.default_seeds):
                    runs.append(
                        RunSpec(
                            p,
                            e.label,
                            e.optimizer,
                            hp,
                            suite.seed * 1000 + s,
                            "defaults",
                            s,
                            0,
                            math.ceil(suite.budget_factor * budget),
                            every,
                        )
                    )
            if "tuned" in suite.tracks:
                dims = sorted(e.search)
                pts = _unit_points(
                    suite.trials * suite.studies, len(dims), suite.seed * 7919 + len(dims)
                )
                for j in range(suite.studies):
                    for k in range(suite.trials):
                        u = pts[j * suite.trials + k]
                        hp = {**e.fixed, **{n: e.search[n].value(x) for n, x in zip(dims, u)}}
                        runs.append(
                            RunSpec(
                                p,
                                e.label,
                                e.optimizer,
                                hp,
                                suite.seed * 1000 + 500 + j,
                                "tuned",
                                j,
                                k,
                                budget,
                                every,
                            )
                        )
    return runs
