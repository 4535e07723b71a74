"""Whether a run directory holds the run that sweep.sh would train there. The sweep asks before it skips a
finished run or continues an unfinished one, so that a directory trained with other flags (another DATASET,
EXTRA_FLAGS, EPOCHS or seed into the same OUTPUT_ROOT) is refused rather than counted as this sweep's.

    python scripts/check_run_args.py DIRECTORY finished|unfinished VIT_MAIN_FLAGS...

Exit code 0 when DIRECTORY/args.txt agrees with what VIT_MAIN_FLAGS would run; otherwise 1 and one line on
stdout naming the differing flag(s), such as
``args.txt has --dataset synthetic, the sweep runs --dataset cifar10 (and --resize differ too)``.

Only what decides the result is compared (settings.result_settings: not the flags saying where and how
fast a run runs). An unfinished run is continued by vit_main, which itself allows --num_epochs to change
(recorded in args_changes.txt) and checks --batch_size against the number of processes: for it these two
are not compared either. A finished run must have trained for the sweep's --num_epochs, with the sweep's
global batch when ``--processes N`` (the processes each run of the sweep starts) comes first and args.txt
records one.
"""

import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import settings  # noqa: E402
from scripts.summarize import SkippedRun, read_args  # noqa: E402

# What vit_main itself allows to change when it continues a run: the flags deciding the result that a resume may
# change (how long it trains), and --batch_size with the global batch, which it checks against the processes.
LEFT_TO_VIT_MAIN_ON_RESUME = (*settings.names(lambda role: role.resumable and role.decides_result), "batch_size",
                              "global_batch")
STATES = ("finished", "unfinished")


def parsed_values(flags: List[str]) -> Dict[str, str]:
    """Every flag's value, as args.txt writes it, for the vit_main command line ``flags``."""
    return {name: str(value) for name, value in vars(settings.build_parser().parse_args(flags)).items()}


def differing_flags(stored: Dict[str, str], planned: Dict[str, str], finished: bool) -> List[str]:
    """The flags whose stored value differs from the planned one, in the parser's order; a name that the parser
    lacks (an args.txt of another version) counts as differing. A fact (the global batch, the data) is compared
    only where both sides know it: the sweep cannot know the data's fingerprint before the data is read."""
    stored, planned = settings.result_settings(stored), settings.result_settings(planned)
    ignored = () if finished else LEFT_TO_VIT_MAIN_ON_RESUME
    names = [*planned, *(name for name in stored if name not in planned)]
    return [name for name in names if name not in ignored and stored.get(name) != planned.get(name)
            and not (name in settings.FACTS and (name not in stored or name not in planned))]


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
    processes = None
    if argv[:1] == ["--processes"] and len(argv) > 1 and argv[1].isdigit() and int(argv[1]) > 0:
        processes, argv = int(argv[1]), argv[2:]
    if len(argv) < 2 or argv[1] not in STATES:
        print("usage: check_run_args.py [--processes N] DIRECTORY finished|unfinished VIT_MAIN_FLAGS...",
              file=sys.stderr)
        return 2
    directory, state, flags = argv[0], argv[1], argv[2:]
    try:
        stored = read_args(directory)
    except SkippedRun as reason:
        print(reason)
        return 1
    planned = parsed_values(flags)
    if processes is not None:
        planned["global_batch"] = str(int(planned["batch_size"]) * processes)
    names = differing_flags(stored, planned, finished=state == "finished")
    if names:
        print(difference_line(stored, planned, names))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
