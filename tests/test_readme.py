"""The documentation stays true to the program: the front page's test command is CI's, every command and
path it shows exists and parses, every link resolves, the generated command-line reference is current, and
the quickstart, its config file and the evaluation example run."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import vit_main
from scripts import cli_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README_VIT.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
# The shell variables of the front page's comparison loop, given one value each so that its command parses.
LOOP_VALUES = {"layer": "ConvNNAttention", "seed": "1"}


def shell_commands(markdown: str):
    """The lines of every ```shell block, continuation lines joined."""
    for block in re.findall(r"```shell\n(.*?)```", markdown, re.S):
        yield from block.replace("\\\n", " ").splitlines()


def vit_main_argvs(markdown: str):
    """The arguments of every `python vit_main.py ...` command in the shell blocks, loop variables filled in."""
    for line in shell_commands(markdown):
        if "vit_main.py" not in line:
            continue
        filled = re.sub(r"\$\{?(\w+)\}?", lambda match: LOOP_VALUES[match.group(1)], line)
        words = shlex.split(filled)
        argv = words[words.index("vit_main.py") + 1:]
        ends = [index for index, word in enumerate(argv) if word in ("&&", ";", "|")]
        yield argv[:ends[0]] if ends else argv


def heading_anchors(markdown: str):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def quickstart_argv() -> list:
    section = README.read_text().split("## Quickstart", 1)[1]
    return next(vit_main_argvs(section))


def replace_flag(argv: list, flag: str, value: str) -> list:
    index = argv.index(flag)
    return argv[:index + 1] + [value] + argv[index + 2:]


def test_ci_runs_exactly_the_readme_test_command():
    readme = README.read_text()
    section = readme.split("## Run the tests", 1)[1]
    readme_command = re.search(r"```shell\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [readme_command]


def test_the_command_line_reference_is_what_its_script_writes():
    assert CLI_PAGE.read_text() == cli_reference.render(), "run: python scripts/cli_reference.py"


def test_every_flag_has_a_row_in_the_command_line_reference():
    page = CLI_PAGE.read_text()
    flags = [option for action in vit_main.build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    missing = [flag for flag in flags if f"| `{flag}` |" not in page]
    assert flags and not missing


def test_every_vit_main_command_of_the_front_page_parses(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name config files relative to the repository
    argvs = list(vit_main_argvs(README.read_text()))
    assert len(argvs) >= 6
    for argv in argvs:
        vit_main.parse_arguments(vit_main.build_parser(), argv)


def test_every_script_and_config_the_front_page_names_exists():
    paths = set(re.findall(r"(?<![\w/])((?:scripts|configs)/[\w./-]*\w)", README.read_text()))
    assert "scripts/summarize.py" in paths and "configs/quickstart_cpu.txt" in paths
    assert not [path for path in sorted(paths) if not (ROOT / path).exists()]


def test_every_link_of_the_front_page_and_the_docs_resolves():
    pages = [README, *sorted((ROOT / "docs").glob("**/*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken


def test_the_quickstart_config_file_holds_the_quickstart_command(monkeypatch):
    monkeypatch.chdir(ROOT)
    from_flags = vars(vit_main.parse_arguments(vit_main.build_parser(), quickstart_argv())[0])
    from_file = vars(vit_main.parse_arguments(vit_main.build_parser(), [
        "--config", "configs/quickstart_cpu.txt", "--output_dir", from_flags["output_dir"]])[0])
    assert {name: value for name, value in from_file.items() if name != "config"} == \
        {name: value for name, value in from_flags.items() if name != "config"}


@pytest.mark.slow
def test_the_quickstart_config_file_trains(monkeypatch, small_synthetic, tmp_path):
    monkeypatch.chdir(ROOT)
    vit_main.main(["--config", "configs/quickstart_cpu.txt", "--output_dir", str(tmp_path / "run"),
                   "--num_epochs", "1"])
    assert "Max Accuracy:" in (tmp_path / "run" / "train_eval_results.txt").read_text()


@pytest.mark.slow
def test_the_quickstart_and_the_evaluation_example_run(tmp_path):
    """The front page's quickstart for one epoch, then its evaluation example on that run, as processes."""
    readme = README.read_text()
    output_dir = str(tmp_path / "quickstart")
    train = replace_flag(replace_flag(quickstart_argv(), "--num_epochs", "1"), "--output_dir", output_dir)
    evaluate = next(vit_main_argvs(readme.split("## Evaluate a trained run", 1)[1]))
    evaluate = replace_flag(evaluate, "--output_dir", output_dir)
    for argv in (train, evaluate):
        finished = subprocess.run([sys.executable, "vit_main.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-2000:]
    assert "[Test] Loss:" in (tmp_path / "quickstart" / "test_results.txt").read_text()
