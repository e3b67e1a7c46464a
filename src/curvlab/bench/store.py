"""The crash-safe SQLite store of benchmark runs.

Durability rule: the database runs in WAL mode; every evaluation record and every finished run is
its own transaction (``BEGIN IMMEDIATE … COMMIT``), so a ``kill -9`` of any process at any moment
leaves a consistent database that holds every committed record and nothing half-written; SQLite's
WAL guarantees this (https://www.sqlite.org/wal.html, https://www.sqlite.org/atomiccommit.html).
``synchronous=NORMAL`` keeps commits durable against process crashes (an operating-system crash or
power loss may drop the last commits, never corrupt). Each worker process opens its own connection;
writers queue on a 60 s busy timeout.

Schema (version :data:`SCHEMA_VERSION`; a store written by a newer curvlab is refused)::

    meta(key TEXT PRIMARY KEY, value TEXT)           -- schema_version, created_by, created_at
    problems(name TEXT PRIMARY KEY, info TEXT)       -- JSON: target, budget, ...
    suites(name TEXT PRIMARY KEY, spec TEXT, updated_at REAL)   -- the validated suite as JSON
    runs(run_id TEXT PRIMARY KEY,                    -- hash of the run definition (RunSpec.run_id)
         suite, problem, label, optimizer TEXT, hparams TEXT (JSON), seed,
         track ('defaults'|'tuned'),
         study, trial, budget_steps, eval_every INTEGER,
         status TEXT  -- 'pending' | 'running' | 'finished' | 'diverged' | 'failed'
         attempt INTEGER, started_at, finished_at REAL (unix time),
         steps INTEGER, grad_evals REAL, hvp_evals INTEGER, seconds REAL,   -- clocks at the end
         final_metric REAL, final_loss REAL,        -- the problem's final metric and train loss
         ttt_steps INTEGER, ttt_grad_evals REAL, ttt_seconds REAL,  -- time to target (NULL: miss)
         diverged_step INTEGER, error TEXT, env TEXT (JSON: torch version, threads, load average),
         owner TEXT, heartbeat REAL,  -- the runner that claimed the run ('host:pid:uuid'), and
                                      -- when it last said it was alive (unix time)
         load1 REAL)  -- the larger 1-minute load average of the run's start and end (the report
                      -- marks wall-clock unreliable when it exceeds the core count)
    evals(run_id, attempt, step INTEGER, grad_evals REAL, hvp_evals INTEGER, seconds REAL,
          train_loss REAL, metrics TEXT (JSON), PRIMARY KEY (run_id, attempt, step))
    monitors(key TEXT, step INTEGER, name TEXT, value REAL,  -- training-dynamics monitor values
             recorded_at REAL, PRIMARY KEY (key, step, name))  -- (curvlab.monitors.StoreSink);
                                                             -- key: a run_id or any label

Only the evaluations of a run's current ``attempt`` count; starting an attempt deletes the older
ones in the same transaction. Resume rule: runs with status ``finished`` or ``diverged`` are done;
any other status (a run in flight when the process died, or one that failed) is restarted.

Claim rule (:meth:`Store.claim_run`, one ``BEGIN IMMEDIATE`` transaction, so N runners on one store
execute each run once): a ``pending`` or ``failed`` run is free; a ``running`` run is taken while
its owner is alive, that is its heartbeat is younger than :data:`STALE_AFTER_S` seconds and, when
the owner is on this host, its process exists. A runner refreshes the heartbeat of its runs every
few seconds (:meth:`Store.heartbeat`), and every evaluation record refreshes it too.

Migrations: an older store (schema 1: no owner, no heartbeat; schema 2: no load1) is upgraded in
place when opened for writing, by adding the ``runs`` columns it lacks (additive and idempotent);
opened read-only, it is read as it is.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curvlab.errors import StoreError

__all__ = [
    "DONE_STATUSES",
    "SCHEMA_VERSION",
    "STALE_AFTER_S",
    "Store",
    "check_store_path",
    "disk_full_error",
    "new_owner",
    "owner_alive",
    "run_loads",
]

SCHEMA_VERSION = 3
DONE_STATUSES = ("finished", "diverged")
#: A run whose owner has not refreshed its heartbeat for this long is taken over by another runner.
STALE_AFTER_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS problems (name TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suites (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at REAL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    suite TEXT, problem TEXT NOT NULL, label TEXT NOT NULL, optimizer TEXT NOT NULL,
    hparams TEXT NOT NULL, seed INTEGER NOT NULL, track TEXT NOT NULL,
    study INTEGER NOT NULL, trial INTEGER NOT NULL,
    budget_steps INTEGER NOT NULL, eval_every INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'finished', 'diverged', 'failed')),
    attempt INTEGER NOT NULL DEFAULT 0,
    started_at REAL, finished_at REAL,
    steps INTEGER, grad_evals REAL, hvp_evals INTEGER, seconds REAL,
    final_metric REAL, final_loss REAL,
    ttt_steps INTEGER, ttt_grad_evals REAL, ttt_seconds REAL,
    diverged_step INTEGER, error TEXT, env TEXT,
    owner TEXT, heartbeat REAL, load1 REAL
);
CREATE INDEX IF NOT EXISTS runs_problem ON runs (problem, label, track);
CREATE TABLE IF NOT EXISTS monitors (
    key TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    recorded_at REAL, PRIMARY KEY (key, step, name)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL, attempt INTEGER NOT NULL, step INTEGER NOT NULL,
    grad_evals REAL NOT NULL, hvp_evals INTEGER NOT NULL, seconds REAL NOT NULL,
    train_loss REAL, metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, attempt, step)
);
"""

_RUN_COLUMNS = (
    "run_id",
    "suite",
    "problem",
    "label",
    "optimizer",
    "hparams",
    "seed",
    "track",
    "study",
    "trial",
    "budget_steps",
    "eval_every",
    "status",
    "attempt",
    "started_at",
    "finished_at",
    "steps",
    "grad_evals",
    "hvp_evals",
    "seconds",
    "final_metric",
    "final_loss",
    "ttt_steps",
    "ttt_grad_evals",
    "ttt_seconds",
    "diverged_step",
    "error",
    "env",
    "owner",
    "heartbeat",
    "load1",
)

#: Columns of ``runs`` added after schema 1, with their types: migrating an older store adds the
#: ones it lacks (additive and idempotent, so migrations of parallel branches merge as a union).
_ADDED_RUN_COLUMNS: dict[str, str] = {"owner": "TEXT", "heartbeat": "REAL", "load1": "REAL"}


def _nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _csv_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with every text cell that a spreadsheet would run as a formula (it starts with
    ``= + - @``, a tab or a carriage return) prefixed with ``'``."""
    return {
        k: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v
        for k, v in row.items()
    }


def new_owner() -> str:
    """A fresh runner identity, ``"host:pid:uuid"`` (the owner a runner writes into its runs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_alive(
    owner: str | None, heartbeat: float | None, now: float, stale_after: float = STALE_AFTER_S
) -> bool:
    """Whether a run's owner still holds it: a fresh heartbeat and, on this host, a live process.

    Example:
        >>> owner_alive(new_owner(), 100.0, now=101.0)
        True
        >>> owner_alive(new_owner(), 100.0, now=100.0 + STALE_AFTER_S + 1)
        False
        >>> owner_alive(None, None, now=0.0)
        False
    """
    if not owner or heartbeat is None or now - heartbeat > stale_after:
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: it exists
        return True
    return True


def check_store_path(path: str | os.PathLike[str]) -> Path:
    """Refuse a store path that cannot be written, before any run starts.

    Raises:
        StoreError: the directory is missing and cannot be created, is not writable, or the path is
            a directory or an existing read-only file.
    """
    p = Path(path)
    if p.is_dir():
        raise StoreError(
            f"store path {p} is a directory; give a file path such as {p / 'store.sqlite'}"
        )
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the store's directory {parent}: {exc}; choose a writable path"
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"the store's directory {parent} is not writable; choose a writable path with --store"
        )
    if p.exists() and not os.access(p, os.W_OK):
        raise StoreError(
            f"the store {p} is read-only; make it writable or choose another --store path"
        )
    return p


_SQLITE_FULL, _SQLITE_IOERR = 13, 10  # primary result codes of sqlite3.h


def disk_full_error(path: Path, exc: BaseException) -> StoreError | None:
    """The :class:`StoreError` to raise when writing the store at ``path`` failed with ``exc``
    because its disk is full (``None`` for any other failure).

    SQLite reports a full disk as ``SQLITE_FULL``, or as an I/O error when even its journal cannot
    grow; the latter counts as a full disk when less than 1 MiB is free.
    """
    if isinstance(exc, OSError):
        full = exc.errno == errno.ENOSPC
    elif isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        full = code == _SQLITE_FULL or (code == _SQLITE_IOERR and _free(path) < 2**20)
    else:
        full = False
    if not full:
        return None
    return StoreError(
        f"cannot write the store {path}: the disk is full ({exc}; {_free(path) // 1024} KiB "
        "free); free space or choose another --store"
    )


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent if str(path.parent) else ".").free
    except OSError:
        return 2**62  # unknown: not evidence of a full disk


def run_loads(env: Mapping[str, Any]) -> list[float]:
    """The 1-minute load averages a run's environment record holds: at its start, then at its end
    (either may be missing). A run's ``load1`` is the larger of the two."""
    return [float(v[0]) for v in (env.get("loadavg"), env.get("loadavg_end")) if v]


class Store:
    """A benchmark store at ``path`` (created with the current schema if absent).

    Args:
        path: the SQLite file.
        readonly: open an existing store without creating or migrating anything (reports, export).

    Raises:
        StoreError: unwritable path, not a curvlab store, or written by a newer schema.

    Example:
        >>> import tempfile, os
        >>> s = Store(os.path.join(tempfile.mkdtemp(), "s.sqlite"))
        >>> s.schema_version()
        3
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise StoreError(
                    f"no store at {self.path}; run `curvlab bench run --store {self.path}` first"
                )
        else:
            check_store_path(self.path)
        # A store that cannot be written (read-only file or folder) is read as an immutable file:
        # SQLite would otherwise need to create its WAL index next to it.
        frozen = readonly and not (
            os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        )
        target = f"{self.path.resolve().as_uri()}?immutable=1" if frozen else str(self.path)
        try:
            self.conn = sqlite3.connect(target, timeout=60.0, isolation_level=None, uri=frozen)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 60000")
            if not readonly:
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(
                        f"{self.path}: SQLite refused WAL mode ({mode}); use a local disk"
                    )
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self._check_or_create(readonly)
        except sqlite3.DatabaseError as exc:
            full = disk_full_error(self.path, exc)
            if full is not None:
                raise full from exc
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise StoreError(
                    f"the store {self.path} is read-only ({exc}); make it writable or choose "
                    "another --store path"
                ) from exc
            raise StoreError(f"{self.path} is not a usable curvlab store: {exc}") from exc

    # -- schema ---------------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        return {
            r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }

    def _check_or_create(self, readonly: bool) -> None:
        if not readonly and not self._tables():
            with self.transaction():
                if not self._tables():  # not created by another runner meanwhile
                    self._create()
        tables = self._tables()
        if "meta" not in tables:
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite database but not a curvlab store (tables: "
                    f"{sorted(tables)})"
                )
            raise StoreError(f"{self.path} is empty: not a curvlab store")
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer curvlab (store schema {version}, this "
                f"curvlab reads up to {SCHEMA_VERSION}); upgrade curvlab or use another --store "
                "path. Nothing was changed."
            )
        if version < SCHEMA_VERSION and not readonly:
            with self.transaction() as c:
                have = {r[1] for r in c.execute("PRAGMA table_info(runs)")}  # re-read: one migrates
                for col, kind in _ADDED_RUN_COLUMNS.items():
                    if col not in have:
                        c.execute(f"ALTER TABLE runs ADD COLUMN {col} {kind}")
                c.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )

    def _version(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            raise StoreError(
                f"{self.path} has a meta table but no schema_version: not a curvlab store"
            )
        return int(row[0])

    def _create(self) -> None:
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                self.conn.execute(stmt)
        from curvlab import __version__

        self.conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("schema_version", str(SCHEMA_VERSION)),
                ("created_by", f"curvlab {__version__}"),
                ("created_at", repr(time.time())),
            ],
        )

    def schema_version(self) -> int:
        """The store's schema version."""
        return self._version()

    @contextmanager
    def transaction(self) -> Any:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` for a sound database)."""
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # -- writing --------------------------------------------------------------------------------

    def register(
        self,
        suite_name: str,
        suite_json: str,
        problem_infos: Mapping[str, Mapping[str, Any]],
        runs: Iterable[Any],
    ) -> None:
        """Record a suite, its problems and its runs (existing runs untouched); one transaction."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO suites VALUES (?, ?, ?)",
                (suite_name, suite_json, time.time()),
            )
            for name, info in problem_infos.items():
                c.execute(
                    "INSERT OR REPLACE INTO problems VALUES (?, ?)", (name, json.dumps(dict(info)))
                )
            c.executemany(
                "INSERT OR IGNORE INTO runs (run_id, suite, problem, label, optimizer, hparams, "
                "seed, track, "
                "study, trial, budget_steps, eval_every) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.run_id,
                        suite_name,
                        r.problem,
                        r.label,
                        r.optimizer,
                        json.dumps(dict(r.hparams), sort_keys=True),
                        r.seed,
                        r.track,
                        r.study,
                        r.trial,
                        r.budget_steps,
                        r.eval_every,
                    )
                    for r in runs
                ],
            )

    def claim_run(
        self,
        run_id: str,
        owner: str,
        env: Mapping[str, Any],
        *,
        stale_after: float = STALE_AFTER_S,
    ) -> int | None:
        """Take ``run_id`` for ``owner`` and begin a new attempt, atomically (module docstring).

        The run is taken when it is pending or failed, already ``owner``'s, or owned by a runner
        that is gone (:func:`owner_alive`); the older evaluations are deleted in the same
        transaction (with the monitor values recorded under the run's id).

        Returns:
            The new attempt's number, or ``None`` when the run is done or a live runner holds it.

        Raises:
            StoreError: the run is not registered.
        """
        with self.transaction() as c:
            row = c.execute(
                "SELECT attempt, status, owner, heartbeat FROM runs WHERE run_id=?", (run_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"run {run_id} is not registered in {self.path}")
            attempt, status, holder, beat = row
            now = time.time()
            if status in DONE_STATUSES or (
                status == "running"
                and holder != owner
                and owner_alive(holder, beat, now, stale_after)
            ):
                return None
            attempt = int(attempt) + 1
            c.execute("DELETE FROM evals WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM monitors WHERE key=?", (run_id,))
            c.execute(
                "UPDATE runs SET status='running', attempt=?, started_at=?, finished_at=NULL, "
                "steps=NULL, "
                "grad_evals=NULL, hvp_evals=NULL, seconds=NULL, final_metric=NULL, "
                "final_loss=NULL, "
                "ttt_steps=NULL, ttt_grad_evals=NULL, ttt_seconds=NULL, diverged_step=NULL, "
                "error=NULL, "
                "env=?, owner=?, heartbeat=? WHERE run_id=?",
                (attempt, now, json.dumps(dict(env)), owner, now, run_id),
            )
        return attempt

    def heartbeat(self, owner: str) -> None:
        """Say that ``owner`` is alive: refresh the heartbeat of its running runs (one statement)."""
        self.conn.execute(
            "UPDATE runs SET heartbeat=? WHERE owner=? AND status='running'", (time.time(), owner)
        )

    def release(self, owner: str) -> None:
        """Give back ``owner``'s unfinished runs (status ``pending``), e.g. after a Ctrl-C."""
        self.conn.execute(
            "UPDATE runs SET status='pending', owner=NULL, heartbeat=NULL "
            "WHERE owner=? AND status='running'",
            (owner,),
        )

    def add_eval(
        self,
        run_id: str,
        attempt: int,
        step: int,
        grad_evals: float,
        hvp_evals: int,
        seconds: float,
        train_loss: float | None,
        metrics: Mapping[str, float],
    ) -> None:
        """Append one evaluation record and refresh the run's heartbeat (one transaction)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET heartbeat=? WHERE run_id=? AND attempt=?",
                (time.time(), run_id, attempt),
            )
            c.execute(
                "INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    attempt,
                    step,
                    grad_evals,
                    hvp_evals,
                    seconds,
                    _nan_to_none(train_loss),
                    json.dumps({k: _nan_to_none(float(v)) for k, v in metrics.items()}),
                ),
            )

    def add_monitor_values(self, key: str, step: int, values: Mapping[str, float]) -> None:
        """Record one monitor check (``name -> value`` at ``step``) under ``key``, one transaction.

        ``key`` is a run id or any label of a training run; NaN is stored as NULL.
        """
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO monitors VALUES (?,?,?,?,?)",
                [
                    (str(key), int(step), str(name), _nan_to_none(float(v)), now)
                    for name, v in values.items()
                ],
            )

    def monitor_values(self, key: str | None = None) -> list[dict[str, Any]]:
        """Monitor records (``key, step, name, value``), optionally of one key, in step order."""
        sql = "SELECT key, step, name, value FROM monitors"
        args: tuple[Any, ...] = ()
        if key is not None:
            sql, args = sql + " WHERE key = ?", (key,)
        rows = self.conn.execute(sql + " ORDER BY key, step, name", args).fetchall()
        return [{"key": r[0], "step": r[1], "name": r[2], "value": r[3]} for r in rows]

    def finish_run(
        self,
        run_id: str,
        attempt: int,
        status: str,
        summary: Mapping[str, Any],
        env_end: Mapping[str, Any] | None = None,
    ) -> None:
        """Mark attempt ``attempt`` of ``run_id`` as ``status`` with its summary (one transaction).

        ``env_end`` (load average and time at the end) is merged into the run's ``env`` JSON, and
        ``load1`` set to the larger 1-minute load average of start and end. A stale attempt (the
        run was restarted elsewhere) is ignored.
        """
        cols = [k for k in summary if k in _RUN_COLUMNS and k not in ("env", "load1")]
        sets = "".join(f", {k}=?" for k in cols)
        with self.transaction() as c:
            row = c.execute(
                "SELECT env FROM runs WHERE run_id=? AND attempt=?", (run_id, attempt)
            ).fetchone()
            if row is None:
                return
            env = json.loads(row[0]) if row[0] else {}
            for k, v in (env_end or {}).items():
                env[f"{k}_end"] = v
            loads = run_loads(env)
            c.execute(
                f"UPDATE runs SET status=?, finished_at=?, env=?, load1=?{sets} WHERE run_id=? AND "
                f"attempt=?",
                (
                    status,
                    time.time(),
                    json.dumps(env),
                    max(loads) if loads else None,
                    *[_nan_to_none(summary[k]) for k in cols],
                    run_id,
                    attempt,
                ),
            )

    # -- reading --------------------------------------------------------------------------------

    def runs(self, **where: Any) -> list[dict[str, Any]]:
        """Runs as dicts (``hparams``/``env`` decoded), filtered by equality on columns."""
        for k in where:
            if k not in _RUN_COLUMNS:
                raise StoreError(f"unknown run column {k!r}; columns: {', '.join(_RUN_COLUMNS)}")
        clause = " AND ".join(f"{k}=?" for k in where)
        rows = self.conn.execute(
            "SELECT * FROM runs"
            + (f" WHERE {clause}" if clause else "")
            + " ORDER BY problem, label, track, study, trial, seed",
            tuple(where.values()),
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["hparams"] = json.loads(d["hparams"])
            d["env"] = json.loads(d["env"]) if d["env"] else None
            out.append(d)
        return out

    def status_of(self, run_ids: Sequence[str]) -> dict[str, str]:
        """``run_id -> status`` for the given ids that exist."""
        out: dict[str, str] = {}
        for i in range(0, len(run_ids), 500):
            chunk = list(run_ids[i : i + 500])
            q = f"SELECT run_id, status FROM runs WHERE run_id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self.conn.execute(q, chunk)})
        return out

    def evals(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Evaluation records of the current attempt of one run (or all runs), by step."""
        q = (
            "SELECT e.* FROM evals e JOIN runs r ON e.run_id = r.run_id AND e.attempt = r.attempt"
            + (" WHERE e.run_id=?" if run_id else "")
            + " ORDER BY e.run_id, e.step"
        )
        rows = self.conn.execute(q, (run_id,) if run_id else ()).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            out.append(d)
        return out

    def problems(self) -> dict[str, dict[str, Any]]:
        """``name -> declared info`` of every problem recorded in the store."""
        return {
            r[0]: json.loads(r[1]) for r in self.conn.execute("SELECT name, info FROM problems")
        }

    def suites(self) -> dict[str, dict[str, Any]]:
        """``name -> suite JSON`` of every suite run into the store."""
        return {r[0]: json.loads(r[1]) for r in self.conn.execute("SELECT name, spec FROM suites")}

    # -- export ---------------------------------------------------------------------------------

    def export(self, out_dir: str | os.PathLike[str], fmt: str = "csv") -> list[Path]:
        """Write ``runs`` and ``evals`` (current attempts) as CSV files or one JSON file.

        CSV text cells that a spreadsheet would evaluate as a formula get a leading ``'``.

        Args:
            out_dir: directory to write into (created).
            fmt: ``"csv"`` (``runs.csv``, ``evals.csv``; JSON columns stay JSON strings) or
                ``"json"`` (``store.json`` with ``schema_version``, ``problems``, ``suites``,
                ``runs``, ``evals``).

        Returns:
            The written paths.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        runs, evals = self.runs(), self.evals()
        if fmt == "json":
            path = out / "store.json"
            doc = {
                "schema_version": self.schema_version(),
                "problems": self.problems(),
                "suites": self.suites(),
                "runs": runs,
                "evals": evals,
                "monitors": self.monitor_values(),
            }
            path.write_text(json.dumps(doc, indent=1, default=str))
            return [path]
        if fmt != "csv":
            raise StoreError(f"unknown export format {fmt!r}; use csv or json")
        p_runs, p_evals = out / "runs.csv", out / "evals.csv"
        with open(p_runs, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(_RUN_COLUMNS))
            w.writeheader()
            for r in runs:
                w.writerow(
                    _csv_safe(
                        {
                            **r,
                            "hparams": json.dumps(r["hparams"], sort_keys=True),
                            "env": json.dumps(r["env"]) if r["env"] else "",
                        }
                    )
                )
        metric_names = sorted({k for e in evals for k in e["metrics"]})
        with open(p_evals, "w", newline="") as fh:
            fields = [
                "run_id",
                "attempt",
                "step",
                "grad_evals",
                "hvp_evals",
                "seconds",
                "train_loss",
                *metric_names,
            ]
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for e in evals:
                row = {k: e[k] for k in fields[:7]}
                row.update({m: e["metrics"].get(m) for m in metric_names})
                w.writerow(_csv_safe(row))
        return [p_runs, p_evals]
