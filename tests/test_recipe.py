"""The training recipe's options: warmup, label smoothing, MixUp / CutMix, drop path, EMA weights,
decay-exempt parameters, gradient accumulation and the CUDA autocast type. Each is checked against its
formula written out here, then in whole runs: off by default, one-line errors, and an exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import checkpoints
import run_files
import train_eval
import vit_main
from models.vit import EncoderBlock, ViT
from tests.helpers import assert_resume_repeats_a_straight_run, read_metrics, results_lines
from tests.helpers import expect_one_line_error


def make_trainer(model=None, **overrides):
    torch.manual_seed(0)
    model = model if model is not None else nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    options = dict(model=model, device=torch.device("cpu"), num_classes=3, optimizer="sgd", lr=1.0,
                   weight_decay=0.0, momentum=0.0, scheduler="none", lr_step=1, lr_gamma=0.5, num_epochs=4,
                   criterion="CrossEntropy", clip_grad_norm=0.0, use_amp=False, use_compiled=False,
                   compile_mode="default", show_progress=False)
    return train_eval.Trainer(**{**options, **overrides})


def tiny_vit(**overrides):
    options = dict(img_size=32, num_classes=10, patch_size=8, num_layers=3, num_heads=2, d_hidden=16, d_mlp=32)
    return ViT(**{**options, **overrides})


# ---------------------------------------------------------------------------------------------
# Label smoothing
# ---------------------------------------------------------------------------------------------


def test_label_smoothing_mixes_the_cross_entropy_with_the_mean_over_classes():
    torch.manual_seed(0)
    logits, targets, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    log_p = logits.log_softmax(dim=1)
    cross_entropy = -log_p[torch.arange(6), targets]
    expected = (1 - eps) * cross_entropy + eps * (-log_p).mean(dim=1)
    actual = train_eval.per_sample_loss("CrossEntropy", 5, label_smoothing=eps)(logits, targets)
    assert torch.allclose(actual, expected, atol=1e-6)
    assert torch.allclose(train_eval.per_sample_loss("CrossEntropy", 5)(logits, targets), cross_entropy, atol=1e-6)


def test_evaluation_reports_the_plain_loss_when_training_smooths():
    trainer = make_trainer(label_smoothing=0.2)
    images, targets = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    result = trainer.evaluate([(images, targets)])
    plain = F.cross_entropy(trainer.model(images), targets).item()
    assert result.loss == pytest.approx(plain, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix
# ---------------------------------------------------------------------------------------------


def one_hot(labels, classes=3):
    return F.one_hot(labels, classes).float()


def test_mixup_targets_are_the_pairs_one_hot_vectors_mixed_like_the_images():
    trainer = make_trainer(mixup=0.4)
    trainer.seed_batch_mixing(seed=0, epoch=1)
    images, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    mixed_images, mixed_targets = trainer._mixed(images, labels)
    # torchvision pairs each sample with its predecessor (a roll by one); lam is recovered from the images.
    partner = images.roll(1, 0)
    lam = ((mixed_images - partner) * (images - partner)).sum() / (images - partner).pow(2).sum()
    assert torch.allclose(mixed_images, lam * images + (1 - lam) * partner, atol=1e-6)
    expected = lam * one_hot(labels) + (1 - lam) * one_hot(labels.roll(1, 0))
    assert torch.allclose(mixed_targets, expected, atol=1e-6)
    assert 0 < lam < 1


def test_cutmix_targets_weigh_the_pairs_by_the_area_each_shows():
    trainer = make_trainer(cutmix=1.0)
    trainer.seed_batch_mixing(seed=3, epoch=2)
    images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()  # image i holds the value i
    labels = torch.tensor([0, 1, 2, 0])
    mixed_images, mixed_targets = trainer._mixed(images, labels)
    from_partner = (mixed_images[0, 0] == 3).float().mean()  # sample 0 is pasted from sample 3
    lam = 1 - from_partner
    expected = lam * one_hot(labels) + (1 - lam) * one_hot(labels.roll(1, 0))
    assert torch.allclose(mixed_targets, expected, atol=1e-6)


def test_mixing_draws_follow_the_seed_and_epoch_and_leave_the_global_generator_alone():
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])

    def draws(seed, epoch):
        trainer = make_trainer(mixup=0.8, cutmix=1.0)
        trainer.seed_batch_mixing(seed, epoch)
        return [trainer._mixed(images, labels)[1] for _ in range(4)]

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = draws(0, 1)
    torch.manual_seed(999)  # another global state changes nothing
    again = draws(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, draws(0, 2)))
    trainer = make_trainer(mixup=0.8)
    torch.manual_seed(123)
    trainer.seed_batch_mixing(0, 1)
    trainer._mixed(images, labels)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_training_with_mixed_targets_counts_top1_against_the_largest_share():
    trainer = make_trainer(mixup=1.0)
    trainer.seed_batch_mixing(0, 1)
    images, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    state = trainer._mixing_rng_state.clone()
    mixed_images, mixed_targets = trainer._mixed(images, labels)
    trainer._mixing_rng_state = state
    predictions = trainer.model(mixed_images).argmax(dim=1)  # weights before the step
    result = trainer.train_one_epoch([(images, labels)], "epoch 1 train")
    expected = 100.0 * (predictions == mixed_targets.argmax(dim=1)).float().mean().item()
    assert result.top1 == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Drop path
# ---------------------------------------------------------------------------------------------


def test_drop_path_rises_linearly_over_the_blocks_and_zero_adds_nothing():
    model = tiny_vit(num_layers=5, drop_path=0.2)
    rates = [block.drop_path.p if block.drop_path is not None else 0.0 for block in model.transformer_encoder]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert all(block.drop_path.mode == "row" for block in model.transformer_encoder[1:])
    assert "StochasticDepth" not in str(tiny_vit())


def test_drop_path_zeroes_whole_rows_and_scales_the_kept_ones():
    torch.manual_seed(0)
    p = 0.25
    block = EncoderBlock(nn.Identity(), d_hidden=4, d_mlp=8, dropout=0.0, drop_path=p)
    branch = torch.ones(4000, 3, 4)
    out = block._branch(branch)
    per_row = out.flatten(1)
    kept = per_row.amax(dim=1) > 0
    assert torch.all(per_row[kept] == 1 / (1 - p)) and torch.all(per_row[~kept] == 0)
    assert (~kept).float().mean().item() == pytest.approx(p, abs=0.03)  # each row dropped with probability p
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # the expectation is kept
    block.eval()
    assert torch.equal(block._branch(branch), branch)


def test_drop_path_is_applied_to_both_residual_branches():
    torch.manual_seed(0)
    block = EncoderBlock(nn.Linear(4, 4), d_hidden=4, d_mlp=8, dropout=0.0, drop_path=0.999999)
    x = torch.randn(3, 2, 4)
    # Both branches dropped for every row leaves the input (the kept scale would be 1e6).
    assert torch.equal(block(x), x)


# ---------------------------------------------------------------------------------------------
# EMA weights
# ---------------------------------------------------------------------------------------------


def test_ema_weights_follow_the_moving_average_after_every_step():
    decay = 0.9
    trainer = make_trainer(ema_decay=decay)
    images, targets = torch.randn(8, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    expected = None
    for step in range(4):
        trainer._step(trainer.loss_of(trainer.model(images), targets).mean())
        weights = [parameter.detach().clone() for parameter in trainer.model.parameters()]
        # torch's AveragedModel copies the weights at its first update, then averages.
        expected = weights if expected is None else [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        for average, value in zip(trainer.ema.module.parameters(), expected):
            assert torch.allclose(average, value, atol=1e-6)
    assert not torch.allclose(next(trainer.ema.module.parameters()), next(trainer.model.parameters()))


def test_evaluating_the_ema_weights_uses_them():
    trainer = make_trainer(ema_decay=0.5)
    images, targets = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        next(trainer.ema.module.parameters()).add_(1.0)
    expected = F.cross_entropy(trainer.ema.module(images), targets).item()
    assert trainer.evaluate([(images, targets)], weights="ema").loss == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Warmup and the schedules after it
# ---------------------------------------------------------------------------------------------


def rates_of_each_step(trainer, batches, epochs):
    rates = []
    optimizer_step = trainer._optimizer_step

    def recording_step():
        rates.append(trainer.learning_rate())
        optimizer_step()

    trainer._optimizer_step = recording_step
    for epoch in range(epochs):
        trainer.train_one_epoch(batches, f"epoch {epoch + 1} train")
        trainer.step_scheduler(watched_loss=1.0)
    return rates


BATCHES = [(torch.randn(2, 12), torch.tensor([0, 1]))] * 4  # 4 batches, 2 optimiser steps with accumulation 2


@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_warmup_moves_the_rate_every_step_then_the_schedule_continues(scheduler):
    lr, epochs = 0.5, 4
    trainer = make_trainer(lr=lr, scheduler=scheduler, lr_step=1, lr_gamma=0.5, num_epochs=epochs,
                           warmup_epochs=1.5, steps_per_epoch=len(BATCHES), accumulation_steps=2)
    steps_per_epoch, warmup = 2, 3  # 1.5 epochs of 2 optimiser steps
    total = epochs * steps_per_epoch

    def expected(t):
        if t < warmup:
            return lr * (t + 1) / (warmup + 1)
        after = t - warmup
        if scheduler == "cosine":
            return lr * (1 + math.cos(math.pi * after / (total - warmup))) / 2
        if scheduler == "step":
            return lr * 0.5 ** (after // steps_per_epoch)
        return lr

    assert rates_of_each_step(trainer, BATCHES, epochs) == pytest.approx([expected(t) for t in range(total)])


def test_plateau_waits_for_the_warmup_then_watches_each_epoch():
    trainer = make_trainer(lr=1.0, scheduler="plateau", num_epochs=30, warmup_epochs=2, steps_per_epoch=1)
    batch = BATCHES[:1]
    rates = rates_of_each_step(trainer, batch, 2)
    assert rates == pytest.approx([1 / 3, 2 / 3])
    assert not trainer.warming_up() and trainer.learning_rate() == pytest.approx(1.0)
    for _ in range(12):  # a loss that never falls: plateau divides by 10 after 10 bad epochs
        trainer.step_scheduler(watched_loss=1.0)
    assert trainer.learning_rate() == pytest.approx(0.1)


def test_without_warmup_the_schedules_stay_per_epoch():
    trainer = make_trainer(scheduler="cosine", steps_per_epoch=4)
    assert trainer.per_step_scheduler is None
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------


def double_trainer(**overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return make_trainer(model=model, **overrides)


def test_accumulated_gradients_are_one_large_batchs_including_a_short_last_group():
    torch.manual_seed(1)
    sizes = [4, 4, 4, 4, 2]  # groups of 3 batches: 12 samples, then a short group of 6
    batches = [(torch.randn(n, 12, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in sizes]
    accumulated = double_trainer(accumulation_steps=3, lr=0.1)
    accumulated.train_one_epoch(batches, "epoch 1 train")

    large = double_trainer(lr=0.1)
    for group in (batches[:3], batches[3:]):
        images = torch.cat([images for images, _ in group])
        targets = torch.cat([targets for _, targets in group])
        large.train_one_epoch([(images, targets)], "epoch 1 train")
    for after_accumulation, after_large_batches in zip(accumulated.model.parameters(), large.model.parameters()):
        assert torch.allclose(after_accumulation, after_large_batches, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Weight decay exemptions and the AMP type
# ---------------------------------------------------------------------------------------------


def test_biases_norm_weights_and_the_class_token_are_exempt_from_weight_decay():
    model = tiny_vit()
    trainer = make_trainer(model=model, optimizer="adamw", lr=0.1, weight_decay=0.5, no_decay_norm_bias=True)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed, exempt = trainer.optimizer.param_groups
    exempt_names = {names[id(parameter)] for parameter in exempt["params"]}
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.5
    assert "positional_encoding.cls_tokens" in exempt_names
    assert {"patch_embedding.norm.weight", "transformer_encoder.0.norm1.weight", "classifier.bias"} <= exempt_names
    assert all(name.endswith("bias") or ".norm" in name or name.endswith("cls_tokens") for name in exempt_names)
    assert {names[id(parameter)] for parameter in decayed["params"]} == set(names.values()) - exempt_names

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)  # with zero gradients only the decay moves a weight
    trainer.optimizer.step()
    for name, parameter in model.named_parameters():
        factor = 1.0 if name in exempt_names else 1 - 0.1 * 0.5  # AdamW: w <- w (1 - lr wd)
        assert torch.allclose(parameter, before[name] * factor, atol=1e-7), name


def test_without_the_option_every_parameter_is_decayed():
    trainer = make_trainer(model=tiny_vit(), weight_decay=0.5)
    assert len(trainer.optimizer.param_groups) == 1


def test_amp_dtype_chooses_the_cuda_autocast_type_and_the_scaler():
    trainer = make_trainer(use_amp=True, amp_dtype="bfloat16")
    assert trainer.amp_dtype == torch.bfloat16  # the CPU's type, whatever --amp_dtype says
    assert not trainer.scaler.is_enabled()


# ---------------------------------------------------------------------------------------------
# Command line: errors, defaults, whole runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, starts_with", [
    (["--warmup_epochs", "-1"], "--warmup_epochs: must be >= 0"),
    (["--warmup_epochs", "2", "--num_epochs", "2"], "--warmup_epochs: must be below --num_epochs"),
    (["--label_smoothing", "1"], "--label_smoothing: must be in [0, 1)"),
    (["--label_smoothing", "0.1", "--criterion", "MSE"], "--label_smoothing: smooths the cross-entropy"),
    (["--mixup", "-0.1"], "--mixup: must be >= 0"),
    (["--cutmix", "nan"], "--cutmix: must be a finite number"),
    (["--ema_decay", "1"], "--ema_decay: must be in [0, 1)"),
    (["--accumulation_steps", "0"], "--accumulation_steps: must be >= 1"),
    (["--amp_dtype", "bfloat16"], "--amp_dtype: bfloat16 has no effect without --use_amp"),
    (["--drop_path", "1"], "--drop_path: must be in [0, 1)"),
    (["--test_weights", "ema"], "--test_weights: only used with --test_only"),
])
def test_bad_recipe_values_are_one_line_errors(flags, starts_with, tiny_argv, tmp_path, capsys):
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--num_epochs", "3", *flags), 2, starts_with)
    assert not (tmp_path / "metrics.csv").exists()


def test_a_default_run_writes_the_seed_columns_and_no_recipe_state(tiny_argv, tmp_path):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    assert list(read_metrics(tmp_path)[0]) == run_files.METRIC_COLUMNS
    assert "EMA" not in (tmp_path / "train_eval_results.txt").read_text()
    last = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert "ema" not in last and "step_scheduler" not in last
    assert "StochasticDepth" not in (tmp_path / "model.txt").read_text()
    assert "warmup_epochs: 0.0" in (tmp_path / "args.txt").read_text()


@pytest.mark.slow
def test_an_ema_run_logs_both_weight_sets_and_checkpoints_both(tiny_argv, tmp_path, capsys):
    ema_run = tmp_path
    vit_main.main(tiny_argv(ema_run, "--num_epochs", "2", "--ema_decay", "0.9"))
    console = capsys.readouterr().out
    rows = read_metrics(ema_run)
    assert list(rows[0]) == run_files.METRIC_COLUMNS + ["ema_test_loss", "ema_test_top1", "ema_test_top5"]
    lines = results_lines(ema_run)
    assert all("| [EMA Test] Loss: " in line for line in lines[:2])
    assert lines[2].startswith("Average Epoch Time") and lines[3].startswith("Max Accuracy")
    assert lines[4].startswith("Max EMA Accuracy: ")
    assert console.count("| [EMA Test] Loss: ") == 2 and lines[4] in console
    last = checkpoints.load_checkpoint(ema_run / "last.pt")
    best = checkpoints.load_checkpoint(ema_run / "best.pt")
    assert "ema" in last and "ema" in best
    # best.pt is chosen by the trained weights' test top-1, as without EMA.
    assert best["best_epoch"] == run_files.best_record(last["history"])["epoch"]

    capsys.readouterr()
    vit_main.main(tiny_argv(ema_run, "--test_only", "--checkpoint", ema_run / "last.pt", "--test_weights", "ema"))
    checkpoint_line, numbers = (ema_run / "test_results.txt").read_text().splitlines()
    assert checkpoint_line.endswith("last.pt (EMA weights)")
    last_epoch = last["history"][-1]
    assert numbers == run_files.test_line(last_epoch["ema_test_loss"], last_epoch["ema_test_top1"],
                                          last_epoch["ema_test_top5"])
    vit_main.main(tiny_argv(ema_run, "--test_only", "--checkpoint", ema_run / "last.pt"))
    assert (ema_run / "test_results.txt").read_text().splitlines()[1] == run_files.test_line(
        last_epoch["test_loss"], last_epoch["test_top1"], last_epoch["test_top5"])


def test_ema_weights_of_a_run_without_them_are_refused(tiny_argv, tmp_path, capsys):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "1"))
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--test_only", "--test_weights", "ema"), 2,
                          "--test_weights: ")
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--test_only", "--checkpoint", "none", "--test_weights", "ema"),
                          2, "--test_weights: ")


ALL_OPTIONS = ["--num_epochs", "3", "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--ema_decay", "0.9",
               "--warmup_epochs", "1.5", "--scheduler", "cosine", "--accumulation_steps", "2",
               "--label_smoothing", "0.1", "--no_decay_norm_bias", "--weight_decay", "0.05",
               "--augment", "--auto_augment", "randaugment", "--random_erasing", "0.25", "--val_split", "0.1"]


@pytest.mark.slow
def test_a_run_with_every_option_resumes_exactly(tiny_argv, tmp_path, monkeypatch):
    straight, resumed = assert_resume_repeats_a_straight_run(tiny_argv, tmp_path, monkeypatch, ALL_OPTIONS, 2)
    for expected, actual in zip(read_metrics(straight), read_metrics(resumed), strict=True):
        for column in run_files.VALIDATION_COLUMNS + run_files.EMA_COLUMNS + run_files.EMA_VALIDATION_COLUMNS:
            assert float(actual[column]) == pytest.approx(float(expected[column]), rel=0, abs=1e-6), column
    rates = [float(row["lr"]) for row in read_metrics(straight)]
    assert rates[0] < rates[1]  # epoch 1 started the warmup, epoch 2 went on with it


@pytest.mark.slow
def test_recipe_flags_cannot_change_on_resume(tiny_argv, tmp_path, capsys):
    vit_main.main(tiny_argv(tmp_path, "--num_epochs", "2", "--warmup_epochs", "1", "--scheduler", "cosine"))
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--resume", "auto", "--num_epochs", "3"), 2,
                          "--num_epochs: ")
    expect_one_line_error(capsys, tiny_argv(tmp_path, "--resume", "auto", "--num_epochs", "2", "--drop_path", "0.1"),
                          2, "--drop_path: ")
