"""What a person watching a run sees: plain progress lines where there is no terminal, and refusals of the
command line as one line and a short hint."""

import pytest
import torch

import train_eval
import vit_main
from tests.helpers import TINY_MODEL_FLAGS, expect_one_line_error


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def tally_of(samples):
    tally = train_eval._Tally(torch.device("cpu"), num_classes=2)
    tally.add(torch.full((samples,), 0.5), torch.zeros(samples, 2), torch.zeros(samples, dtype=torch.long))
    return tally


def test_without_a_terminal_a_plain_line_comes_at_most_every_interval(capsys):
    clock = FakeClock()
    progress = train_eval.PlainProgress("epoch 3 train", steps=100, seconds=60.0, start=0.0, clock=clock)
    clock.now = 30.0
    progress.after_step(9, tally_of(320))
    assert capsys.readouterr().out == ""
    clock.now = 61.0
    progress.after_step(19, tally_of(640))
    line = capsys.readouterr().out
    # 20 of 100 steps in 61 s: 80 steps left take 244 s at that rate.
    assert line == "epoch 3 train: step 20/100, 10.5 img/s, about 4 min 04 s left, loss 0.5000\n"
    clock.now = 100.0
    progress.after_step(29, tally_of(960))
    assert capsys.readouterr().out == ""  # 39 s after the last line
    clock.now = 7300.0
    progress.after_step(49, tally_of(1600))
    assert "about 2 h 01 min left" in capsys.readouterr().out


def test_no_plain_line_on_a_terminal_or_at_the_last_step(capsys):
    clock = FakeClock()
    clock.now = 1000.0
    train_eval.PlainProgress("x", steps=10, seconds=None, start=0.0, clock=clock).after_step(3, tally_of(4))
    train_eval.PlainProgress("x", steps=10, seconds=60.0, start=0.0, clock=clock).after_step(9, tally_of(4))
    assert capsys.readouterr().out == ""


def test_a_refusal_is_its_line_and_a_hint_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(["--lr", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    program = vit_main.build_parser().prog  # vit_main.py from the shell; pytest's own name here
    assert capsys.readouterr().err.splitlines() == [
        f"{program}: error: --lr: must be > 0, got 0.0", f"{program}: see --help for every flag and its default"]


@pytest.mark.parametrize("flags", [
    ["--layer", "ConvNNAttention", "--K", "0"],  # refused where the model is built
    ["--dataset", "imagenet", "--data_path", "{missing}"],  # refused where the data is looked for
])
def test_a_refused_command_leaves_no_output_folder_behind(flags, tmp_path, capsys):
    output_dir = tmp_path / "new" / "run"
    argv = [*TINY_MODEL_FLAGS, "--output_dir", str(output_dir),
            *(flag.format(missing=tmp_path / "no_data") for flag in flags)]
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(argv)
    assert exit_info.value.code == 2
    assert not (tmp_path / "new").exists()


def test_an_output_folder_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = expect_one_line_error(capsys, [*TINY_MODEL_FLAGS, "--output_dir", tmp_path / "file" / "run"], 2,
                                 "--output_dir: cannot write to ")
    assert "is not a directory" in line
