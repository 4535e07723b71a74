"""The README stays true to the program: its test command is CI's, and every flag is documented."""

import re
from pathlib import Path

import vit_main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README_VIT.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    readme_command = re.search(r"```shell\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [readme_command]


def test_every_flag_has_a_row_in_the_flag_tables():
    readme = (ROOT / "README_VIT.md").read_text()
    flags = [option for action in vit_main.build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    missing = [flag for flag in flags if f"| `{flag}` |" not in readme]
    assert not missing
