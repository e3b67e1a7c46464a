"""Every CLI failure is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from curvlab.bench.store import Store
from curvlab.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
TINY_SUITE = (
    "problems: {quadratic-k1e2: {budget_steps: 6, eval_every: 3, target: 1.0e-2}}\n"
    "optimizers: [torch-sgd-momentum]\ntracks: {defaults: {seeds: 1}}\n"
)


def _one_line(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["spectrum", "--tol", "0"], "argument --tol: expected a positive finite number, got 0"),
        (["spectrum", "--tol", "nan"], "argument --tol: expected a positive finite number"),
        (["spectrum", "--probes", "0"], "argument --probes: expected an integer >= 1, got 0"),
        (["spectrum", "--top-k", "-2"], "argument --top-k: expected an integer >= 1, got -2"),
        (["spectrum", "--lanczos-steps", "x"], "expected an integer >= 1, got 'x'"),
        (["bench", "run", "--store", "s", "--workers", "-3"], "argument --workers: expected an"),
        (["bench", "run", "--store", "s", "--workers", "0"], "argument --workers: expected an"),
        (["bench", "demo", "--workers", "0"], "argument --workers: expected an integer >= 1"),
        (["bench", "frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _exit_code(argv) == 2
    _one_line(capsys, fragment, "(see curvlab")
    assert not Path("s").exists()


_RETURNS_DATA = (
    "import torch\nfrom torch import nn\n\n\ndef build():\n"
    "    return nn.Linear(4, 3), nn.CrossEntropyLoss(), ({x}, torch.arange(16) % 3)\n"
)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (None, "cannot load {name}:build: ModuleNotFoundError: No module named"),
        ("def build():\n    raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU"),
        ("def build():\n    return 3\n", "must return a tuple (model, loss_fn, data)"),
        ("def build():\n    return 1, 2, 3\n", "with an nn.Module first, got tuple"),
        ("def build():\n    raise SystemExit(3)\n", "{name}:build() called sys.exit(3) instead"),
        ("import sys\nsys.exit(4)\n", "cannot load {name}:build: SystemExit: 4."),
    ],
)
def test_bad_model(
    source: str | None,
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = _spectrum_of_user_model(source, tmp_path, monkeypatch)
    _one_line(capsys, "curvlab spectrum: error: ", name, fragment.format(name=name))


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (
            "torch.randn(16, 5)",
            "the model raised on batch 0: mat1 and mat2 shapes cannot be multiplied (16x5 and 4x3)",
        ),
        (
            "torch.randint(0, 3, (16, 4))",
            "its inputs are torch.int64: convert integer features to the model's float dtype",
        ),
        ("torch.randn(16, 4, dtype=torch.float64)", "its inputs are torch.float64 and the model"),
    ],
)
def test_data_the_model_cannot_take(
    x: str,
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _spectrum_of_user_model(_RETURNS_DATA.format(x=x), tmp_path, monkeypatch)
    _one_line(capsys, "curvlab spectrum: error: ", fragment)


def _spectrum_of_user_model(
    source: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Run `spectrum --model NAME:build` on ``source`` (None: no such module); return NAME."""
    name = "nosuchmodule_xyz" if source is None else f"usermod_{abs(hash(source))}"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)  # the module lies in the current folder, as for `python -m`
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    assert main(["spectrum", "--model", f"{name}:build", "--out", str(tmp_path / "o")]) == 2
    return name


def test_a_model_function_interrupted_by_ctrl_c_is_not_turned_into_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curvlab.zoo import load_problem

    (tmp_path / "usermod_ctrl_c.py").write_text("def build():\n    raise KeyboardInterrupt\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        load_problem("usermod_ctrl_c:build")


def test_model_in_the_current_folder_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mymodel_cwd.py").write_text(Path(__file__).with_name("user_model.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    argv = ["spectrum", "--model", "mymodel_cwd:build", "--top-k", "1", "--trace-matvecs", "3"]
    argv += ["--layer-matvecs", "2", "--probes", "1", "--lanczos-steps", "4", "--out", "o"]
    assert main(argv) == 0
    assert (tmp_path / "o" / "spectrum.json").exists()


def _out_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {
        "file": (str(afile), "is a file; give a folder"),
        "inside": (str(afile / "sub"), f"lies inside the file {afile}"),
    }


@pytest.mark.parametrize("case", ["file", "inside", "readonly"])
@pytest.mark.parametrize(
    "command",
    [
        ["spectrum", "--out", "OUT"],
        ["bench", "run", "--suite", "SUITE", "--store", "STORE", "--report", "OUT"],
        ["bench", "demo", "--out", "OUT"],
        ["bench", "report", "--store", "STORE", "--out", "OUT"],
        ["bench", "export", "--store", "STORE", "--out", "OUT"],
        ["dynamics", "--all", "--quick", "--out", "OUT"],
    ],
)
def test_bad_out_is_refused_before_any_work(
    command: list[str],
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import curvlab.bench.runner
    import curvlab.phenomena.index
    import curvlab.zoo

    def no_work(*a: Any, **k: Any) -> Any:
        raise AssertionError("work started before --out was checked")

    for mod, attr in [
        (curvlab.bench.runner, "run_suite"),
        (curvlab.phenomena.index, "run_all"),
        (curvlab.zoo, "load_problem"),
    ]:
        monkeypatch.setattr(mod, attr, no_work)
    store = tmp_path / "st.sqlite"
    Store(store).close()
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE)
    if case == "readonly":
        out, fragment = str(tmp_path / "ro"), "is read-only; choose a writable folder"
        (tmp_path / "ro").mkdir()
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m, **k: False if str(p) == out else real(p, m, **k)
        )
    else:
        out, fragment = _out_cases(tmp_path)[case]
    subst = {"OUT": out, "STORE": str(store), "SUITE": str(suite)}
    assert main([subst.get(a, a) for a in command]) == 2
    _one_line(capsys, ": error: --", fragment)


def test_stores_that_cannot_be_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 200)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE t (x)")
    for store, fragment in [(junk, "not a usable curvlab store"), (foreign, "not a curvlab store")]:
        for cmd in (["report"], ["export", "--out", str(tmp_path / "x")]):
            assert main(["bench", *cmd, "--store", str(store)]) == 2
            _one_line(capsys, "curvlab bench: error:", fragment)
    # a damaged curvlab store: the header is intact, a page is not
    good = tmp_path / "good.sqlite"
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE)
    assert main(["bench", "run", "--suite", str(suite), "--store", str(good), "--in-process"]) == 0
    Store(good).conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(good.read_bytes())
    data[4096 : 4096 * 3] = b"\xff" * (4096 * 2)
    good.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["bench", "export", "--store", str(good), "--out", str(tmp_path / "y")]) != 0
    _one_line(capsys, "curvlab bench: error:")


def test_read_only_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE)
    store = tmp_path / "ro" / "st.sqlite"
    assert main(["bench", "run", "--suite", str(suite), "--store", str(store), "--in-process"]) == 0
    capsys.readouterr()
    real = os.access  # as if the file and its folder were read-only (the tests run as root)
    frozen = {str(store)}
    monkeypatch.setattr(
        os,
        "access",
        lambda p, m, **k: False if str(p) in frozen and m & os.W_OK else real(p, m, **k),
    )
    argv = ["bench", "run", "--suite", str(suite), "--store", str(store), "--in-process"]
    assert main(argv) == 2
    err = _one_line(capsys, "read-only")
    assert "not a curvlab store" not in err
    # reading it still works, in a read-only folder too
    frozen.add(str(store.parent))
    assert main(["bench", "export", "--store", str(store), "--out", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "runs.csv").exists()


def test_disk_full_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import curvlab.bench.runner

    def full(*a: Any, **k: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "st.sqlite"))

    monkeypatch.setattr(curvlab.bench.runner, "run_suite", full)
    assert main(["bench", "run", "--store", str(tmp_path / "st.sqlite")]) == 1
    _one_line(capsys, "curvlab bench: error: No space left on device: ", "st.sqlite")

    def sqlite_full(*a: Any, **k: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(curvlab.bench.runner, "run_suite", sqlite_full)
    assert main(["bench", "run", "--store", str(tmp_path / "st.sqlite")]) == 1
    _one_line(capsys, "database or disk is full")


def _tiny_run(tmp_path: Path, store: Path) -> tuple[Path, list[str]]:
    """A tiny suite file and the ``bench run`` argv that runs it in-process into ``store``."""
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE)
    return suite, ["bench", "run", "--suite", str(suite), "--store", str(store), "--in-process"]


def _sqlite_error(code: int, text: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code  # what sqlite3 sets (Python >= 3.11)
    return exc


def _raise(exc: BaseException) -> Any:
    def fail(*a: Any, **k: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("code", "text", "free"),
    [
        (sqlite3.SQLITE_FULL, "database or disk is full", 2**40),
        (sqlite3.SQLITE_IOERR, "disk I/O error", 24 * 1024),  # a journal that cannot grow
    ],
)
def test_store_created_on_a_full_disk(
    code: int,
    text: str,
    free: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from curvlab.errors import StoreError

    store = tmp_path / "full" / "st.sqlite"
    _, argv = _tiny_run(tmp_path, store)
    monkeypatch.setattr(Store, "_check_or_create", _raise(_sqlite_error(code, text)))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**41, 0, free))
    with pytest.raises(StoreError, match=r"^cannot write the store .*st\.sqlite: the disk is full"):
        Store(store)
    assert main(argv) == 2
    err = _one_line(capsys, f"error: cannot write the store {store}: the disk is full ({text}; ")
    assert "choose another --store" in err and "not a usable" not in err
    # an I/O error with space left is not blamed on the disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**41, 0, 2**40))
    if code == sqlite3.SQLITE_IOERR:
        with pytest.raises(StoreError, match="is not a usable curvlab store: disk I/O error"):
            Store(store)


def test_disk_full_during_the_runs_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from curvlab.bench.runner import run_suite
    from curvlab.bench.suites import load_suite
    from curvlab.errors import StoreError

    store = tmp_path / "st.sqlite"
    suite, argv = _tiny_run(tmp_path, store)
    full = _sqlite_error(sqlite3.SQLITE_FULL, "database or disk is full")
    monkeypatch.setattr(Store, "add_eval", _raise(full))
    with pytest.raises(StoreError, match=r"^cannot write the store .*st\.sqlite: the disk is full"):
        run_suite(load_suite(str(suite)), store, workers=0, progress=False)
    # the run is not blamed: it goes back to the queue for the rerun
    assert {r["status"] for r in Store(store).runs()} == {"pending"}
    assert main([*argv, "--no-progress"]) == 2
    err = _one_line(capsys, f"curvlab bench: error: cannot write the store {store}: the disk is")
    assert "note:" not in err


def test_disk_full_under_out_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import curvlab.bench.report

    store = tmp_path / "st.sqlite"
    _, run = _tiny_run(tmp_path, store)
    assert main(run) == 0
    capsys.readouterr()
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
    monkeypatch.setattr(Store, "export", _raise(no_space))
    monkeypatch.setattr(curvlab.bench.report, "write_report", _raise(no_space))
    out = tmp_path / "csv"
    for argv, where in [
        (["bench", "export", "--store", str(store), "--out", str(out)], f"--out {out}"),
        (["bench", "report", "--store", str(store)], f"--out {tmp_path / 'report'}"),
    ]:
        assert main(argv) == 2
        _one_line(capsys, f": error: cannot write into {where}: the disk is full (No space left")
    assert main([*run, "--no-progress", "--report", str(out)]) == 2
    summary, error = capsys.readouterr().err.splitlines()  # the run's summary, then the error
    assert (
        summary.startswith("suite s: 1 runs") and f"cannot write into --report {out}: the" in error
    )


def test_internal_errors_are_one_line_unless_debugging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import curvlab.bench.runner

    def bug(*a: Any, **k: Any) -> Any:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(curvlab.bench.runner, "run_suite", bug)
    argv = ["bench", "run", "--store", str(tmp_path / "st.sqlite")]
    assert main(argv) == 1
    _one_line(capsys, "internal error: ZeroDivisionError: oops (rerun with CURVLAB_DEBUG=1")
    monkeypatch.setenv("CURVLAB_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_suite_file_that_is_not_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "notyaml.yaml"
    suite.write_text("problems: [quadratic-k1e2\n  : bad")
    argv = ["bench", "run", "--suite", str(suite), "--store", str(tmp_path / "s"), "--in-process"]
    assert main(argv) == 2
    _one_line(
        capsys,
        f"curvlab bench: error: {suite}: not valid YAML at line 2, column 3: expected ',' or ']', "
        "but got ':'",
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_ctrl_c_exits_130_and_the_rerun_resumes(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "problems: {quadratic-k1e2: {budget_steps: 3000, eval_every: 5, target: 1.0e-2}}\n"
        "optimizers: [torch-sgd-momentum]\ntracks: {defaults: {seeds: 2}}\n"
    )
    store = tmp_path / "st.sqlite"
    argv = [sys.executable, "-m", "curvlab", "bench", "run", "--suite", str(suite)]
    argv += ["--store", str(store), "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    # a shell's background job (`make test &`) starts with SIGINT ignored, and an ignored signal
    # stays ignored across exec: give the CLI the default disposition a terminal would
    proc = subprocess.Popen(
        argv,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(store, timeout=5) as c:
                    n = c.execute("SELECT COUNT(*) FROM evals WHERE step > 0").fetchone()[0]
                if n:
                    break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    st = Store(store)
    assert st.integrity_check() == "ok"
    assert {r["status"] for r in st.runs()} <= {"pending", "finished"}  # nothing left 'running'
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert {r["status"] for r in st.runs()} == {"finished"}
