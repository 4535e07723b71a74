"""scripts/gpu_check.sh and the scripts it runs, checked on the CPU: every command it would run parses and passes its
program's checks of flags, a failed or overrunning step leaves the others running and shows in the summary, and the
device check and the benchmarks' new flags behave."""

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataset
import models.neighbour_conv as neighbour_conv_module
import utils
import vit_main
from models.vit_layers import LAYER_REGISTRY
from tests.helpers import expect_one_line_error

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPOSITORY / "scripts"))

import benchmark  # noqa: E402
import benchmark_convnn  # noqa: E402
import check_device  # noqa: E402

CORRECTNESS_STEPS = {"environment", "check_device", "train_torchrun", "recipe"}
TIMED_STEPS = ["benchmark_layers_float32", "benchmark_layers_bfloat16", "benchmark_models_float32",
               "benchmark_models_bfloat16", "profile"]


def gpu_check(out_dir, **environment):
    return subprocess.run(["bash", str(SCRIPT), str(out_dir)], cwd=REPOSITORY, capture_output=True, text=True,
                          env={**os.environ, **environment}, timeout=600)


def dry_run_steps(out_dir):
    """``(step, seconds, command)`` for every step the script would run."""
    finished = gpu_check(out_dir, DRY_RUN="1")
    assert finished.returncode == 0, finished.stderr
    steps = []
    for line in finished.stdout.splitlines():
        name, command = line.split("] ", 1)
        timeout, seconds, *command = shlex.split(command)
        assert timeout == "timeout"
        steps.append((name.lstrip("["), int(seconds), command))
    return steps


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_dry_run_prints_every_step_within_8_minutes_and_writes_nothing(tmp_path):
    steps = dry_run_steps(tmp_path / "out")
    names = [name for name, _, _ in steps]
    layers = {f"train_{layer}" for layer in LAYER_REGISTRY}
    assert set(names) == CORRECTNESS_STEPS | layers | set(TIMED_STEPS) and len(names) == len(set(names))
    assert names[-len(TIMED_STEPS):] == TIMED_STEPS  # timed alone, after the correctness steps
    seconds = dict((name, limit) for name, limit, _ in steps)
    side_by_side = max(seconds[name] for name in names[:-len(TIMED_STEPS)])
    assert side_by_side + sum(seconds[name] for name in TIMED_STEPS) + 5 * (1 + len(TIMED_STEPS)) < 8 * 60
    assert not (tmp_path / "out").exists()


def without_environment(command, monkeypatch):
    """The command after ``env NAME=VALUE...``, those variables set for the test."""
    if command[0] != "env":
        return command
    command = command[1:]
    while "=" in command[0]:
        name, value = command.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    return command


def check_vit_main_flags(argv):
    args = vit_main.build_parser().parse_args(argv)
    assert vit_main.argument_problems(args) == []
    vit_main.build_model(args, dataset.image_size(args.dataset, args.resize), 10)
    assert dataset.synthetic_sizes()[0] >= args.batch_size  # a full batch in every epoch
    return args


def test_every_command_of_the_gpu_check_parses_and_passes_its_programs_checks(tmp_path, monkeypatch):
    # The device is refused here only because this machine lacks it.
    monkeypatch.setattr(utils, "device_problem", lambda name: None)
    monkeypatch.setattr(benchmark, "device_problem", lambda name: None)
    monkeypatch.setattr(benchmark_convnn, "device_problem", lambda name: None)
    monkeypatch.setattr(benchmark_convnn, "print_profile", lambda args: None)
    checked = set()
    for name, _, command in dry_run_steps(tmp_path):
        with monkeypatch.context() as patch:
            python, *arguments = without_environment(command, patch)
            assert python == str(REPOSITORY / ".venv" / "bin" / "python") or python == "python3"
            if arguments[:2] == ["-m", "torch.distributed.run"]:
                from torch.distributed.run import get_args_parser

                launch = get_args_parser().parse_args(arguments[2:])
                assert launch.nproc_per_node == "1" and launch.training_script == "vit_main.py"
                arguments = [launch.training_script, *launch.training_script_args]
            if arguments[:2] == ["-m", "torch.utils.collect_env"]:
                assert importlib.util.find_spec("torch.utils.collect_env") is not None
            elif arguments[0] == "vit_main.py":
                assert check_vit_main_flags(arguments[1:]).device == "cuda"
            elif arguments[0] == "scripts/check_device.py":
                assert check_device.build_parser().parse_args(arguments[1:]).device == "cuda"
            elif arguments[0] == "scripts/benchmark.py":
                args = benchmark.build_parser().parse_args(arguments[1:])
                assert benchmark.argument_problems(args, set(args.parts.split(","))) == []
                assert args.device == "cuda" and (args.amp_dtype == "bfloat16") == name.endswith("bfloat16")
            elif arguments[0] == "scripts/benchmark_convnn.py":
                benchmark_convnn.main(arguments[1:])
            else:
                pytest.fail(f"{name}: an unexpected command {command}")
        checked.add(name)
    assert len(checked) == len(CORRECTNESS_STEPS) + len(LAYER_REGISTRY) + len(TIMED_STEPS)


STUB_PYTHON = """#!/bin/sh
case "$*" in
    *check_device*) echo "models/neighbour_conv.py:1: TritonFallbackWarning: ConvNN-Attention: Triton cannot"; exit 3 ;;
    *benchmark_convnn*) exec sleep 30 ;;
esac
echo "ran $*"
"""


def test_a_failed_or_overrunning_step_leaves_the_others_running_and_shows_in_the_summary(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "out"
    finished = gpu_check(out, PYTHON=str(stub), STEPS="check_device recipe benchmark_layers_float32 profile",
                         PROFILE_SECONDS="1")
    assert finished.returncode == 1
    summary = (out / "summary.md").read_text()
    assert finished.stdout == summary
    assert "| check_device | failed (exit 3) |" in summary
    assert "| recipe | passed |" in summary and "| benchmark_layers_float32 | passed |" in summary
    assert "| profile | timed out | " in summary
    assert "2 passed, 2 did not pass" in summary
    assert "could not compile or launch (the CPU passes ran instead) in: check_device.log" in summary
    assert "ran vit_main.py" in (out / "logs" / "recipe.log").read_text()


@pytest.mark.slow
def test_the_recipe_and_profile_steps_pass_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    finished = gpu_check(out, DEVICE="cpu", STEPS="recipe profile", SYNTHETIC_SIZES="128,64", PROFILE_SECONDS="300",
                         PARALLEL_SECONDS="300")
    assert finished.returncode == 0, finished.stdout
    assert "| recipe | passed |" in finished.stdout and "| profile | passed |" in finished.stdout
    assert (out / "runs" / "recipe" / "metrics.csv").is_file()
    assert "ms of self CPU time per step" in finished.stdout


ONE_COMBINATION = [dict(sampling_type="random", magnitude_type="matmul", softmax_topk_val=True,
                        convolution_type="standard", coordinate_encoding=True, num_samples=12)]


def run_device_check(capsys, monkeypatch):
    monkeypatch.setattr(check_device, "combinations", lambda: iter(ONE_COMBINATION))
    with pytest.raises(SystemExit) as exit_info:
        check_device.main(["--device", "cpu"])
    return exit_info.value.code, capsys.readouterr().out


def test_the_device_check_passes_on_the_cpu_with_a_row_per_check(capsys, monkeypatch):
    code, printed = run_device_check(capsys, monkeypatch)
    assert code == 0, printed
    for check in ("float64", "float32", "autocast bfloat16", "autocast float16"):
        assert f"\n| {check} | 1 | 0 | " in printed
    assert "1 combinations on cpu: 0 checks failed" in printed


def test_the_device_check_fails_where_the_aggregation_under_autocast_is_off_by_ten_percent(capsys, monkeypatch):
    def off(source, *inputs):
        out = neighbour_conv_module.neighbour_conv(source, *inputs)
        return out if source.dtype == torch.float64 else out * 1.1

    monkeypatch.setattr(check_device, "neighbour_conv", off)
    code, printed = run_device_check(capsys, monkeypatch)
    assert code == 1
    assert "autocast bfloat16 {'sampling_type': 'random'" in printed
    assert "the aggregation differs from the CPU's" in printed
    assert "\n| float64 | 1 | 0 | " in printed and "\n| autocast float16 | 1 | 1 | " in printed


def test_the_device_check_fails_where_the_triton_kernels_could_not_run(capsys, monkeypatch):
    monkeypatch.setattr(neighbour_conv_module, "_triton_failure", "PTXASError: ptxas fatal")
    code, printed = run_device_check(capsys, monkeypatch)
    assert code == 1
    assert "the Triton kernels could not compile or launch (PTXASError: ptxas fatal)" in printed


@pytest.mark.parametrize("arguments,flag", [
    (["--amp_dtype", "bfloat16"], "--amp_dtype"),
    (["--model_cases", "32/5/0.1"], "--model_cases"),
    (["--model_cases", "32/4"], "--model_cases"),
])
def test_the_benchmark_refuses_an_autocast_dtype_without_autocast_and_bad_model_cases(arguments, flag, tmp_path,
                                                                                     monkeypatch, capsys):
    for table in ("layer_table", "model_table", "data_table", "operation_table"):
        monkeypatch.setattr(benchmark, table, lambda *args, **kwargs: pytest.fail("measured before refusing"))
    expect_one_line_error(capsys, [*arguments, "--json", tmp_path / "out.json"], 2, f"{flag}: ", main=benchmark.main)


def test_the_benchmark_measures_the_model_cases_and_dtype_it_is_given(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark, "model_table", lambda *args: calls.append(args) or [])
    benchmark.main(["--parts", "models", "--amp", "--amp_dtype", "float16", "--model_cases", "32/4/0,64/8/0.1",
                    "--json", str(tmp_path / "out.json")])
    (device, dtype, *_, cases), = calls
    assert dtype == torch.float16 and cases == ((32, 4, 0.0), (64, 8, 0.1))


def test_the_convnn_profile_runs_on_another_device_only_with_profile(monkeypatch, capsys):
    monkeypatch.setattr(benchmark_convnn, "device_problem", lambda name: None)
    monkeypatch.setattr(benchmark_convnn, "compare_with_reference", lambda args: pytest.fail("measured"))
    expect_one_line_error(capsys, ["--device", "cuda"], 2, "--device: only --profile", main=benchmark_convnn.main)
