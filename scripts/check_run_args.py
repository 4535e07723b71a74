"""Whether a run directory holds the run that sweep.sh would train there. The sweep asks before it skips a
finished run or continues an unfinished one, so that a directory trained with other flags (another DATASET,
EXTRA_FLAGS, EPOCHS or seed into the same OUTPUT_ROOT) is refused rather than counted as this sweep's.

    python scripts/check_run_args.py DIRECTORY finished|unfinished VIT_MAIN_FLAGS...

Exit code 0 when DIRECTORY/args.txt agrees with what VIT_MAIN_FLAGS would run; otherwise 1 and one line on
stdout naming the differing flag(s), such as
``args.txt has --dataset synthetic, the sweep runs --dataset cifar10 (and --resize differ too)``.

Flags that do not change the result (runs.RESUMABLE_FLAGS: device, loader, compilation...) are not
compared. An unfinished run is continued by vit_main, which itself allows --num_epochs to change
(recorded in args_changes.txt) and checks --batch_size against the number of processes: for it these two
are not compared either. A finished run must have trained for the sweep's --num_epochs.
"""

import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.run_settings import parsed_values, result_settings  # noqa: E402
from scripts.summarize import SkippedRun, read_args  # noqa: E402

LEFT_TO_VIT_MAIN_ON_RESUME = ("num_epochs", "batch_size")
STATES = ("finished", "unfinished")


def differing_flags(stored: Dict[str, str], planned: Dict[str, str], finished: bool) -> List[str]:
    """The flags whose stored value differs from the planned one, in the parser's order; a name that the parser
    lacks (an args.txt of another version) counts as differing."""
    defaults = parsed_values([])
    stored, planned = result_settings(stored, defaults), result_settings(planned, defaults)
    ignored = () if finished else LEFT_TO_VIT_MAIN_ON_RESUME
    names = [*planned, *(name for name in stored if name not in planned)]
    return [name for name in names if name not in ignored and stored.get(name) != planned.get(name)]


def difference_line(stored: Dict[str, str], planned: Dict[str, str], names: List[str]) -> str:
    """The first differing flag with both values, and the names of the others."""
    first, *others = names
    if first not in planned:
        line = f"args.txt has --{first} {stored[first]}, which this vit_main.py does not know"
    elif first not in stored:  # written before the flag existed, it ran the default, which is not the sweep's
        line = f"args.txt has no --{first}, the sweep runs --{first} {planned[first]}"
    else:
        line = f"args.txt has --{first} {stored[first]}, the sweep runs --{first} {planned[first]}"
    return line + (f" (and {', '.join('--' + name for name in others)} differ too)" if others else "")


def main(argv: List[str]) -> int:
    if len(argv) < 2 or argv[1] not in STATES:
        print("usage: check_run_args.py DIRECTORY finished|unfinished VIT_MAIN_FLAGS...", file=sys.stderr)
        return 2
    directory, state, flags = argv[0], argv[1], argv[2:]
    try:
        stored = read_args(directory)
    except SkippedRun as reason:
        print(reason)
        return 1
    planned = parsed_values(flags)
    names = differing_flags(stored, planned, finished=state == "finished")
    if names:
        print(difference_line(stored, planned, names))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
