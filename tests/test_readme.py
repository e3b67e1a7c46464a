"""The README's code runs as written, and its first lines give exactly the two commands."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_first_lines_are_the_two_commands() -> None:
    commands = [line.split("#")[0].strip() for line in README.splitlines()[2:4]]
    assert commands == ["make demo", "make test"]


def test_the_library_in_ten_lines_runs(capsys) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)[:1]
    exec(compile(block, "README.md", "exec"), {})
    assert "trace/n" in capsys.readouterr().out
