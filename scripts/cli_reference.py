"""Writes docs/cli.md, the command-line reference of vit_main.py, from the parser itself.

Every flag appears under its --help group with its type or choices, its default, its help text and its role
(settings.Role: what the flag means for a run's result), so the page cannot drift from the program:
tests/test_readme.py checks that docs/cli.md is exactly what this script writes.

Usage: python scripts/cli_reference.py [--out docs/cli.md]
"""

import argparse
import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import settings  # noqa: E402
import vit_main  # noqa: E402
from run_files import atomic_write_text  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli.md")

INTRODUCTION = """\
# Command-line reference

This page is generated from `vit_main.py`'s parser by `python scripts/cli_reference.py`; do not edit it by
hand. `python vit_main.py --help` prints the same flags with their defaults.

- Flags whose type reads `True`/`False` take a word (`--softmax_topk_val False`) or stand alone, which
  means `True` (`--coordinate_encoding`).
- Flags whose type reads *switch* are off unless given (`--augment`). A switch that a `--config` file turns
  on cannot be turned off on the command line: write `False` in the file.
- A `--config FILE` holds `name: value` lines (the flag's name without `--`, as in a run's `args.txt`);
  flags on the command line win over the file, the file over the defaults.
- Every value is checked before any data is loaded; a bad one ends the program with exit code 2 and one
  line naming the flag.
"""

ROLES_INTRODUCTION = """\
Every flag has one role, which says what it means for a run's result, and so how resuming, evaluating, config
files, `scripts/summarize.py`'s groups and `scripts/sweep.sh`'s checks treat it. A stored flag not given on a
resume or to `--test_only` takes the checkpoint's value.
"""


def _cell(text: object) -> str:
    """Text made safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_text(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "*switch*"
    if action.choices is not None:
        return ", ".join(f"`{choice}`" for choice in action.choices)
    if action.type is settings.str2bool:
        return "`True`, `False`"
    if action.metavar:
        return f"*{action.metavar}*"
    return f"*{getattr(action.type, '__name__', 'str')}*"


def _default_text(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None:
        return "none"
    return f"`{action.default}`"


def role_table() -> List[str]:
    """The table of roles: what each role means for a run, from settings.Role's own properties."""
    yes_no = {True: "yes", False: "no"}
    lines = ["| role | the flag | stored in the run (args.txt, checkpoints) | a resume may change it "
             "| `--test_only` refuses another value than the checkpoint's | decides the result "
             "| a `--config` file sets it |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for role in settings.Role:
        resumable = "yes, recorded in `args_changes.txt`" if role.resumable else "no"
        if not role.stored:
            resumable = "not stored"
        lines.append(f"| `{role.name.lower()}` | {role.value} | {yes_no[role.stored]} | {resumable} "
                     f"| {yes_no[role.evaluated]} | {yes_no[role.decides_result]} | {yes_no[role.read_from_config]} |")
    return lines


def render() -> str:
    """The whole page."""
    parser = vit_main.build_parser()
    lines = [INTRODUCTION, "## Roles", "", ROLES_INTRODUCTION]
    lines += role_table()
    lines += ["", "Besides its flags, a run records three facts in `args.txt` (after the flags) and in its "
              "checkpoints:", ""]
    lines += [f"- `{name}`: {fact.help}{'' if fact.decides_result else ' (does not decide the result)'}."
              for name, fact in settings.FACTS.items()]
    lines.append("")
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.option_strings[0].startswith("--")
                   and action.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title[0].upper()}{group.title[1:]}", "",
                  "| flag | type or choices | default | role | description |", "| --- | --- | --- | --- | --- |"]
        for action in actions:
            role = settings.FLAGS[action.dest].role.name.lower()
            lines.append(f"| `{action.option_strings[0]}` | {_cell(_type_text(action))} "
                         f"| {_cell(_default_text(action))} | {role} | {_cell(action.help)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the command-line reference page from vit_main's parser.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="page to write")
    args = parser.parse_args(argv)
    atomic_write_text(args.out, render())
    print(args.out)


if __name__ == "__main__":
    main()
