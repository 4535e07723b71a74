"""--config: files of 'name: value' lines (a run's args.txt is one), their precedence under the command
line, their refusals, and their part in resuming."""

import pathlib

import pytest

import vit_main
from tests.helpers import DETERMINISTIC_COLUMNS, read_metrics
from tests.helpers import expect_one_line_error


def parsed(*argv):
    args, given, _ = vit_main.parse_arguments(vit_main.build_parser(), [str(value) for value in argv])
    return args, given


def write(path, text):
    path.write_text(text)
    return path


def args_file(output_dir):
    return dict(line.split(": ", 1) for line in (output_dir / "args.txt").read_text().splitlines())


def test_config_values_replace_the_defaults_and_the_command_line_replaces_them(tmp_path):
    config = write(tmp_path / "c.txt", "# a header\n\nlr: 0.002\naugment: True\nnum_samples: -1\n"
                                       "coordinate_encoding: False\ndata_path: ./Elsewhere\n")
    args, given = parsed("--config", config)
    assert (args.lr, args.augment, args.num_samples, args.coordinate_encoding) == (0.002, True, -1, False)
    assert args.data_path == "./Elsewhere" and args.weight_decay == 1e-6
    assert {"lr", "augment", "num_samples", "coordinate_encoding", "data_path", "config"} == given
    args, _ = parsed("--config", config, "--lr", "0.003")
    assert (args.lr, args.augment) == (0.003, True)


@pytest.mark.slow
def test_a_finished_runs_args_txt_reruns_it(tiny_argv, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    vit_main.main(tiny_argv(first, "--num_epochs", "2", "--seed", "4", "--augment", "--scheduler", "cosine",
                            "--random_erasing", "0.3", "--sampling_type", "random", "--num_samples", "3"))
    vit_main.main(["--config", str(first / "args.txt"), "--output_dir", str(again)])
    stored, rerun = args_file(first), args_file(again)
    assert rerun.pop("output_dir") == str(again) and rerun.pop("config") == str(first / "args.txt")
    assert stored.pop("output_dir") == str(first) and stored.pop("config") == "None"
    assert rerun == stored
    for expected, actual in zip(read_metrics(first), read_metrics(again), strict=True):
        assert [actual[column] for column in DETERMINISTIC_COLUMNS] == [expected[column]
                                                                        for column in DETERMINISTIC_COLUMNS]
    # Its own output_dir is the file's: rerunning without --output_dir would write over the run, and is refused.
    capsys.readouterr()
    expect_one_line_error(capsys, ["--config", first / "args.txt"], 2, f"--output_dir: {first} holds an earlier run")


@pytest.mark.parametrize("text, starts_with", [
    ("lr: abc\n", "--config: {path} line 1: argument --lr: invalid float value: 'abc'"),
    ("# header\nlayer: Nope\n", "--config: {path} line 2: argument --layer: invalid choice: 'Nope'"),
    ("augment: sometimes\n", "--config: {path} line 1: argument --augment: expected True or False"),
    ("lr: None\n", "--config: {path} line 1: argument --lr: invalid float value: 'None'"),
    ("lr: 0.1\nlearning_rate: 0.1\n", "--config: {path} line 2: unknown flag 'learning_rate'"),
    ("--lr: 0.1\n", "--config: {path} line 1: unknown flag '--lr'"),
    ("lr: 0.1\nseed: 1\nlr: 0.2\n", "--config: {path} line 3: lr is set twice (first on line 1)"),
    ("lr 0.1\n", "--config: {path} line 1: expected 'name: value'"),
    ("lr: -1\n", "--lr: must be > 0, got -1.0 (set in --config {path} line 1)"),
])
def test_bad_config_files_are_one_line_naming_the_file_and_line(tmp_path, capsys, text, starts_with):
    path = write(tmp_path / "bad.txt", text)
    expect_one_line_error(capsys, ["--config", path, "--device", "cpu"], 2, starts_with.format(path=path))


def test_unreadable_config_files_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    expect_one_line_error(capsys, ["--config", missing], 2, f"--config: cannot read {missing} (No such file")
    expect_one_line_error(capsys, ["--config", tmp_path], 2, f"--config: cannot read {tmp_path} (Is a directory")
    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"\x80\x02\xff\xfe")
    expect_one_line_error(capsys, ["--config", binary], 2, f"--config: cannot read {binary} (not a UTF-8 text file")


@pytest.mark.slow
def test_keys_of_one_command_are_not_applied_from_a_file(tiny_argv, tmp_path, capsys):
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--num_epochs", "1"))
    config = write(tmp_path / "c.txt", "overwrite: True\nresume: None\ntest_only: False\ncheckpoint: None\n"
                                       "config: other.txt\n")
    capsys.readouterr()
    before = (run / "train_eval_results.txt").read_bytes()
    line = expect_one_line_error(capsys, [*tiny_argv(run, "--num_epochs", "1"), "--config", config], 2,
                                 "--output_dir: ")
    assert "holds an earlier run" in line and (run / "train_eval_results.txt").read_bytes() == before
    args, _ = parsed("--config", config)
    assert (args.overwrite, args.resume, args.test_only, args.checkpoint, args.config) == (
        False, None, False, None, str(config))


def test_ignored_keys_with_a_value_are_warned_about(tmp_path, capsys):
    config = write(tmp_path / "c.txt", "overwrite: True\nresume: auto\ntest_only: False\nconfig: base.txt\n")
    parsed("--config", config)
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"warning: --config: {config} line 1: overwrite: True is not applied; --overwrite acts on "
                        "one command: give it on the command line",
                        f"warning: --config: {config} line 2: resume: auto is not applied; --resume acts on one "
                        "command: give it on the command line",
                        f"warning: --config: {config} line 4: config: base.txt is not applied; a config file does "
                        "not read another; copy the lines you need"]


@pytest.mark.slow
def test_a_resume_refuses_config_values_that_differ_from_the_checkpoint(tiny_argv, tmp_path, capsys):
    run = tmp_path / "run"
    vit_main.main(tiny_argv(run, "--num_epochs", "1"))
    capsys.readouterr()
    changed = write(tmp_path / "changed.txt", "lr: 0.002\n")
    expect_one_line_error(capsys, ["--config", changed, "--output_dir", run, "--resume", "auto", "--num_epochs", "2"],
                          2, f"--lr: {run / 'last.pt'} was trained with --lr 0.001, not 0.002")
    # The run's own args.txt agrees with its checkpoint; the command line's --num_epochs overrides its 1.
    vit_main.main(["--config", str(run / "args.txt"), "--resume", "auto", "--num_epochs", "2"])
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2"]
    assert not (run / "args_changes.txt").read_text().count("lr")
    # --test_only takes the model from the checkpoint and refuses a config's other model, as a typed flag.
    wider = write(tmp_path / "wider.txt", "d_hidden: 64\n")
    expect_one_line_error(capsys, ["--config", wider, "--output_dir", run, "--test_only"], 2,
                          f"--d_hidden: {run / 'best.pt'} was trained with --d_hidden 32, not 64")



CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.txt"))


def test_configs_folder_holds_the_paper_setting():
    assert "vit_tiny_cifar10_paper.txt" in [path.name for path in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_shipped_config_parses_and_passes_the_checks(path, capsys):
    args, given = parsed("--config", path, "--device", "cpu")
    assert vit_main.argument_problems(args) == []
    assert "warning" not in capsys.readouterr().err
    assert path.read_text().startswith("#"), "a config says where its values come from in its header"
    # A comparison's shared settings leave out the layer, which each run of the comparison gives.
    assert {"num_layers", "d_hidden", "lr", "num_epochs"} <= given
    assert "layer" in given or "compare" in path.name


def test_the_paper_config_is_the_reference_codes_vit_tiny():
    args, _ = parsed("--config", CONFIGS[0].parent / "vit_tiny_cifar10_paper.txt")
    model = (args.layer, args.num_layers, args.num_heads, args.d_hidden, args.d_mlp, args.patch_size, args.resize)
    assert model == ("Attention", 12, 3, 192, 768, 16, 224)
    assert (args.optimizer, args.lr, args.weight_decay, args.scheduler) == ("adamw", 5e-4, 5e-2, "cosine")
    assert (args.dataset, args.num_epochs, args.batch_size, args.augment) == ("cifar10", 150, 256, False)
