"""The README keeps the promises the code makes."""

from __future__ import annotations

import re
from pathlib import Path

import handoff
from handoff.config import ENVIRONMENT_VARIABLES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_environment_variable_is_documented() -> None:
    documented = set(re.findall(r"^\| `(HANDOFF_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    assert documented == {name for name, _ in ENVIRONMENT_VARIABLES}


def test_quickstart_is_exactly_make_demo_and_make_test() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_public_names_used_in_the_readme_exist() -> None:
    for name in set(re.findall(r"handoff\.([A-Z][A-Za-z]+)", README)):
        assert name in handoff.__all__, name
