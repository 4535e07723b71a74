"""Which values of a run's ``args.txt`` decide its result. Shared by summarize.py (runs that differ only in
``--seed`` form one group) and check_run_args.py (sweep.sh refuses a directory trained with other flags).

An args.txt holds every flag as ``name: value``, the value written with ``str``. Its values are compared
as those strings, against ``str`` of what vit_main's parser gives for a command line.
"""

import sys
from pathlib import Path
from typing import Dict, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vit_main  # noqa: E402
from runs import INVOCATION_FLAGS, RESUMABLE_FLAGS  # noqa: E402

# Flags that leave the result alone: those of one invocation, and those a resumed run may change because
# they say where and how fast it runs (runs.RESUMABLE_FLAGS), except --num_epochs, which says how long it trains.
NOT_DECIDING_RESULT = frozenset(INVOCATION_FLAGS) | (frozenset(RESUMABLE_FLAGS) - {"num_epochs"})


def parsed_values(flags: Iterable[str]) -> Dict[str, str]:
    """Every flag's value, as args.txt writes it, for the vit_main command line ``flags``."""
    return {name: str(value) for name, value in vars(vit_main.build_parser().parse_args(list(flags))).items()}


def result_settings(arguments: Dict[str, str], defaults: Dict[str, str]) -> Dict[str, str]:
    """The values of ``arguments`` (an args.txt) that decide the result. A flag that an args.txt written by an
    older version lacks counts as its default (``defaults``): a new option is off by default, as that version ran."""
    return {name: value for name, value in {**defaults, **arguments}.items() if name not in NOT_DECIDING_RESULT}
