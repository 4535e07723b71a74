"""Training and evaluation: optimiser, scheduler, loss, mixed precision, compilation, the epoch loop."""

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

import checkpoints
import distributed
import run_files
import utils
from dataset import seed_epoch
from tensorboard_log import TensorBoardLog

# Mixed-precision type of each device: float16 needs gradient scaling, which only CUDA provides here;
# CPUs run bfloat16 (float16 matrix products are slow or missing there). On CUDA, --amp_dtype chooses.
AMP_DTYPE = {"cuda": torch.float16, "cpu": torch.bfloat16, "mps": torch.float16}
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# Steps between reads of the on-device non-finite-loss flag. Each read waits for the GPU, so reading it
# every step would stall the pipeline; the flag also records the first bad step, so the message stays exact.
# Updates made after a bad step are never saved: checkpoints are only written once an epoch passed the check.
NONFINITE_CHECK_INTERVAL = 50


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


# Name -> builder tables of the --optimizer, --scheduler and --criterion choices. Each builder is given
# every setting of its kind and uses those it needs.
OPTIMIZERS = {
    "adam": lambda parameters, lr, weight_decay, **_: torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay),
    "sgd": lambda parameters, lr, weight_decay, momentum: torch.optim.SGD(
        parameters, lr=lr, weight_decay=weight_decay, momentum=momentum),
    "adamw": lambda parameters, lr, weight_decay, **_: torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay),
}

SCHEDULERS = {
    "step": lambda optimizer, lr_step, lr_gamma, **_: lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma),
    "cosine": lambda optimizer, num_epochs, **_: lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_epochs),
    "plateau": lambda optimizer, **_: lr_scheduler.ReduceLROnPlateau(optimizer, mode="min"),
    "none": lambda optimizer, **_: None,
}


# Targets are class indices, or class probabilities (rows summing to 1) when --mixup or --cutmix mixed the batch.


def _cross_entropy(logits, targets, num_classes, label_smoothing):
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)


def _mean_squared_error(logits, targets, num_classes, label_smoothing):
    # Logits against one-hot (or mixed) targets; averaging over classes makes the batch mean equal nn.MSELoss.
    # --label_smoothing is refused with MSE (vit_main), so label_smoothing is always 0 here.
    expected = targets.to(logits.dtype) if targets.is_floating_point() else F.one_hot(targets, num_classes).to(
        logits.dtype)
    return (logits - expected).pow(2).mean(dim=1)


LOSSES = {"CrossEntropy": _cross_entropy, "MSE": _mean_squared_error}


def _chosen(table: Dict, flag: str, name: str):
    if name not in table:
        raise ValueError(f"--{flag}: unknown {flag} {name!r}")
    return table[name]


def build_optimizer(parameters, *, optimizer: str, lr: float, weight_decay: float, momentum: float):
    return _chosen(OPTIMIZERS, "optimizer", optimizer)(parameters, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(optimizer, *, scheduler: str, lr_step: int, lr_gamma: float, num_epochs: int):
    """A scheduler stepped once per epoch, or None for a constant learning rate."""
    return _chosen(SCHEDULERS, "scheduler", scheduler)(optimizer, lr_step=lr_step, lr_gamma=lr_gamma,
                                                       num_epochs=num_epochs)


def warmup_steps_of(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of a warmup of ``warmup_epochs`` epochs, rounded half up as --val_split's held-out
    count is (at least one when it is on)."""
    return max(1, utils.round_half_up(warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 0


def build_warmup_scheduler(optimizer, *, scheduler: str, warmup_steps: int, steps_per_epoch: int, lr_step: int,
                           lr_gamma: float, num_epochs: int):
    """A scheduler stepped after every optimiser step: a linear warmup whose step ``t`` (from 0) runs at
    ``lr * (t + 1) / (warmup_steps + 1)``, then ``scheduler`` counted in steps from the warmup's end:
    ``step`` decays every ``lr_step`` epochs' worth of steps, ``cosine`` anneals to 0 over the remaining
    steps, ``none`` and ``plateau`` keep ``lr`` (plateau's own decays stay per epoch, see Trainer)."""
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), end_factor=1.0,
                                   total_iters=warmup_steps)
    if scheduler == "step":
        after = lr_scheduler.StepLR(optimizer, step_size=lr_step * steps_per_epoch, gamma=lr_gamma)
    elif scheduler == "cosine":
        after = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, num_epochs * steps_per_epoch - warmup_steps))
    else:
        return warmup
    return lr_scheduler.SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """The model's parameters in two groups: those weight decay shrinks, and those it leaves alone (biases,
    the weights of normalisation layers, and the names ``model.no_weight_decay()`` gives), at decay 0."""
    exempt = set(getattr(model, "no_weight_decay", set)())
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    for module_name, module in model.named_modules():
        if isinstance(module, norms):
            exempt.update(f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters())
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        (kept if name in exempt or name.endswith("bias") else decayed).append(parameter)
    return [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]


def batch_mixing(mixup: float, cutmix: float, num_classes: int):
    """torchvision's MixUp and/or CutMix of a batch (one of them drawn per batch when both are on), or None."""
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def mixing_seed(seed: int, epoch: int) -> int:
    """Seed of the batch-mixing draws of an epoch: the loader's epoch seed (dataset.seed_epoch) moved to
    another stream, so that mixing never shares numbers with the shuffling."""
    return 2**63 + seed * 100_003 + epoch


def cosine_rate(base_lr: float, epoch: int, num_epochs: int, eta_min: float = 0.0) -> float:
    """Rate of ``CosineAnnealingLR(T_max=num_epochs)`` after ``epoch`` steps, in closed form."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / num_epochs)) / 2


def per_sample_loss(criterion: str, num_classes: int, label_smoothing: float = 0.0):
    """A function ``(logits, targets) -> loss of each sample``, so that split losses are exact sums."""
    return functools.partial(_chosen(LOSSES, "criterion", criterion), num_classes=num_classes,
                             label_smoothing=label_smoothing)


@dataclass
class SplitResult:
    loss: float
    top1: float
    top5: float
    samples: int
    seconds: float
    # (num_classes, num_classes) counts, true class by row and predicted class by column, when asked for.
    confusion: Optional[torch.Tensor] = None


class _Tally:
    """Running sums of loss and correct predictions, kept on the device to avoid a sync per batch."""

    def __init__(self, device: torch.device, num_classes: int, confusion: bool = False):
        self.top_k = min(5, num_classes)
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        # Flattened (true, predicted) counts; bincount keeps the whole count on the device.
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
        self.samples = 0

    def add(self, losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += losses.detach().double().sum()
        best = logits.detach().topk(self.top_k, dim=1).indices
        hits = best == targets.unsqueeze(1)
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        if self.confusion is not None:
            cells = targets * self.num_classes + best[:, 0]
            self.confusion += torch.bincount(cells, minlength=self.num_classes * self.num_classes)
        self.samples += targets.shape[0]

    def sum_over_processes(self) -> None:
        """Adds up the tallies of all ranks, so that a split's metrics are exact under torchrun too."""
        if not distributed.is_distributed():
            return
        sums = torch.stack([self.loss_sum, self.top1.double(), self.top5.double(),
                            torch.tensor(float(self.samples), dtype=torch.float64, device=self.loss_sum.device)])
        distributed.sum_over_processes(sums)
        self.loss_sum = sums[0]
        self.top1, self.top5, self.samples = sums[1].long(), sums[2].long(), int(sums[3].item())
        if self.confusion is not None:
            # Evaluation shards hold every image once (ContiguousShards), so the sum counts each once.
            distributed.sum_over_processes(self.confusion)

    def totals(self) -> Dict:
        """The loss sum, hit counts and sample count of all ranks so far, as plain numbers; a collective
        under torchrun (every rank calls it at the same step), the tallies themselves are left as they are."""
        sums = torch.stack([self.loss_sum, self.top1.double(), self.top5.double(),
                            torch.tensor(float(self.samples), dtype=torch.float64, device=self.loss_sum.device)])
        distributed.sum_over_processes(sums)
        loss_sum, top1, top5, samples = sums.tolist()
        return {"loss_sum": loss_sum, "top1": int(top1), "top5": int(top5), "samples": int(samples)}

    def start_from(self, totals: Dict) -> None:
        """Continues the running sums of ``totals`` (of all ranks): rank 0 takes them and the others start
        from zero, so that the end-of-split sum over the ranks counts them once."""
        if distributed.rank() > 0:
            return
        self.loss_sum.fill_(totals["loss_sum"])
        self.top1.fill_(totals["top1"])
        self.top5.fill_(totals["top5"])
        self.samples = totals["samples"]

    def confusion_matrix(self) -> Optional[torch.Tensor]:
        if self.confusion is None:
            return None
        return self.confusion.view(self.num_classes, self.num_classes).cpu()

    def summary(self) -> Dict[str, float]:
        samples = max(self.samples, 1)
        return {
            "loss": self.loss_sum.item() / samples,
            "top1": 100.0 * self.top1.item() / samples,
            "top5": 100.0 * self.top5.item() / samples,
        }


# cuBLAS's setting that makes its matrix products deterministic (two 4 MiB workspaces, as PyTorch's
# reproducibility notes give); read when cuBLAS starts, so it is set before any CUDA work.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def configure_determinism(deterministic: bool) -> None:
    """--deterministic: only algorithms that give the same bits on every run (an operation without one raises
    instead), cuDNN without benchmarking (which picks its algorithms by timing them), and cuBLAS in its
    deterministic mode. ConvNN-Attention then takes its non-atomic path on CUDA. Without it, PyTorch's defaults."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)


# ---------------------------------------------------------------------------------------------
# Faults that end training: signals and non-finite losses
# ---------------------------------------------------------------------------------------------


# Signals that stop training at the next step: Ctrl-C, SIGTERM, and SIGUSR1 / SIGUSR2, which cluster
# schedulers send ahead of a preemption or a time limit (Slurm's --signal, for one).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainingStopped(Exception):
    """A stop signal arrived; training ended at a step boundary. The epoch in progress is dropped, except
    for the steps a mid-epoch checkpoint holds (``saved``, e.g. "epoch 2 train up to step 5/8")."""

    def __init__(self, signal_number: int, where: str, saved: Optional[str] = None):
        self.signal_number = signal_number
        # The shell's convention: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2 (Linux numbers).
        self.exit_code = 128 + signal_number
        self.saved = saved
        super().__init__(f"stopped by {signal.Signals(signal_number).name} at {where}")


class NonFiniteLoss(Exception):
    def __init__(self, where: str):
        super().__init__(f"non-finite loss at {where}")


class StopSignals:
    """While active, the STOP_SIGNALS only set a flag that the epoch loop reads after each step, so the
    files of the completed epochs (and of the steps a mid-epoch checkpoint holds) are all that remain. A
    second signal ends the process at once, which is safe too: every output file is replaced atomically or
    grows by whole lines."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _record(self, number: int, frame) -> None:
        if self.received is not None:
            os.write(2, f"\n{signal.Signals(number).name} again: stopping at once\n".encode())
            os._exit(128 + number)
        self.received = number

    def raise_if_received(self, where: str, saved: Optional[str] = None) -> None:
        """``saved``: the part of the epoch in progress that a mid-epoch checkpoint holds, if any."""
        if self.received is not None:
            raise TrainingStopped(self.received, where, saved)

    def was_received(self) -> bool:
        return self.received is not None


# Seconds between the plain progress lines of a run without a terminal: a log shows a long epoch is alive.
PLAIN_PROGRESS_SECONDS = 60.0


class PlainProgress:
    """One plain line at most every ``seconds`` (None: never) while a split is run: steps done, images per
    second and the time left of the split at that rate, and the running loss. For logs and pipes, where a
    progress bar cannot draw and nothing else would appear between two epochs."""

    def __init__(self, description: str, steps: int, seconds: Optional[float], start: float,
                 clock: Callable[[], float] = time.perf_counter):
        self.description, self.steps, self.seconds = description, steps, seconds
        self.start = self.last = start
        self.clock = clock

    def after_step(self, step: int, tally: "_Tally") -> None:
        if self.seconds is None or step + 1 >= self.steps:
            return
        now = self.clock()
        if now - self.last < self.seconds:
            return
        self.last = now
        elapsed = now - self.start
        done = step + 1
        left = elapsed / done * (self.steps - done)
        rate = tally.samples / elapsed if elapsed > 0 else 0.0
        print(f"{self.description}: step {done}/{self.steps}, {rate:.1f} img/s, about {_duration(left)} left, "
              f"loss {tally.summary()['loss']:.4f}", flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was NaN or infinite (the loss before any
    gradient scaling: a float16 scaler skipping a step for infinite gradients is not a fault)."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, step: int, losses: torch.Tensor) -> None:
        bad_now = ~torch.isfinite(losses.detach()).all()
        self.first_bad_step = torch.where(bad_now & (self.first_bad_step < 0), step, self.first_bad_step)

    def raise_if_found(self, description: str, steps: int) -> None:
        step = int(self.first_bad_step.item())
        if step >= 0:
            raise NonFiniteLoss(f"{description}, step {step + 1}/{steps}")


# ---------------------------------------------------------------------------------------------
# Where a training epoch stands (mid-epoch checkpoints)
# ---------------------------------------------------------------------------------------------


@dataclass
class EpochProgress:
    """A training epoch's state after an optimiser step, beyond the trainer's and the generators': what a
    mid-epoch checkpoint holds to continue the epoch as if it had never stopped. ``batches`` of the
    epoch's ``batches_total`` are trained; ``totals`` are the running sums of all ranks (_Tally.totals);
    ``seconds`` the training time so far; ``mixing_rng`` the state of the batch-mixing stream."""

    batches: int
    batches_total: int
    totals: Dict
    seconds: float
    mixing_rng: Optional[torch.Tensor]

    def state_dict(self) -> Dict:
        return {"batches": self.batches, "batches_total": self.batches_total, **self.totals,
                "seconds": self.seconds, "mixing_rng": self.mixing_rng}

    @classmethod
    def from_state_dict(cls, state: Dict) -> "EpochProgress":
        totals = {name: state[name] for name in ("loss_sum", "top1", "top5", "samples")}
        return cls(state["batches"], state["batches_total"], totals, state["seconds"], state["mixing_rng"])


@dataclass
class MidEpochCheckpoints:
    """Saving mid-epoch checkpoints: ``save`` (given the epoch's progress) every ``every`` optimiser steps
    of an epoch, and at a stop signal when ``at_stop`` (a single process: under torchrun the ranks may meet
    the signal at different steps, and the running sums are a collective)."""

    every: int
    save: Callable[[EpochProgress], None]
    at_stop: bool = True


def skip_batches(iterator: Iterator, count: int) -> None:
    """Draws and drops the first ``count`` batches of an epoch's loader iterator, so that its random draws
    (the workers' augmentation, the device loader's generator) are where they were after those batches.
    A loader without workers draws its augmentation from the global generators: those are put back as they
    were, i.e. as the mid-epoch checkpoint restored them, after those batches' draws."""
    saved = utils.capture_rng_state()
    for _ in range(count):
        next(iterator)
    utils.restore_rng_state(saved)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def compile_network(network: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """``torch.compile(network, mode=mode)``, except that on the CPU random numbers come from ATen's generator.

    Inductor's CPU code starts a Philox generator for every element it draws, which made dropout dearer
    compiled than eager and the compiled ViT slower than the eager one. With ATen's generator the
    compiled model also draws the eager model's dropout masks for the same seed.
    """
    from torch._inductor import list_mode_options  # imported here: Inductor loads slowly and eager runs never need it

    options = dict(list_mode_options(mode))
    if device.type == "cpu":
        options["fallback_random"] = True
    return torch.compile(network, options=options)


class Trainer:
    """Owns the model and everything stepped with it (optimiser, schedulers, gradient scaler, EMA weights).
    Works with any classifier: ``compile_mode`` is one of torch.compile's modes, applied to the model as it
    is given. The training recipe's options (warmup, label smoothing, batch mixing, EMA, decay-exempt
    parameters, gradient accumulation, the CUDA autocast type) default to off.

    ``steps_per_epoch`` is the number of batches of a training epoch; a warmup needs it, and without it
    (evaluation only) no per-step scheduler is built."""

    def __init__(self, *, model: nn.Module, device: torch.device, num_classes: int, optimizer: str, lr: float,
                 weight_decay: float, momentum: float, scheduler: str, lr_step: int, lr_gamma: float,
                 num_epochs: int, criterion: str, clip_grad_norm: float, use_amp: bool, use_compiled: bool,
                 compile_mode: str, show_progress: bool, distributed_replica: bool = False,
                 stop_signals: Optional[StopSignals] = None, warmup_epochs: float = 0.0,
                 steps_per_epoch: Optional[int] = None, label_smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0, ema_decay: float = 0.0, no_decay_norm_bias: bool = False,
                 accumulation_steps: int = 1, amp_dtype: str = "float16",
                 plain_progress_seconds: Optional[float] = None):
        self.model = model.to(device)
        self.device = device
        self.num_classes = num_classes
        parameters = parameter_groups(model, weight_decay) if no_decay_norm_bias else model.parameters()
        self.optimizer = build_optimizer(parameters, optimizer=optimizer, lr=lr,
                                         weight_decay=weight_decay, momentum=momentum)
        self.accumulation_steps = accumulation_steps
        self._build_schedulers(scheduler=scheduler, lr_step=lr_step, lr_gamma=lr_gamma, num_epochs=num_epochs,
                               warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch)
        # Training optimises the smoothed loss of the (mixed) targets; evaluation reports the plain loss, so
        # that test losses compare across recipes.
        self.loss_of = per_sample_loss(criterion, num_classes, label_smoothing=label_smoothing)
        self.evaluation_loss_of = per_sample_loss(criterion, num_classes)
        self.mixing = batch_mixing(mixup, cutmix, num_classes)
        self._mixing_rng_state: Optional[torch.Tensor] = None
        self.clip_grad_norm = clip_grad_norm
        self.use_amp = use_amp
        self.amp_dtype = AMP_DTYPES[amp_dtype] if device.type == "cuda" else AMP_DTYPE[device.type]
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda"
                                           and self.amp_dtype == torch.float16)
        # Exponential moving average of the weights (and buffers), updated after every optimiser step.
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay),
                                 use_buffers=True) if ema_decay > 0 else None
        self.show_progress = show_progress
        # Without a terminal (a pipe, a log file) a plain progress line at most this often; None: never.
        self.plain_progress_seconds = plain_progress_seconds
        # Called with (batch index, per-sample losses) after every training batch, e.g. by TensorBoard's log.
        self.on_train_batch: Optional[Callable[[int, torch.Tensor], None]] = None
        # self.model stays the bare model (checkpoints hold its keys, without DDP's "module." prefix);
        # self.network is what runs: the DDP replica and/or its compiled form.
        network = distributed.wrap_model(self.model, device) if distributed_replica else self.model
        self.network = compile_network(network, compile_mode, device) if use_compiled else network
        self.compiled = use_compiled
        self.compiled_batch = 0
        # While they are active (training from the command line), SIGINT and SIGTERM end the epoch at the next step.
        self.stop_signals = stop_signals

    def _build_schedulers(self, *, scheduler: str, lr_step: int, lr_gamma: float, num_epochs: int,
                          warmup_epochs: float, steps_per_epoch: Optional[int]) -> None:
        """``self.scheduler`` is stepped after each epoch, ``self.per_step_scheduler`` after each optimiser step.
        Without warmup only the first exists, as it always did; with warmup the second runs the warmup and
        the schedule after it, except plateau, which stays per epoch and starts once the warmup is over."""
        self.warmup_steps, self.per_step_scheduler = 0, None
        if warmup_epochs > 0 and steps_per_epoch is not None:
            optimizer_steps = math.ceil(steps_per_epoch / self.accumulation_steps)
            self.warmup_steps = warmup_steps_of(warmup_epochs, optimizer_steps)
            self.per_step_scheduler = build_warmup_scheduler(
                self.optimizer, scheduler=scheduler, warmup_steps=self.warmup_steps, steps_per_epoch=optimizer_steps,
                lr_step=lr_step, lr_gamma=lr_gamma, num_epochs=num_epochs)
        if self.per_step_scheduler is None or scheduler == "plateau":
            self.scheduler = build_scheduler(self.optimizer, scheduler=scheduler, lr_step=lr_step,
                                             lr_gamma=lr_gamma, num_epochs=num_epochs)
        else:
            self.scheduler = None

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- epochs --------------------------------------------------------------------------------

    def train_one_epoch(self, loader: DataLoader, description: str, progress: Optional[EpochProgress] = None,
                        mid_epoch: Optional[MidEpochCheckpoints] = None) -> SplitResult:
        """Trains one epoch, from its start or, given the ``progress`` of a mid-epoch checkpoint, from the
        batch after it; ``mid_epoch`` saves such checkpoints along the way."""
        self.network.train()
        return self._run(loader, description, training=True, progress=progress, mid_epoch=mid_epoch)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, description: str = "test", weights: str = "model",
                 confusion: bool = False) -> SplitResult:
        """The split's metrics with the trained weights (``model``) or their moving average (``ema``);
        with ``confusion``, also its confusion matrix."""
        network = self.network if weights == "model" else self.ema.module
        network.eval()
        return self._run(loader, description, training=False, network=network, confusion=confusion)

    def seed_batch_mixing(self, seed: int, epoch: int) -> None:
        """Starts the epoch's stream of MixUp / CutMix draws. It is its own stream, seeded per epoch like the
        shuffling, so a resumed run draws what the uninterrupted one did and dropout's stream is untouched."""
        self._mixing_rng_state = torch.Generator().manual_seed(mixing_seed(seed, epoch)).get_state()

    def _mixed(self, images: torch.Tensor, targets: torch.Tensor):
        # torchvision draws from the global CPU generator: it runs on a fork of it holding the mixing stream.
        with torch.random.fork_rng(devices=[]):
            if self._mixing_rng_state is not None:
                torch.set_rng_state(self._mixing_rng_state)
            images, mixed = self.mixing(images, targets)
            self._mixing_rng_state = torch.get_rng_state()
        return images, mixed

    def _run(self, loader: DataLoader, description: str, training: bool,
             network: Optional[nn.Module] = None, confusion: bool = False, progress: Optional[EpochProgress] = None,
             mid_epoch: Optional[MidEpochCheckpoints] = None) -> SplitResult:
        tally = _Tally(self.device, self.num_classes, confusion)
        watch = _NonFiniteWatch(self.device)
        loss_of = self.loss_of if training else self.evaluation_loss_of
        steps = len(loader)
        iterator = iter(loader)
        first_step, seconds_before, saved_at = 0, 0.0, None
        if progress is not None:
            skip_batches(iterator, progress.batches)
            tally.start_from(progress.totals)
            self._mixing_rng_state = progress.mixing_rng
            first_step, seconds_before, saved_at = progress.batches, progress.seconds, progress.batches
        bar = tqdm(iterator, desc=description, total=steps, initial=first_step, leave=False, dynamic_ncols=True,
                   disable=not self.show_progress)
        utils.synchronize(self.device)
        start = time.perf_counter()
        # The time and batches of a resumed epoch's earlier part count in the rate, as its tallies do.
        plain = PlainProgress(description, steps, self.plain_progress_seconds, start - seconds_before)
        for step, (images, targets) in enumerate(bar, start=first_step):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss_targets = targets
            if training and self.mixing is not None:
                # Top-1 / top-5 of a mixed batch count against each mixed target's largest share.
                images, loss_targets = self._mixed(images, targets)
                targets = loss_targets.argmax(dim=1)
            with self.autocast():
                logits = self._forward(images, network)
                losses = loss_of(logits.float(), loss_targets)
            if training:
                self._accumulate(losses.mean(), targets.shape[0], step, steps)
                if self.on_train_batch is not None:
                    self.on_train_batch(step, losses.detach())
            tally.add(losses, logits, targets)
            watch.add(step, losses)
            if (step + 1) % NONFINITE_CHECK_INTERVAL == 0:
                watch.raise_if_found(description, steps)
            # With mid-epoch checkpoints a stop waits for the end of the accumulation group: only the state
            # after an optimiser step can be saved and continued.
            stepped = training and self._optimizer_stepped_after(step, steps)
            if mid_epoch is not None and stepped and self._saves_now(mid_epoch, step, steps):
                watch.raise_if_found(description, steps)  # the updates of a bad step are never saved
                utils.synchronize(self.device)
                elapsed = seconds_before + time.perf_counter() - start
                mid_epoch.save(EpochProgress(step + 1, steps, tally.totals(), elapsed, self._mixing_rng_state))
                saved_at = step + 1
            if self.stop_signals is not None and (mid_epoch is None or stepped):
                self.stop_signals.raise_if_received(
                    f"{description}, step {step + 1}/{steps}",
                    None if saved_at is None else f"{description} up to step {saved_at}/{steps}")
            if self.show_progress and step % 10 == 0:
                running = tally.summary()
                bar.set_postfix(loss=f"{running['loss']:.4f}", top1=f"{running['top1']:.2f}%")
            plain.after_step(step, tally)
        watch.raise_if_found(description, steps)
        utils.synchronize(self.device)
        seconds = seconds_before + time.perf_counter() - start
        tally.sum_over_processes()
        summary = tally.summary()
        return SplitResult(summary["loss"], summary["top1"], summary["top5"], tally.samples, seconds,
                           tally.confusion_matrix())

    def _optimizer_stepped_after(self, step: int, steps: int) -> bool:
        """Whether batch ``step`` (of ``steps``) ended an accumulation group, i.e. was followed by an optimiser step."""
        return (step + 1) % self.accumulation_steps == 0 or step + 1 == steps

    def _saves_now(self, mid_epoch: MidEpochCheckpoints, step: int, steps: int) -> bool:
        """Whether a mid-epoch checkpoint is due after the optimiser step that ended batch ``step``: every
        ``mid_epoch.every`` optimiser steps of the epoch, and at a stop signal."""
        optimizer_steps = math.ceil((step + 1) / self.accumulation_steps)
        if optimizer_steps % mid_epoch.every == 0:
            return True
        return mid_epoch.at_stop and self.stop_signals is not None and self.stop_signals.was_received()

    def _forward(self, images: torch.Tensor, network: Optional[nn.Module] = None) -> torch.Tensor:
        """Logits of ``images``. A compiled model gets a short last batch padded with zero images to the
        largest batch it has met, so that it never meets a new shape and never recompiles; every layer is
        independent across the batch, so the real samples' logits and gradients are unchanged. Another
        ``network`` (the EMA weights, never compiled) just runs."""
        if network is not None and network is not self.network:
            return network(images)
        count = images.shape[0]
        if not self.compiled or count >= self.compiled_batch:
            self.compiled_batch = max(self.compiled_batch, count)
            return self.network(images)
        padding = images.new_zeros((self.compiled_batch - count, *images.shape[1:]))
        return self.network(torch.cat([images, padding]))[:count]

    def _step(self, loss: torch.Tensor) -> None:
        """One optimiser step on the gradients of ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._optimizer_step()

    def _accumulate(self, loss: torch.Tensor, samples: int, step: int, steps: int) -> None:
        """Adds batch ``step`` (of ``steps``) to the current group of ``accumulation_steps`` batches, and steps
        the optimiser after the group's last batch. The gradients are those of the mean loss over all the
        group's samples, one large batch's; the epoch's last group may be shorter and is stepped too, with
        the same mean over the samples it has."""
        if self.accumulation_steps == 1:
            self._step(loss)
            return
        if step % self.accumulation_steps == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._group_nominal, self._group_samples = self.accumulation_steps * samples, 0
        self._group_samples += samples
        # Weighted by a full group's size now; a group that turns out smaller is corrected below.
        self.scaler.scale(loss * (samples / self._group_nominal)).backward()
        if (step + 1) % self.accumulation_steps and step + 1 < steps:
            return
        if self._group_samples != self._group_nominal:
            for parameter in self.model.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(self._group_nominal / self._group_samples)
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_scheduler is not None:
            self.per_step_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def warming_up(self) -> bool:
        return self.per_step_scheduler is not None and self.per_step_scheduler.last_epoch < self.warmup_steps

    def step_scheduler(self, watched_loss: float) -> None:
        """``watched_loss``: what the plateau scheduler watches, the validation loss when a validation
        split is held out, else the test loss (the original program's behaviour)."""
        if self.warming_up():
            return  # plateau, the only per-epoch schedule beside a warmup, starts when the warmup is over
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(watched_loss)
        elif self.scheduler is not None:
            self.scheduler.step()

    # -- checkpoint state ----------------------------------------------------------------------

    def state_dict(self) -> Dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }
        # Only when their options are on, so that other runs' checkpoints hold what they always did.
        if self.per_step_scheduler is not None:
            state["step_scheduler"] = self.per_step_scheduler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def fit_schedule_to(self, num_epochs: int, completed_epochs: int) -> None:
        """After a resume that changed the run's length: from epoch ``completed_epochs + 1`` on, the
        learning rate is the one a run started with ``num_epochs`` would use at that epoch. Only the
        cosine schedule depends on the length; step and plateau go on as they were."""
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            return
        if self.scheduler.T_max == num_epochs:
            return
        self.scheduler.T_max = num_epochs
        # Set from the closed form: the scheduler's own update scales the current rate, which a finished
        # cosine run has brought to 0, and that would keep it at 0.
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = cosine_rate(base_lr, completed_epochs, num_epochs, self.scheduler.eta_min)

    def load_state_dict(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.per_step_scheduler is not None:
            self.per_step_scheduler.load_state_dict(state["step_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def fit(trainer: Trainer, train_loader: DataLoader, test_loader: DataLoader, *, outputs: run_files.RunOutputs,
        num_epochs: int, seed: int, run_arguments: Dict, start_epoch: int = 0,
        history: Optional[List[Dict]] = None, args_changes: Optional[List[Dict]] = None,
        val_loader: Optional[DataLoader] = None, class_names: Optional[List[str]] = None,
        tensorboard: Optional[TensorBoardLog] = None, checkpoint_steps: int = 0,
        in_epoch: Optional[Dict] = None) -> List[Dict]:
    """Trains epochs ``start_epoch + 1 .. num_epochs``; after each it logs the epoch and writes
    ``last.pt`` (and ``best.pt`` when test top-1 improved, or validation top-1 when ``val_loader``
    holds out a validation split, which is then evaluated every epoch). Returns the history of all epochs.
    ``run_arguments`` (the flags in effect) and ``args_changes`` (the resumes that changed some, see
    ``run_files.args_change_line``) are stored in the checkpoints: together they say how every epoch was trained.
    ``class_names``, the names of the classifier's outputs in order, are stored there too. ``tensorboard``
    (on the main process only) also gets every epoch's metrics and the training loss every few batches.

    With ``checkpoint_steps`` > 0, ``last.pt`` is also written every that many optimiser steps of an epoch
    and at a stop signal, holding the completed epochs and the epoch's progress (``in_epoch``); the per-epoch
    files (logs, best.pt) still only ever hold whole epochs. ``in_epoch``: the progress of epoch
    ``start_epoch + 1`` a resumed mid-epoch checkpoint holds, which that epoch continues from."""
    history = list(history or [])
    args_changes = list(args_changes or [])
    # Under torchrun every rank trains and gets the same (summed) metrics; rank 0 alone writes them.
    writes_outputs = distributed.is_main_process()
    if writes_outputs:
        outputs.start_logs(history)
        if history:
            checkpoints.complete_best_checkpoint(trainer, outputs, start_epoch, history, run_arguments, args_changes,
                                                 class_names, state_is_the_epochs=in_epoch is None)

    def save_in_epoch(state: Dict) -> None:
        if writes_outputs:
            checkpoints.save_mid_epoch_checkpoint(trainer, outputs, history, run_arguments, args_changes, state,
                                                  class_names)

    for epoch in range(start_epoch + 1, num_epochs + 1):
        if tensorboard is not None:
            trainer.on_train_batch = functools.partial(tensorboard.log_step_loss, epoch)
        record = _train_epoch(trainer, train_loader, test_loader, val_loader, epoch, seed,
                              in_epoch=in_epoch if epoch == start_epoch + 1 else None,
                              checkpoint_steps=checkpoint_steps, save_in_epoch=save_in_epoch)
        history.append(record)
        if writes_outputs:
            # Checkpoint first: a run killed in between then holds the epoch in last.pt, whose history
            # rewrites the logs on --resume, rather than a logged epoch that no checkpoint can continue.
            checkpoints.save_checkpoints(trainer, outputs, epoch, history, run_arguments, args_changes, class_names)
            outputs.log_epoch(record, history)
            if tensorboard is not None:
                tensorboard.log_epoch(record)
            _report(epoch_summary(record), trainer.show_progress)
    trainer.on_train_batch = None
    if tensorboard is not None:
        tensorboard.close()
    if history and writes_outputs:
        outputs.finish(history)
        for line in run_files.summary_lines(history):
            _report(line, trainer.show_progress)
    return history


def _train_epoch(trainer: Trainer, train_loader, test_loader, val_loader, epoch: int, seed: int,
                 in_epoch: Optional[Dict] = None, checkpoint_steps: int = 0,
                 save_in_epoch: Optional[Callable[[Dict], None]] = None) -> Dict:
    """One epoch's training and evaluation, and its record. ``in_epoch``: the progress to continue the
    training from; ``save_in_epoch`` saves the epoch's progress (with its number and rate) every
    ``checkpoint_steps`` optimiser steps when that is > 0."""
    seed_epoch(train_loader, seed, epoch)
    trainer.seed_batch_mixing(seed, epoch)
    # With a warmup: the rate of the epoch's first step, which a continued epoch has long passed.
    learning_rate = in_epoch["lr"] if in_epoch is not None else trainer.learning_rate()
    progress = EpochProgress.from_state_dict(in_epoch) if in_epoch is not None else None
    mid_epoch = None
    if checkpoint_steps > 0 and save_in_epoch is not None:
        mid_epoch = MidEpochCheckpoints(
            checkpoint_steps, lambda done: save_in_epoch({"epoch": epoch, "lr": learning_rate, **done.state_dict()}),
            at_stop=not distributed.is_distributed())
    train = trainer.train_one_epoch(train_loader, f"epoch {epoch} train", progress, mid_epoch)
    test = trainer.evaluate(test_loader, f"epoch {epoch} test")
    validation = trainer.evaluate(val_loader, f"epoch {epoch} validation") if val_loader is not None else None
    trainer.step_scheduler(validation.loss if validation is not None else test.loss)
    record = {
        "epoch": epoch,
        "lr": learning_rate,
        "train_loss": train.loss, "train_top1": train.top1, "train_top5": train.top5,
        "test_loss": test.loss, "test_top1": test.top1, "test_top5": test.top5,
        "epoch_seconds": train.seconds + test.seconds + (validation.seconds if validation is not None else 0.0),
        "images_per_second": train.samples / train.seconds if train.seconds > 0 else 0.0,
    }
    if validation is not None:
        record.update(val_loss=validation.loss, val_top1=validation.top1, val_top5=validation.top5)
    if trainer.ema is not None:
        metrics, seconds = _ema_metrics(trainer, test_loader, val_loader, epoch)
        record.update(metrics)
        record["epoch_seconds"] += seconds
    return record


def _ema_metrics(trainer: Trainer, test_loader, val_loader, epoch: int) -> Tuple[Dict, float]:
    """The EMA weights' test metrics, and validation metrics when a validation split is held out, with
    the seconds they took."""
    test = trainer.evaluate(test_loader, f"epoch {epoch} test (EMA)", weights="ema")
    metrics = dict(ema_test_loss=test.loss, ema_test_top1=test.top1, ema_test_top5=test.top5)
    seconds = test.seconds
    if val_loader is not None:
        validation = trainer.evaluate(val_loader, f"epoch {epoch} validation (EMA)", weights="ema")
        metrics.update(ema_val_loss=validation.loss, ema_val_top1=validation.top1, ema_val_top5=validation.top5)
        seconds += validation.seconds
    return metrics, seconds


def epoch_summary(record: Dict) -> str:
    return f"{run_files.epoch_line(record)} | LR: {record['lr']:.3e} | {record['images_per_second']:.1f} img/s"


def _report(line: str, show_progress: bool) -> None:
    # tqdm.write keeps a line from tearing a progress bar that is still on screen.
    if show_progress:
        tqdm.write(line)
    else:
        print(line, flush=True)


def show_progress_bars() -> bool:
    """Progress bars only on a terminal; logs and pipes get one plain line per epoch instead."""
    return sys.stdout.isatty()
