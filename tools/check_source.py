"""Reject control characters in source files, and tabs in Python (run by ``make lint``).

Usage: ``python tools/check_source.py [PATH ...]``. Without paths it scans the files git tracks
(``*.py``, ``*.md``, ``*.toml``, ``*.yaml``, ``*.yml``, ``Makefile``); a folder stands for the files
of those kinds below it. It prints ``file:line: what``
for every offending line and exits 1 if there is any, 0 otherwise. Allowed: newline, carriage
return and, outside Python, tab (a Makefile needs them).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

PATTERNS = ("*.py", "*.md", "*.toml", "*.yaml", "*.yml", "Makefile", "*/Makefile")
CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def tracked_files() -> list[Path]:
    """The files git tracks that match :data:`PATTERNS`."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *PATTERNS], capture_output=True, check=True
    ).stdout
    return [Path(name) for name in out.decode().split("\0") if name]


def expand(paths: Sequence[str]) -> list[Path]:
    """The files named, and the source files below the folders named."""
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(f for f in path.rglob("*") if f.is_file() and _is_source(f))
        else:
            out.append(path)
    return out


def _is_source(path: Path) -> bool:
    return path.name == "Makefile" or path.suffix in {".py", ".md", ".toml", ".yaml", ".yml"}


def problems(path: Path) -> Iterator[str]:
    """``file:line: what`` for every line of ``path`` with a control character (or a tab in .py)."""
    tabs_banned = path.suffix == ".py"
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        found = sorted({f"0x{ord(m.group()):02x}" for m in CONTROL.finditer(line)})
        if found:
            yield f"{path}:{number}: control character(s) {', '.join(found)}"
        if tabs_banned and b"\t" in line:
            yield f"{path}:{number}: tab (indent Python with spaces; write \\t in strings)"


def main(argv: Sequence[str]) -> int:
    """Check ``argv`` (or every tracked source file); print the problems; 1 if any."""
    paths = expand(argv) if argv else [p for p in tracked_files() if p.is_file()]
    found = [line for path in paths for line in problems(path)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
