"""The command line: every flag's default and choices, the original program's examples, and the checks made
before any data is loaded (each a one-line error naming the flag, exit code 2)."""

import os
import shlex
import subprocess
import sys
from urllib.error import URLError

import pytest
import dataset
import run_files
import utils
import vit_main
from tests.helpers import without_hint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every flag with its default, from the original program's tables plus this project's additions.
DEFAULTS = {
    "layer": "Attention", "patch_size": 16, "num_layers": 12, "num_heads": 3, "d_hidden": 192, "d_mlp": 768,
    "dropout": 0.1, "attention_dropout": 0.1, "drop_path": 0.0,
    "convolution_type": "depthwise", "softmax_topk_val": True, "K": 9, "sampling_type": "all", "num_samples": -1,
    "sample_padding": 0, "magnitude_type": "matmul", "coordinate_encoding": False,
    "similarity_type": "Col", "aggregation_type": "Col",
    "kernel_size": 9, "branch_ratio": 0.5, "sparse_mode": "all", "sparse_context_window": 128, "local_window": 128,
    "dataset": "cifar10", "data_path": "./Data", "resize": 224, "augment": False, "auto_augment": "none",
    "augment_magnitude": 9, "random_erasing": 0.0, "num_workers": 4, "data_loader": "workers",
    "val_split": 0.0, "split_seed": 0,
    "batch_size": 256, "num_epochs": 150, "use_amp": False, "use_compiled": False, "compile_mode": "default",
    "clip_grad_norm": 1.0, "amp_dtype": "float16", "accumulation_steps": 1, "checkpoint_steps": 0,
    "deterministic": False,
    "warmup_epochs": 0.0, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.0,
    "no_decay_norm_bias": False,
    "criterion": "CrossEntropy", "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-6, "momentum": 0.9,
    "scheduler": "none", "lr_step": 20, "lr_gamma": 0.1,
    "device": "cuda", "seed": 0,
    "output_dir": "./Output/VGG/ConvNN", "test_only": False, "checkpoint": None, "test_weights": "model",
    "resume": None, "overwrite": False, "tensorboard": False, "config": None,
}

CHOICES = {
    "layer": ["Attention", "ConvNNAttention", "KvtAttention", "LocalAttention", "SparseAttention",
              "Conv1d", "BranchConv", "BranchAttention"],
    "convolution_type": ["standard", "depthwise", "depthwise-separable"],
    "sampling_type": ["all", "random", "spatial"],
    "magnitude_type": ["cosine", "euclidean", "matmul"],
    "similarity_type": ["Col", "Loc", "Loc_Col"],
    "aggregation_type": ["Col", "Loc_Col"],
    "sparse_mode": ["all", "local", "strided"],
    "dataset": ["cifar10", "cifar100", "imagenet", "synthetic", "tinyimagenet", "imagenet32", "imagenet64"],
    "auto_augment": ["none", "randaugment", "trivialaugment", "autoaugment"],
    "compile_mode": ["default", "reduce-overhead", "reduce-memory", "max-autotune"],
    "criterion": ["CrossEntropy", "MSE"],
    "optimizer": ["adam", "sgd", "adamw"],
    "scheduler": ["step", "cosine", "plateau", "none"],
    "device": ["cpu", "cuda", "mps"],
    "amp_dtype": ["float16", "bfloat16"],
    "test_weights": ["model", "ema"],
}

SEED_ATTENTION_EXAMPLE = """
    --layer Attention --num_layers 12 --num_heads 3 --d_hidden 192 --d_mlp 768 --dataset cifar10
    --optimizer adamw --lr 1e-3 --num_epochs 150 --output_dir ./Output/ViT/Attention"""

SEED_CONVNN_EXAMPLE = """
    --layer ConvNNAttention --convolution_type depthwise --num_layers 12 --d_hidden 192 --d_mlp 768 --K 9
    --sampling_type spatial --num_samples 8 --similarity_type Col --aggregation_type Col --dataset cifar10
    --optimizer adamw --lr 1e-3 --num_epochs 150 --output_dir ./Output/ViT/ConvNNAttention"""


def parse(*argv):
    return vit_main.build_parser().parse_args(list(argv))


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def test_every_flag_has_the_documented_default():
    assert vars(parse()) == DEFAULTS


@pytest.mark.parametrize("flag", sorted(CHOICES))
def test_choices_are_exactly_the_documented_ones(flag):
    action = next(a for a in vit_main.build_parser()._actions if a.dest == flag)
    assert list(action.choices) == CHOICES[flag]
    for choice in CHOICES[flag]:
        assert getattr(parse(f"--{flag}", choice), flag) == choice
    with pytest.raises(SystemExit) as exit_info:
        parse(f"--{flag}", "not-a-choice")
    assert exit_info.value.code == 2


def test_layer_flags_keep_their_groups_and_order():
    groups = {group.title: [action.dest for action in group._group_actions]
              for group in vit_main.build_parser()._action_groups}
    assert groups["ConvNN-Attention"] == ["convolution_type", "softmax_topk_val", "K", "sampling_type", "num_samples",
                                          "sample_padding", "magnitude_type", "coordinate_encoding", "similarity_type",
                                          "aggregation_type"]
    assert groups["other layers"] == ["kernel_size", "branch_ratio", "sparse_mode", "sparse_context_window",
                                      "local_window"]


def test_layer_flags_are_made_from_the_option_table():
    from models.layer_options import LAYER_OPTIONS

    actions = {action.dest: action for action in vit_main.build_parser()._actions}
    for name, option in LAYER_OPTIONS.items():
        action = actions[name]
        assert (action.default, action.help, action.choices) == (option.default, option.help, option.choices), name


@pytest.mark.parametrize("flag", ["softmax_topk_val", "coordinate_encoding"])
@pytest.mark.parametrize("words, expected", [([], True), (["True"], True), (["False"], False),
                                             (["false"], False), (["true"], True)])
def test_boolean_flags_take_a_bare_flag_or_a_word(flag, words, expected):
    assert getattr(parse(f"--{flag}", *words), flag) is expected


def test_boolean_flag_rejects_other_words():
    with pytest.raises(SystemExit) as exit_info:
        parse("--softmax_topk_val", "maybe")
    assert exit_info.value.code == 2


def test_numeric_and_switch_flags_are_read():
    args = parse("--patch_size", "4", "--K", "5", "--num_samples", "3", "--branch_ratio", "0.25", "--lr", "3e-4",
                 "--use_amp", "--use_compiled", "--augment", "--test_only", "--resume", "auto", "--resize", "0")
    assert (args.patch_size, args.K, args.num_samples, args.branch_ratio, args.lr) == (4, 5, 3, 0.25, 3e-4)
    assert args.use_amp and args.use_compiled and args.augment and args.test_only
    assert (args.resume, args.resize) == ("auto", 0)


@pytest.mark.parametrize("argv, given", [
    ([], set()),
    (["--lr", "1e-4", "--output_dir", "x"], {"lr", "output_dir"}),  # a default written out is given
    (["--num_ep", "3", "--augment", "--softmax_topk_val"], {"num_epochs", "augment", "softmax_topk_val"}),
    (["--resume=auto", "--checkpoint", "none"], {"resume", "checkpoint"}),
])
def test_given_flags_are_those_on_the_command_line(argv, given):
    assert vit_main.given_flags(argv) == given


def test_seed_attention_example_parses():
    args = parse(*shlex.split(SEED_ATTENTION_EXAMPLE))
    assert (args.layer, args.num_layers, args.num_heads, args.d_hidden, args.d_mlp) == ("Attention", 12, 3, 192, 768)
    assert (args.lr, args.num_epochs, args.output_dir) == (1e-3, 150, "./Output/ViT/Attention")


def test_seed_convnn_example_parses():
    args = parse(*shlex.split(SEED_CONVNN_EXAMPLE))
    assert (args.layer, args.sampling_type, args.num_samples, args.K) == ("ConvNNAttention", "spatial", 8, 9)
    assert (args.similarity_type, args.aggregation_type, args.convolution_type) == ("Col", "Col", "depthwise")


def test_seed_examples_build_their_models():
    """Everything the examples need besides the data: their models build at the default 224 px."""
    from models.vit import ViT

    for example in (SEED_ATTENTION_EXAMPLE, SEED_CONVNN_EXAMPLE):
        args = parse(*shlex.split(example))
        model = ViT(**vit_main.model_config(args, img_size=224, num_classes=10))
        assert model.classifier.out_features == 10


def test_model_config_passes_every_model_flag():
    args = parse("--layer", "BranchConv", "--coordinate_encoding", "--softmax_topk_val", "False", "--kernel_size", "5")
    config = vit_main.model_config(args, img_size=32, num_classes=10)
    options = config["layer_options"]
    assert config["layer"] == "BranchConv" and options["coordinate_encoding"] is True
    assert options["softmax_topk_val"] is False and options["kernel_size"] == 5
    import inspect
    from models.vit import ViT

    assert set(config) == set(inspect.signature(ViT).parameters)


# ---------------------------------------------------------------------------------------------
# Checks made before any data is loaded
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_data_access(monkeypatch):
    """Any data loading fails the test: these errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("data was loaded before the arguments were checked")

    monkeypatch.setattr(dataset, "load_datasets", forbidden)


def expect_usage_error(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and without_hint(stderr).rstrip().endswith(error_lines[0])
    assert error_lines[0].split(": error: ", 1)[1].startswith(flag), error_lines[0]
    return error_lines[0]


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--num_epochs", "0"], "--num_epochs"),
        (["--batch_size", "0"], "--batch_size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.001"], "--lr"),
        (["--dropout", "1.0"], "--dropout"),
        (["--attention_dropout", "-0.1"], "--attention_dropout"),
        (["--resize", "-1"], "--resize"),
        (["--num_workers", "-1"], "--num_workers"),
        (["--clip_grad_norm", "-1"], "--clip_grad_norm"),
        (["--branch_ratio", "1.5"], "--branch_ratio"),
        (["--scheduler", "step", "--lr_step", "0"], "--lr_step"),
        (["--test_only", "--resume", "auto"], "--resume"),
        (["--test_only", "--checkpoint", "/no/such/file.pt"], "--checkpoint"),
        (["--checkpoint", "/no/such/file.pt"], "--checkpoint"),
        (["--resume", "/no/such/last.pt"], "--resume"),
        (["--layer", "ConvNNAttention", "--K", "100"], "--K"),
        (["--layer", "KvtAttention", "--K", "100"], "--K"),
        (["--patch_size", "5"], "--patch_size"),
        (["--num_heads", "3"], "--num_heads"),
        (["--layer", "ConvNNAttention", "--sampling_type", "spatial", "--num_samples", "9"], "--num_samples"),
        (["--layer", "ConvNNAttention", "--sampling_type", "random", "--num_samples", "0"], "--num_samples"),
        (["--dataset", "imagenet", "--resize", "0"], "--resize"),
    ],
)
def test_impossible_settings_are_one_line_errors(flags, flag, tiny_argv, tmp_path, capsys, no_data_access):
    expect_usage_error(capsys, tiny_argv(tmp_path, *flags), flag)
    assert not (tmp_path / "train_eval_results.txt").exists()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device_names_the_available_ones(device, tiny_argv, tmp_path, capsys, no_data_access):
    if device in utils.available_devices():
        pytest.skip(f"{device} is available here")
    line = expect_usage_error(capsys, tiny_argv(tmp_path, "--device", device), "--device")
    assert f"{device} is not available" in line and "available: cpu" in line


def test_unwritable_output_directory(tiny_argv, tmp_path, capsys, no_data_access):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = expect_usage_error(capsys, tiny_argv(blocker / "run"), "--output_dir")
    assert str(blocker / "run") in line


def test_missing_cifar_files_name_what_to_place_where(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    argv = ["--dataset", "cifar10", "--data_path", str(tmp_path / "Data"), "--resize", "0", "--device", "cpu",
            "--patch_size", "8", "--num_layers", "1", "--d_hidden", "32", "--num_heads", "2", "--d_mlp", "32",
            "--output_dir", str(tmp_path / "out")]
    line = expect_usage_error(capsys, argv, "--data_path")
    assert "cifar-10-python.tar.gz" in line and "cifar-10-batches-py/" in line and str(tmp_path / "Data") in line
    assert not [path.name for path in (tmp_path / "out").iterdir() if path.name in run_files.OUTPUT_FILES]


@pytest.mark.parametrize("flags, flag", [(["--layer", "ConvNNAttention", "--K", "100"], "--K"),
                                         (["--num_epochs", "0"], "--num_epochs")])
@pytest.mark.slow
def test_errors_exit_2_without_traceback_in_a_real_process(flags, flag, tmp_path):
    argv = ["--dataset", "synthetic", "--resize", "0", "--device", "cpu", "--patch_size", "8", "--num_layers", "1",
            "--d_hidden", "32", "--num_heads", "2", "--output_dir", str(tmp_path), *flags]
    process = subprocess.run([sys.executable, os.path.join(REPO, "vit_main.py"), *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert without_hint(process.stderr).rstrip().splitlines()[-1].startswith(f"vit_main.py: error: {flag}")
    assert process.stdout == ""
