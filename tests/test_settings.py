"""The one declaration of the flags (settings.py): the parser, resume, evaluation, config files, summaries and
sweep checks all read it; and the facts a run records beside its flags (processes, global batch)."""

import argparse
import csv

import pytest

import checkpoints
import runs
import settings
import vit_main
from scripts import check_run_args, summarize
from settings import Role
from tests.helpers import TINY_MODEL_FLAGS, expect_one_line_error, train_small_run
from tests.test_summary_statistics import finished_run


def test_the_parser_has_exactly_the_declared_flags_in_their_order():
    parsed = vars(vit_main.build_parser().parse_args([]))
    assert list(parsed) == list(settings.FLAGS)
    assert parsed == settings.defaults()


def test_each_role_says_what_a_resume_an_evaluation_a_config_file_and_a_summary_do_with_a_flag():
    table = {role: (role.stored, role.resumable, role.evaluated, role.decides_result, role.read_from_config)
             for role in Role}
    assert table == {
        Role.MODEL: (True, False, True, True, True),
        Role.DATA: (True, False, True, True, True),
        Role.TRAINING: (True, False, False, True, True),
        Role.LENGTH: (True, True, False, True, True),
        Role.RUNTIME: (True, True, False, False, True),
        Role.OUTPUT: (False, False, False, False, True),
        Role.COMMAND: (False, False, False, False, False),
    }


def test_the_roles_of_the_flags_that_are_no_setting_of_the_model_or_the_training():
    assert settings.RESUMABLE == ["data_path", "num_workers", "data_loader", "num_epochs", "use_compiled",
                                  "compile_mode", "checkpoint_steps", "deterministic", "device", "tensorboard"]
    assert settings.EVALUATED == [*settings.MODEL, "dataset", "resize"]
    assert settings.names(lambda role: not role.stored) == ["output_dir", "test_only", "checkpoint", "test_weights",
                                                            "resume", "overwrite", "config"]
    assert settings.names(lambda role: not role.read_from_config) == ["test_only", "checkpoint", "resume",
                                                                      "overwrite", "config"]


@pytest.mark.parametrize("name, value, message", [
    ("lr", 0.0, "--lr: must be > 0, got 0.0"),
    ("batch_size", 0, "--batch_size: must be >= 1, got 0"),
    ("val_split", 1.0, "--val_split: must be in [0, 1) (a fraction of each class), got 1.0"),
    ("random_erasing", 1.5, "--random_erasing: must be between 0 and 1 (a probability), got 1.5"),
    ("branch_ratio", -0.5, "--branch_ratio: must be between 0 and 1, got -0.5"),
    ("sample_padding", -1, "--sample_padding: must be >= 0, got -1"),
])
def test_a_declared_bound_is_one_line_naming_the_flag(name, value, message):
    assert settings.bound_problems({**settings.defaults(), name: value}) == [message]


def test_a_number_no_flag_can_mean_is_refused_before_the_bounds():
    assert settings.bound_problems({"lr": float("nan")}) == ["--lr: must be a finite number, got nan"]


def test_result_settings_leave_out_where_a_run_ran_and_keep_what_decides_it():
    recorded = {**{name: str(value) for name, value in settings.defaults().items()}, "processes": "2",
                "global_batch": "64", "data": "synthetic"}
    kept = settings.result_settings(recorded)
    assert not {"device", "num_workers", "data_path", "data_loader", "output_dir", "resume", "processes"} & set(kept)
    assert {"lr", "layer", "num_epochs", "dataset", "global_batch", "data"} <= set(kept)
    # A name of another version's args.txt is kept, so that it separates runs.
    assert settings.result_settings({"flag_from_elsewhere": "1"})["flag_from_elsewhere"] == "1"


# ---------------------------------------------------------------------------------------------
# The global batch: recorded by every run, compared by summaries, sweeps and config files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    return train_small_run(tmp_path_factory.mktemp("facts"), "--num_epochs", "1", "--batch_size", "32")


def recorded(run):
    return dict(line.split(": ", 1) for line in (run / "args.txt").read_text().splitlines())


def test_a_run_records_its_processes_and_global_batch_after_its_flags(one_epoch_run):
    lines = (one_epoch_run / "args.txt").read_text().splitlines()
    names = [line.split(": ", 1)[0] for line in lines]
    assert names[:len(settings.FLAGS)] == list(settings.FLAGS)
    assert recorded(one_epoch_run)["processes"] == "1" and recorded(one_epoch_run)["global_batch"] == "32"
    assert names[len(settings.FLAGS):] == ["processes", "global_batch", "data"]
    assert recorded(one_epoch_run)["data"].startswith("synthetic classes=10:")
    assert checkpoints.load_checkpoint(one_epoch_run / "last.pt")["args"]["data"] == recorded(one_epoch_run)["data"]


def test_summaries_keep_runs_on_other_data_apart(tmp_path):
    # Identical flags, two image folders: averaging them as seeds of one setting would be wrong.
    root = tmp_path / "runs"
    finished_run(root / "folder_a_s0", 0, (50.0, 80.0), dataset="imagenet", data="imagenet classes=3:aa content=1")
    finished_run(root / "folder_a_s1", 1, (50.0, 82.0), dataset="imagenet", data="imagenet classes=3:aa content=1")
    finished_run(root / "folder_b_s0", 0, (50.0, 60.0), dataset="imagenet", data="imagenet classes=3:bb content=2")
    assert seeds_per_group(root, tmp_path / "summary") == {"folder_a": "2", "folder_b": "1"}


def seeds_per_group(root, out_dir):
    assert summarize.main([str(root), "--out_dir", str(out_dir)]) == 0
    with open(out_dir / "groups.csv", newline="") as handle:
        return {row["group"]: row["n_seeds"] for row in csv.DictReader(handle)}


def test_summaries_keep_runs_of_two_global_batches_apart(tmp_path, capsys):
    # The same flags; one run trained in two processes, so with twice the global batch.
    root = tmp_path / "runs"
    finished_run(root / "one_process_s0", 0, (50.0, 80.0), batch_size=32, processes=1, global_batch=32)
    finished_run(root / "one_process_s1", 1, (50.0, 81.0), batch_size=32, processes=1, global_batch=32)
    finished_run(root / "two_processes_s0", 0, (50.0, 70.0), batch_size=32, processes=2, global_batch=64)
    assert seeds_per_group(root, tmp_path / "summary") == {"one_process": "2", "two_processes": "1"}


def test_a_sweep_counts_a_finished_run_only_with_its_global_batch(one_epoch_run, capsys):
    flags = [*TINY_MODEL_FLAGS, "--num_epochs", "1", "--batch_size", "32"]  # the run's own
    assert check_run_args.main(["--processes", "1", str(one_epoch_run), "finished", *flags]) == 0
    assert check_run_args.main(["--processes", "2", str(one_epoch_run), "finished", *flags]) == 1
    assert "args.txt has --global_batch 32, the sweep runs --global_batch 64" in capsys.readouterr().out
    # An unfinished run is left to vit_main, which checks the global batch itself when it continues the run.
    assert check_run_args.main(["--processes", "2", str(one_epoch_run), "unfinished", *flags]) == 0


def test_an_args_txt_of_two_processes_is_refused_in_one(tmp_path, capsys):
    config = tmp_path / "args.txt"
    config.write_text("batch_size: 32\nlr: 0.001\nprocesses: 2\nglobal_batch: 64\n")
    line = expect_one_line_error(capsys, ["--config", config, "--device", "cpu"], 2, "--batch_size: ")
    assert f"{config} records a global batch of 64 images (line 4)" in line
    assert line.endswith("give --batch_size 64 for 1 process(es)")
    # The command line's --batch_size is a choice made knowingly: it wins, as over any value of the file.
    args, _, _ = vit_main.parse_arguments(vit_main.build_parser(), ["--config", str(config), "--batch_size", "16"])
    assert args.batch_size == 16


def test_an_args_txt_of_one_process_is_read_in_one(tmp_path):
    config = tmp_path / "args.txt"
    config.write_text("batch_size: 32\nprocesses: 1\nglobal_batch: 32\ndata: synthetic\n")
    args, given, _ = vit_main.parse_arguments(vit_main.build_parser(), ["--config", str(config)])
    assert args.batch_size == 32 and "global_batch" not in vars(args) and given == {"batch_size", "config"}


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    config = tmp_path / "windows.txt"
    config.write_bytes("lr: 0.002\r\naugment: True\r\n".encode("utf-8-sig"))
    args, _, _ = vit_main.parse_arguments(vit_main.build_parser(), ["--config", str(config)])
    assert (args.lr, args.augment) == (0.002, True)


def test_a_resume_with_other_data_is_refused(one_epoch_run, tmp_path):
    stored = runs.Resumed(str(one_epoch_run / "last.pt"), {}, {**recorded(one_epoch_run), "data": "cifar10 (a)"}, [])
    with pytest.raises(runs.UsageError, match="^--data_path: .* was trained on other data"):
        runs._check_same_data(stored, {"data": "cifar10 (b)"})
    runs._check_same_data(stored, {"data": "cifar10 (a)"})


def test_every_flag_is_typed_as_its_default():
    for flag in settings.FLAGS.values():
        if flag.default is not None:
            assert isinstance(flag.default, flag.type) or (flag.type is float and isinstance(flag.default, int)), \
                flag.name
        assert isinstance(flag.role, Role) and flag.group in settings.GROUPS
    assert isinstance(vit_main.build_parser(), argparse.ArgumentParser)
