"""The SQLite store: schema, versioning, refusals, attempts, export."""

from __future__ import annotations

import csv
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from curvlab.bench.runner import plan_runs
from curvlab.bench.store import (
    SCHEMA_VERSION,
    STALE_AFTER_S,
    Store,
    check_store_path,
    new_owner,
)
from curvlab.bench.suites import expand_runs, parse_suite
from curvlab.errors import StoreError

DEAD = f"{socket.gethostname()}:{2**22 + 7}:0"  # a process id beyond Linux's pid_max


def _registered(tmp_path: Path, tiny) -> tuple[Store, list]:  # type: ignore[no-untyped-def]
    s = parse_suite(tiny())
    runs = expand_runs(
        s,
        {
            "quadratic-k1e2": {"budget_steps": 20, "eval_every": 5},
            "breast-cancer-logreg": {"budget_steps": 20, "eval_every": 10},
        },
    )
    st = Store(tmp_path / "s.sqlite")
    st.register(s.name, s.to_json(), {"quadratic-k1e2": {"x": 1}}, runs)
    return st, runs


def test_new_store_is_wal_and_versioned(tmp_path: Path) -> None:
    st = Store(tmp_path / "a" / "b" / "s.sqlite")
    assert st.schema_version() == SCHEMA_VERSION
    assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.integrity_check() == "ok"


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    Store(p).close()
    with sqlite3.connect(p) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    before = p.read_bytes()
    with pytest.raises(
        StoreError,
        match=r"written by a newer curvlab \(store schema 99, this curvlab reads up to 3\)",
    ):
        Store(p)
    with pytest.raises(StoreError, match="newer curvlab"):
        Store(p, readonly=True)
    assert p.read_bytes() == before


def test_foreign_database_and_bad_paths_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "other.sqlite"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a curvlab store"):
        Store(p)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable curvlab store"):
        Store(junk)
    with pytest.raises(StoreError, match="is a directory"):
        check_store_path(tmp_path)
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    with pytest.raises(StoreError, match="cannot create the store's directory"):
        check_store_path(afile / "sub" / "s.sqlite")
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "missing.sqlite", readonly=True)


def test_attempts_replace_older_evaluations(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    st, runs = _registered(tmp_path, tiny)
    rid = runs[0].run_id
    a1 = st.claim_run(rid, DEAD, {"torch": "x"})
    st.add_eval(rid, a1, 0, 0.0, 0, 0.0, float("nan"), {"loss": 1.0})
    st.add_eval(rid, a1, 5, 5.0, 0, 0.1, 0.5, {"loss": 0.5})
    assert [e["step"] for e in st.evals(rid)] == [0, 5]
    assert st.evals(rid)[0]["train_loss"] is None  # NaN stored as NULL
    a2 = st.claim_run(rid, new_owner(), {"torch": "x"})  # its owner's process is gone
    assert a2 == a1 + 1 and st.evals(rid) == []
    st.finish_run(rid, a1, "finished", {"steps": 99})  # stale attempt: ignored
    assert st.runs(run_id=rid)[0]["status"] == "running"
    st.add_eval(rid, a2, 0, 0.0, 0, 0.0, None, {"loss": 1.0})
    st.finish_run(rid, a2, "finished", {"steps": 30, "final_metric": 0.25}, {"loadavg": [1.0]})
    row = st.runs(run_id=rid)[0]
    assert row["status"] == "finished" and row["steps"] == 30 and row["final_metric"] == 0.25
    assert row["env"] == {"torch": "x", "loadavg_end": [1.0]}
    with pytest.raises(StoreError, match="unknown run column"):
        st.runs(bogus=1)


def test_register_is_idempotent(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    st, runs = _registered(tmp_path, tiny)
    rid = runs[0].run_id
    st.finish_run(rid, st.claim_run(rid, new_owner(), {}), "finished", {"steps": 1})
    st.register("tiny", "{}", {}, runs)
    assert st.status_of([rid]) == {rid: "finished"}
    assert len(st.runs()) == len(runs)


def test_export_csv_and_json(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    st, runs = _registered(tmp_path, tiny)
    rid = runs[0].run_id
    a = st.claim_run(rid, new_owner(), {})
    st.add_eval(rid, a, 0, 0.0, 0, 0.0, 2.0, {"loss": 2.0, "acc": 0.5})
    st.finish_run(rid, a, "finished", {"steps": 0})
    p_runs, p_evals = st.export(tmp_path / "csv", "csv")
    rows = list(csv.DictReader(open(p_runs)))
    assert {r["run_id"] for r in rows} == {r.run_id for r in runs}
    by_id = {r["run_id"]: r for r in rows}
    assert json.loads(by_id[rid]["hparams"]) == dict(runs[0].hparams)
    ev = list(csv.DictReader(open(p_evals)))
    assert ev == [
        {
            "run_id": rid,
            "attempt": str(a),
            "step": "0",
            "grad_evals": "0.0",
            "hvp_evals": "0",
            "seconds": "0.0",
            "train_loss": "2.0",
            "acc": "0.5",
            "loss": "2.0",
        }
    ]
    (pj,) = st.export(tmp_path / "json", "json")
    doc = json.loads(pj.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and len(doc["runs"]) == len(runs)
    assert doc["evals"][0]["metrics"] == {"loss": 2.0, "acc": 0.5}
    with pytest.raises(StoreError, match="unknown export format 'xml'"):
        st.export(tmp_path, "xml")


def test_claims_are_exclusive_while_the_owner_lives(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    st, runs = _registered(tmp_path, tiny)
    rid = runs[0].run_id
    me, other = new_owner(), new_owner()  # both this (live) process
    assert st.claim_run(rid, me, {}) == 1
    assert st.claim_run(rid, other, {}) is None  # held by a live runner
    assert st.claim_run(rid, me, {}) == 2  # its own runner may restart it (a worker died)
    with sqlite3.connect(st.path) as c:  # the owner stopped beating
        c.execute("UPDATE runs SET heartbeat=? WHERE run_id=?", (time.time() - 1e4, rid))
    assert st.claim_run(rid, other, {}) == 3
    st.heartbeat(other)
    assert st.runs(run_id=rid)[0]["heartbeat"] > time.time() - STALE_AFTER_S
    st.finish_run(rid, 3, "finished", {"steps": 1})
    assert st.claim_run(rid, me, {}) is None  # done
    rid2 = runs[1].run_id
    assert st.claim_run(rid2, DEAD, {}) == 1
    assert st.claim_run(rid2, me, {}) == 2  # the owner's process is gone: reclaimed at once
    st.release(me)
    row = st.runs(run_id=rid2)[0]
    assert (row["status"], row["owner"]) == ("pending", None)


def test_schema_1_store_is_migrated(tmp_path: Path) -> None:
    p = tmp_path / "old.sqlite"
    Store(p).close()
    with sqlite3.connect(p) as c:  # what curvlab with store schema 1 wrote
        c.execute("ALTER TABLE runs DROP COLUMN owner")
        c.execute("ALTER TABLE runs DROP COLUMN heartbeat")
        c.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        c.execute(
            "INSERT INTO runs (run_id, problem, label, optimizer, hparams, seed, track, study, "
            "trial, budget_steps, eval_every, status) "
            "VALUES ('r', 'p', 'l', 'o', '{}', 0, 'defaults', 0, 0, 1, 1, 'running')"
        )
    assert Store(p, readonly=True).runs()[0]["status"] == "running"  # read as it is
    st = Store(p)
    assert st.schema_version() == SCHEMA_VERSION == 3
    assert st.claim_run("r", new_owner(), {}) == 1  # no owner: free


def test_schema_2_store_gains_load1_and_migration_is_idempotent(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "v2.sqlite"
    suite = parse_suite(tiny())
    spec = plan_runs(suite)[0]
    st = Store(p)
    st.register("tiny", suite.to_json(), {}, [spec])
    st.close()
    with sqlite3.connect(p) as c:  # what curvlab with store schema 2 wrote
        c.execute("ALTER TABLE runs DROP COLUMN load1")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    assert "load1" not in Store(p, readonly=True).runs()[0]  # read as it is
    st = Store(p)
    assert st.schema_version() == 3 and st.runs()[0]["load1"] is None
    attempt = st.claim_run(spec.run_id, new_owner(), {"loadavg": [0.5, 0.4, 0.3]})
    assert attempt is not None
    st.finish_run(spec.run_id, attempt, "finished", {"steps": 1}, {"loadavg": [3.5, 1.0, 1.0]})
    assert st.runs()[0]["load1"] == 3.5  # the larger of start and end
    st.close()
    with sqlite3.connect(p) as c:  # a branch that migrated the columns but not the version
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    st = Store(p)
    assert st.schema_version() == 3 and st.runs()[0]["load1"] == 3.5
    st.close()
