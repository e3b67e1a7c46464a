"""Suite validation (messages point at the bad field) and run expansion."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from curvlab.bench.optimizers import check_schedule
from curvlab.bench.suites import (
    BUILTIN_OPTIMIZERS,
    SEED_BASES,
    SUITES,
    expand_runs,
    load_suite,
    parse_suite,
    problem_infos,
    targets_path,
)
from curvlab.errors import ImportNotAllowedError, SuiteError, UnknownNameError

INFO = {
    "quadratic-k1e2": {"budget_steps": 20, "eval_every": 5},
    "breast-cancer-logreg": {"budget_steps": 20, "eval_every": 10},
}


def test_named_suites_validate() -> None:
    for name in SUITES:
        s = load_suite(name, require_targets=False)
        assert s.name == name and s.problems and s.optimizers
    quick = load_suite("quick")  # ships calibrated targets: loads as it is
    assert set(quick.targets) == set(quick.problems)
    assert {"adamw", "sgd-momentum", "adopt", "sophiah", "dog"} <= {
        e.label for e in quick.optimizers
    }
    # the calibration's provenance travels with the suite into the store's problem infos
    cal = problem_infos(quick)["digits-mlp"]["target_calibration"]
    assert {"date", "reference", "trials", "seeds", "fraction", "torch", "curvlab"} <= set(cal)
    assert cal["reference"]["optimizer"] == "adamw" and cal["reference"]["schedule"] == "cosine"
    # the char-level language model is SophiaG's, the Hutchinson variant SophiaH's everywhere
    standard = {e.label: e for e in load_suite("standard", require_targets=False).optimizers}
    assert standard["sophiag"].problems == ("charlm-pydoc",)
    assert standard["sophiag"].fixed["estimator"] == "gnb"
    assert standard["sophiah"].fixed["estimator"] == "hutchinson"


def test_quick_suite_uses_only_shipped_data() -> None:
    from curvlab.bench.problems import get_problem

    for p in load_suite("quick").problems:
        assert (
            "fashion" not in get_problem(p).data
            and "shakespeare" not in get_problem(p).data.lower()
        )


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"optimizers": ["adamw"]}, r"problems: missing"),
        ({"problems": "digits-mlp", "optimizers": ["adamw"]}, r"problems: expected a list"),
        ({"problems": ["digits-mlp"], "optimizers": []}, r"optimizers: expected a non-empty list"),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamww"]},
            r"optimizers\[0\]: no built-in entry 'adamww'\. Did you mean 'adamw'\?",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": ["adamw"],
                "tracks": {"tuned": {"trials": 0}},
            },
            r"tracks\.tuned\.trials: expected an integer >= 1, got 0",
        ),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamw"], "tracks": {"tunde": {}}},
            r"tracks\.tunde: unknown field\. Did you mean 'tuned'\?",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [
                    {"label": "x", "optimizer": "sgd", "search": {"lr": {"low": -1, "high": 1}}}
                ],
            },
            r"optimizers\[0\]\.search\.lr\.low: expected a positive number, got -1",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [
                    {
                        "label": "x",
                        "optimizer": "sgd",
                        "search": {"lr": {"low": 1, "high": 0.1, "log": False}},
                    }
                ],
            },
            r"optimizers\[0\]\.search\.lr: high \(0\.1\) is below low \(1\)",
        ),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamw", "adamw"]},
            r"optimizers: duplicate labels \['adamw'\]",
        ),
        (
            {"problems": {"digits-mlp": {"budget_steps": "many"}}, "optimizers": ["adamw"]},
            r"problems\.digits-mlp\.budget_steps: expected an integer >= 1, got 'many'",
        ),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamw"], "sed": 1},
            r"\(top level\)\.sed: unknown field\. Did you mean 'seed'\?",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [{"optimizer": "adamw", "fixed": {"lr": -1}}],
            },
            r"optimizers\[0\]\.fixed\.lr: adamw refuses \{'lr': -1, .*\}: "
            r"ValueError: Invalid learning rate",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [
                    {"label": "s", "optimizer": "sgd", "fixed": {"momentum": 0.9, "lr": -1}}
                ],
                "tracks": {"defaults": {}},
            },
            r"optimizers\[0\]\.fixed\.lr: sgd refuses .*Invalid learning rate",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [{"label": "s", "optimizer": "sophia", "defaults": {"betas": 3}}],
                "tracks": {"defaults": {}},
            },
            r"optimizers\[0\]\.defaults\.betas: sophia refuses",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [{"optimizer": "adamw", "search": {"eps": [1e-8, -1.0]}}],
            },
            r"optimizers\[0\]\.search\.eps: adamw refuses",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": [{"optimizer": "adamw", "fixed": {"lr": 0.1}, "defaults": {"lr": 1}}],
            },
            r"optimizers\[0\]\.fixed\.lr: also given in defaults",
        ),
        (
            {
                "problems": ["digits-mlp"],
                "optimizers": ["adamw"],
                "tracks": {"defaults": {"seeds": 100000000}},
            },
            r"tracks\.defaults\.seeds: 100000000 is above the limit of 500",
        ),
        (
            {
                "problems": ["digits-mlp", "digits-softmax"],
                "optimizers": ["adamw", "sgd"],
                "tracks": {"tuned": {"trials": 1000, "studies": 26}},
            },
            r"tracks: the suite expands to 104000 runs, above the limit of 100000",
        ),
        (
            {"problems": {"digits-mlp": {"budget_steps": 10**12}}, "optimizers": ["adamw"]},
            r"problems\.digits-mlp\.budget_steps: 1000000000000 is above the limit",
        ),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamw"]},
            r"targets: no target for digits-mlp; run `curvlab bench calibrate --suite s\.yaml "
            r"--store PATH`",
        ),
        (
            {"problems": ["digits-mlp"], "optimizers": ["adamw"], "targets": {"digits-cnn": 0.9}},
            r"targets\.digits-cnn: not a problem of this suite",
        ),
        (
            {
                "problems": {"digits-mlp": {"target": 0.9}},
                "optimizers": ["adamw"],
                "targets": {"digits-mlp": 0.9},
            },
            r"problems\.digits-mlp\.target: also given in 'targets'",
        ),
        (
            {
                "problems": {"digits-mlp": {"target": 0.9}},
                "optimizers": ["adamw"],
                "tracks": {"tuned": {"schedule": "step"}},
            },
            r"tracks\.tuned: unknown schedule 'step'; known: constant, cosine",
        ),
        (
            {
                "problems": {"digits-mlp": {"target": 0.9}},
                "optimizers": ["adamw"],
                "tracks": {"tuned": {"warmup": 1.5}},
            },
            r"tracks\.tuned: warmup is the warm-up's fraction of the budget, in \[0, 1\)",
        ),
        (
            {
                "problems": {"digits-mlp": {"target": 0.9}},
                "optimizers": [{"optimizer": "sgd", "search": {"beta2": [0.9]}}],
            },
            r"optimizers\[0\]\.search\.beta2: sgd refuses .*takes no 'betas'",
        ),
    ],
)
def test_invalid_suites_name_the_field(doc: dict, match: str) -> None:
    with pytest.raises(SuiteError, match=r"^s\.yaml: " + match):
        parse_suite(doc, "s.yaml")


def test_unknown_problem_lists_known_and_suggests() -> None:
    with pytest.raises(
        UnknownNameError,
        match=r"problems\[0\]: unknown problem 'digits-mpl'\. Did you mean 'digits-mlp'\?.*Known "
        r"problems: .*breast-cancer-logreg",
    ):
        parse_suite({"problems": ["digits-mpl"], "optimizers": ["adamw"]})


def test_yaml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("problems: [digits-mlp\noptimizers: [")
    with pytest.raises(SuiteError) as info:
        load_suite(str(bad))
    # one line: where and what, not the parser's drawing of the line with a caret
    assert str(info.value) == (
        f"{bad}: not valid YAML at line 2, column 11: expected ',' or ']', but got ':'"
    )
    (tmp_path / "adir.yaml").mkdir()
    with pytest.raises(SuiteError, match=r"adir\.yaml: cannot read the suite file: "):
        load_suite(str(tmp_path / "adir.yaml"))
    ok = tmp_path / "ok.yaml"
    ok.write_text("problems: [digits-mlp]\noptimizers: [adamw]\ntracks: {tuned: {trials: x}}\n")
    with pytest.raises(SuiteError, match=r"ok\.yaml: tracks\.tuned\.trials: expected an integer"):
        load_suite(str(ok))
    with pytest.raises(UnknownNameError, match=r"unknown suite 'quik'\. Did you mean 'quick'\?"):
        load_suite("quik")


def test_expand_runs_counts_tracks_and_seeds(tiny) -> None:  # type: ignore[no-untyped-def]
    s = parse_suite(tiny())
    runs = expand_runs(s, INFO)
    # 2 problems x 2 optimizers x (2 default seeds + 2 trials x 2 studies)
    assert len(runs) == 2 * 2 * (2 + 4)
    assert len({r.run_id for r in runs}) == len(runs)
    d = [r for r in runs if r.track == "defaults" and r.problem == "quadratic-k1e2"]
    assert {r.budget_steps for r in d} == {30}  # ceil(1.5 x 20)
    t = [
        r
        for r in runs
        if r.track == "tuned" and r.label == "adamw" and r.problem == "quadratic-k1e2"
    ]
    lrs = [r.hparams["lr"] for r in t]
    assert all(1e-3 <= x <= 0.3 for x in lrs) and len(set(lrs)) == 4
    assert all(r.hparams["weight_decay"] == 0.0 for r in t)
    # trials of one study share the seed; studies differ
    assert len({r.seed for r in t if r.study == 0}) == 1 and len({r.seed for r in t}) == 2
    # deterministic and workload-agnostic: same points for every problem, same ids on re-expansion
    t2 = [
        r
        for r in runs
        if r.track == "tuned" and r.label == "adamw" and r.problem == "breast-cancer-logreg"
    ]
    assert [r.hparams["lr"] for r in t2] == lrs
    assert [r.run_id for r in expand_runs(s, INFO)] == [r.run_id for r in runs]


def test_a_fixed_value_holds_in_every_run() -> None:
    s = parse_suite(
        {
            "problems": ["digits-mlp"],
            "optimizers": [{"optimizer": "sgd", "fixed": {"lr": 0.05}}],
            "tracks": {"defaults": {"seeds": 1}},
            "targets": {"digits-mlp": 0.9},
        }
    )
    (run,) = expand_runs(s, {"digits-mlp": {"budget_steps": 4, "eval_every": 2}})
    assert run.hparams["lr"] == 0.05  # not the built-in default 0.01


def test_importing_code_needs_the_explicit_flag(tmp_path: Path) -> None:
    doc = {
        "problems": ["digits-mlp"],
        "optimizers": [{"label": "mine", "optimizer": "os:system", "search": {"lr": [0.1]}}],
    }
    with pytest.raises(
        ImportNotAllowedError,
        match=r"optimizers\[0\]\.optimizer: 'os:system' imports and runs Python code .*"
        r"--allow-import \(allow_import=True\)",
    ):
        parse_suite(doc)
    with pytest.raises(UnknownNameError, match=r"is not a torch\.optim\.Optimizer subclass"):
        parse_suite(doc, allow_import=True)  # allowed: now checked as an optimizer
    f = tmp_path / "s.yaml"
    f.write_text("problems: [digits-mlp]\noptimizers: [{optimizer: 'os:system'}]\n")
    with pytest.raises(ImportNotAllowedError, match=r"s\.yaml: optimizers\[0\]\.optimizer"):
        load_suite(str(f))
    # torch's and curvlab's own optimizers are installed code: no flag needed
    parse_suite(
        {"problems": ["digits-mlp"], "optimizers": ["torch-adamw"], "targets": {"digits-mlp": 0.9}}
    )


def test_search_spaces_follow_the_authors() -> None:
    b = BUILTIN_OPTIMIZERS
    for label in ("adamw", "adopt"):
        assert set(b[label].search) == {"lr", "weight_decay", "beta2"}
    assert set(b["sgd-momentum"].search) == {"lr", "momentum"}
    for label in ("sophiag", "sophiah"):
        assert set(b[label].search) == {"lr", "rho"} and b[label].optimizer == "sophia"
    assert b["sophiag"].defaults["rho"] == 0.04 and b["sophiah"].defaults["rho"] == 0.01
    for label in ("dog", "ldog"):  # c = 1 fixed, as the authors prescribe; c is never searched
        assert b[label].fixed == {"lr": 1.0, "schedule": "constant"}
        assert set(b[label].search) == {"reps_rel"}
    assert "sophia" not in b  # SophiaG and SophiaH are named apart
    # the same trial budget for every optimizer of a suite
    s = load_suite("quick")
    runs = expand_runs(s, problem_infos(s))
    # DoG's tuned runs keep the constant schedule the authors use (no warm-up, no decay)
    dog_runs = [r for r in runs if r.label == "dog" and r.track == "tuned"]
    assert dog_runs and all(check_schedule(r.hparams)[0] == "constant" for r in dog_runs)
    per = {}
    for r in runs:
        if r.track == "tuned":
            per[(r.problem, r.label)] = per.get((r.problem, r.label), 0) + 1
    assert set(per.values()) == {s.trials * s.studies} and s.trials > 3


def test_tuned_track_warms_up_and_decays_defaults_track_does_not(tiny) -> None:  # type: ignore[no-untyped-def]
    runs = expand_runs(parse_suite(tiny()), INFO)
    tuned = [r for r in runs if r.track == "tuned"]
    assert all(r.hparams["schedule"] == "cosine" and r.hparams["warmup"] == 0.05 for r in tuned)
    assert all("schedule" not in r.hparams for r in runs if r.track == "defaults")
    const = parse_suite(tiny(tracks={"tuned": {"trials": 1, "studies": 1, "schedule": "constant"}}))
    assert all("schedule" not in r.hparams for r in expand_runs(const, INFO))
    # every run carries its problem's target
    assert {r.target for r in runs if r.problem == "quadratic-k1e2"} == {1e-2}


def test_track_seeds_are_disjoint(tiny) -> None:  # type: ignore[no-untyped-def]
    from curvlab.bench.calibrate import reference_suite

    s = parse_suite(
        tiny(tracks={"defaults": {"seeds": 500}, "tuned": {"trials": 1, "studies": 400}})
    )
    runs = expand_runs(s, INFO) + expand_runs(reference_suite(s, 1, 100), INFO)
    seeds = {t: {r.seed for r in runs if r.track == t} for t in SEED_BASES}
    assert [len(v) for v in seeds.values()] == [500, 400, 100]
    assert not (seeds["defaults"] & seeds["tuned"]) and not (seeds["tuned"] & seeds["calibration"])
    assert not (seeds["defaults"] & seeds["calibration"])


def _calibrated(tmp_path: Path, **target: object) -> str:
    import yaml

    suite = tmp_path / "c.yaml"
    suite.write_text("problems: {quadratic-k1e2: {budget_steps: 20}}\noptimizers: [adamw]\n")
    entry = {
        "metric": "rel_subopt",
        "higher_is_better": False,
        "threshold": 0.1,
        "reference_value": 0.1,
        "budget_steps": 20,
        **target,
    }
    doc = {"provenance": {"trials": 8}, "targets": {"quadratic-k1e2": entry}}
    targets_path(str(suite)).write_text(yaml.safe_dump(doc))
    return str(suite)


def test_calibrated_targets_load_and_are_checked(tmp_path: Path) -> None:
    s = load_suite(_calibrated(tmp_path))
    assert s.targets == {"quadratic-k1e2": 0.1}
    assert problem_infos(s)["quadratic-k1e2"]["target_calibration"]["trials"] == 8
    with pytest.raises(
        SuiteError,
        match=r"c\.yaml: calibration\.targets\.quadratic-k1e2: the target rel_subopt <= 0\.05 is "
        r"beyond what the reference reached \(0\.1\) by 0\.05; the reference never reaches it",
    ):
        load_suite(_calibrated(tmp_path, threshold=0.05))
    with pytest.raises(
        SuiteError, match=r"calibrated for a budget of 40 steps but the suite gives 20"
    ):
        load_suite(_calibrated(tmp_path, budget_steps=40))
    with pytest.raises(
        SuiteError, match=r"calibrated on the metric 'loss' but the problem's target"
    ):
        load_suite(_calibrated(tmp_path, metric="loss"))


def test_standard_suite_ships_calibrated_targets() -> None:
    # `curvlab bench calibrate --suite standard` wrote them (tuned AdamW, 3 calibration seeds)
    s = load_suite("standard")
    assert set(s.targets) == set(s.problems) and len(s.problems) == 7
    assert all(math.isfinite(float(t)) for t in s.targets.values())
