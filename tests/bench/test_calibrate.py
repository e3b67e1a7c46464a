"""Calibration: targets from tuned AdamW, its own seeds, provenance, and its bad inputs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from curvlab.bench import calibrate as calmod
from curvlab.bench.calibrate import calibrate, write_targets
from curvlab.bench.runner import run_suite
from curvlab.bench.store import Store
from curvlab.bench.suites import OptimizerEntry, SearchDim, load_suite, parse_suite, targets_path
from curvlab.errors import CalibrationError, InvalidArgumentError

SUITE = {
    "name": "cal",
    "problems": {
        "quadratic-k1e2": {"budget_steps": 24, "eval_every": 4},
        "breast-cancer-logreg": {"budget_steps": 20, "eval_every": 5},
    },
    "optimizers": ["adamw", "sgd-momentum"],
    "tracks": {"defaults": {"seeds": 1}, "tuned": {"trials": 3, "studies": 1}},
}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("cal")
    suite = parse_suite(SUITE, require_targets=False)
    store = tmp / "cal.sqlite"
    cal = calibrate(suite, store, fraction=0.5, trials=3, seeds=3, workers=0, progress=False)
    return cal, store


def test_target_is_the_least_good_seeds_best_trial_within_the_fraction(
    calibrated: tuple[Any, Path],
) -> None:
    cal, store = calibrated
    st = Store(store, readonly=True)
    try:
        for problem, metric, within in (
            ("quadratic-k1e2", "rel_subopt", 12),
            ("breast-cancer-logreg", "valid_loss", 10),
        ):
            best: dict[int, float] = {}
            for r in st.runs(problem=problem):
                assert r["track"] == "calibration" and r["label"] == "adamw"
                assert r["hparams"]["schedule"] == "cosine"  # the reference warms up and decays
                evs = st.evals(r["run_id"])
                vals = [e["metrics"][metric] for e in evs if 0 < e["step"] <= within]
                best[r["seed"]] = min(best.get(r["seed"], math.inf), *vals)
            assert sorted(best) == [900, 901, 902]  # the calibration's own seeds
            assert cal.targets[problem] == max(best.values())  # every seed reaches it
            assert cal.doc["targets"][problem]["median_over_seeds"] == statistics.median(
                best.values()
            )
            entry = cal.doc["targets"][problem]
            assert entry["within_steps"] == within and entry["metric"] == metric
            assert entry["seeds_reaching_in_budget"] == 3  # all of them, by the rule
    finally:
        st.close()
    prov = cal.doc["provenance"]
    assert prov["trials"] == 3 and prov["seeds"] == [900, 901, 902] and prov["fraction"] == 0.5
    assert prov["reference"]["optimizer"] == "adamw" and prov["torch"] and prov["curvlab"]
    assert set(prov["reference"]["search"]) == {"lr", "weight_decay", "beta2"}


def test_written_targets_load_and_the_reference_reaches_them_on_new_seeds(
    calibrated: tuple[Any, Path], tmp_path: Path
) -> None:
    import yaml

    cal, _ = calibrated
    suite_file = tmp_path / "cal.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE))
    path = write_targets(cal, targets_path(str(suite_file)))
    assert path == tmp_path / "cal.targets.yaml"
    suite = load_suite(str(suite_file))
    assert suite.targets == cal.targets and suite.calibration["provenance"]["trials"] == 3
    # time-to-target on the tuned track's seeds (disjoint from the calibration's)
    store = tmp_path / "run.sqlite"
    assert run_suite(suite, store, workers=0, progress=False).failed == 0
    st = Store(store, readonly=True)
    try:
        tuned = st.runs(label="adamw", track="tuned")
        assert {r["seed"] for r in tuned} == {500}
        for p in SUITE["problems"]:
            assert any(r["ttt_steps"] is not None for r in tuned if r["problem"] == p), p
            assert st.problems()[p]["target_threshold"] == cal.targets[p]
    finally:
        st.close()


def test_a_suite_target_the_reference_never_reaches_is_said_with_by_how_much(
    tmp_path: Path,
) -> None:
    doc = {
        **SUITE,
        "problems": {"quadratic-k1e2": {"budget_steps": 8, "eval_every": 4, "target": 1e-9}},
    }
    notes: list[str] = []
    calibrate(
        parse_suite(doc),
        tmp_path / "s.sqlite",
        trials=3,
        seeds=1,
        workers=0,
        progress=False,
        log=notes.append,
    )
    (line,) = [n for n in notes if "own target" in n]
    assert "the suite's own target 1e-09 is never reached by the reference: its best is" in line
    assert "short by" in line


def test_bad_calibration_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = parse_suite(SUITE, require_targets=False)
    with pytest.raises(InvalidArgumentError, match=r"fraction must be in \(0, 1\], got 0"):
        calibrate(suite, tmp_path / "a.sqlite", fraction=0, workers=0)
    with pytest.raises(
        InvalidArgumentError, match=r"trials \(1\) is below the suite's tuned trials \(3\)"
    ):
        calibrate(suite, tmp_path / "a.sqlite", trials=1, workers=0)
    with pytest.raises(InvalidArgumentError, match=r"seeds must be 1 to 100, got 101"):
        calibrate(suite, tmp_path / "a.sqlite", seeds=101, workers=0)
    assert not (tmp_path / "a.sqlite").exists()  # nothing ran
    # a reference that diverges everywhere gives no target, and says so
    wild = OptimizerEntry("adamw", "sgd", {}, {}, {"lr": SearchDim(1e200, 1e201)})
    monkeypatch.setattr(calmod, "REFERENCE", wild)
    tiny = parse_suite(
        {**SUITE, "problems": {"quadratic-k1e2": {"budget_steps": 4, "eval_every": 2}}},
        require_targets=False,
    )
    with pytest.raises(
        CalibrationError,
        match=r"quadratic-k1e2: the reference \(tuned AdamW\) reached no finite rel_subopt within 2 "
        r"of 4 steps on any of 1 seeds \(run statuses: diverged\)",
    ):
        calibrate(tiny, tmp_path / "b.sqlite", trials=3, seeds=1, workers=0, progress=False)


def test_calibration_seed_j_runs_the_tuned_studys_configurations_on_other_seeds() -> None:
    from curvlab.bench.calibrate import reference_suite
    from curvlab.bench.suites import expand_runs, problem_infos

    suite = parse_suite(
        {**SUITE, "tracks": {"tuned": {"trials": 3, "studies": 3}}}, require_targets=False
    )
    ref = reference_suite(suite, suite.trials, 3)
    tuned = [r for r in expand_runs(suite, problem_infos(suite)) if r.label == "adamw"]
    cal = expand_runs(ref, problem_infos(ref))
    key = lambda r: (r.problem, r.study, r.trial)  # noqa: E731
    assert {key(r): r.hparams for r in cal} == {key(r): r.hparams for r in tuned}
    assert not {r.seed for r in cal} & {r.seed for r in tuned}
