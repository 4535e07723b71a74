"""Speed and memory of every token mixer and of whole-model training, as ratios to ``Attention``.

Three tables, each measured side by side in one run (the candidates alternate within every
repeat, so drift on a shared machine hits all of them alike; each ratio to Attention comes with the
middle half, first to third quartile, of the ratios within single repeats):

1. every layer, forward+backward time and bytes saved for backward, at (B, N) = (32, 65),
   (32, 197), (8, 1025) with D = 192; ConvNN-Attention with ``all``, ``random`` (64 candidates)
   and ``spatial`` (8x8 grid) sampling;
2. whole-model ViT-Tiny training steps (forward, backward, AdamW step) in images per second, at
   32 px / patch 4 (with the CLI's dropout of 0.1 and with none) and 224 px / patch 16, for ``Attention``
   and ``ConvNNAttention``, eager and compiled;
3. data loading in images per second at 224 px, for the worker loader and the device-resident one;
4. the operations one forward+backward of ``Attention`` and of ``ConvNNAttention`` dispatches, the latter
   on the GPU path (on a CPU, its Triton kernels run in Triton's interpreter): on a GPU each launches at
   least one kernel.

Prints markdown tables and writes every figure to a JSON file.

    python scripts/benchmark.py --device cpu --json benchmark.json
"""

import collections
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import resource
except ImportError:  # Windows
    resource = None

# Without a GPU, Triton's interpreter runs the GPU path's kernels on CPU tensors, for the operation count. It is
# chosen when triton.language is first imported, which importing the models does, hence before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.neighbour_conv as neighbour_conv_module  # noqa: E402

import dataset  # noqa: E402
from models.vit import ViT, build_layer  # noqa: E402
from models.vit_layers import options_from  # noqa: E402
from train_eval import AMP_DTYPE, AMP_DTYPES, compile_network  # noqa: E402
from utils import device_problem, synchronize  # noqa: E402
from settings import CommandLineParser  # noqa: E402

PARTS = ("layers", "models", "data", "operations")
SHAPES = ((32, 65), (32, 197), (8, 1025))
WIDTH = 192
LAYER_CASES = (
    ("Attention", {}),
    ("ConvNNAttention", {}),
    ("ConvNNAttention random-64", dict(sampling_type="random", num_samples=64)),
    ("ConvNNAttention spatial-8x8", dict(sampling_type="spatial", num_samples=8)),
    ("KvtAttention", {}),
    ("LocalAttention", {}),
    ("SparseAttention", dict(sparse_mode="local")),
    ("Conv1d", {}),
    ("BranchConv", {}),
    ("BranchAttention", {}),
)


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd keeps for backward during ``step()``, each storage counted once."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step()
    del output
    return sum(storages.values())


# Operators that only reinterpret or allocate memory, which launch no kernel on a GPU; all others are counted.
NOT_COUNTED = {"aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
               "aten::new_empty_strided"}


class _DispatchedOperations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operations = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in NOT_COUNTED:
            self.operations[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def dispatched_operations(step) -> collections.Counter:
    """How often each operator that does work (no view, no bare allocation) is dispatched during ``step()``."""
    with _DispatchedOperations() as counting:
        step()
    return counting.operations


@contextlib.contextmanager
def gpu_aggregation(device: torch.device):
    """ConvNN-Attention's GPU path: its own on a GPU, forced with Triton's interpreter on a CPU."""
    if device.type == "cuda":
        yield
        return
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("the GPU path runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1")
    with mock.patch.object(neighbour_conv_module, "_uses_triton", lambda source: True):
        yield


def operation_table(device, batch: int = 2, seq_len: int = 65):
    """Operations dispatched by one forward+backward (gradients not accumulated, as in a training step), by layer;
    the count does not depend on the sizes."""
    rows = []
    x = torch.randn(batch, seq_len, WIDTH, device=device, requires_grad=True)
    grad = torch.ones_like(x)
    for name in ("Attention", "ConvNNAttention"):
        layer = build_layer(name, d_hidden=WIDTH, num_heads=3, attention_dropout=0.0, num_tokens=seq_len,
                            **options_from(name, dict(K=9))).to(device).train()
        with gpu_aggregation(device):
            operations = dispatched_operations(lambda: layer(x).backward(grad))
        x.grad = None
        rows.append(dict(layer=name, path="GPU", operations=sum(operations.values()),
                         by_operator=dict(operations.most_common())))
    return rows


def page_faults() -> Optional[int]:
    """Minor page faults of this process so far (memory it touched for the first time since the system handed it
    over); ``None`` where the system does not count them (no ``resource`` module, as on Windows)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Timing(NamedTuple):
    seconds: float  # median of the repeats
    page_faults: Optional[float]  # median per repeat, or None where they are not counted
    repeats: Tuple[float, ...]  # each repeat's seconds, in order


def ratio_quartiles(times: Sequence[float], baseline: Sequence[float]) -> Tuple[float, float]:
    """First and third quartiles of ``times[r] / baseline[r]`` over the repeats ``r``: the steps alternate inside a
    repeat, so each repeat's ratio compares them under the same conditions, and the middle half of those ratios
    shows how far a run's ratio of medians can be trusted (on a shared VM, a few per cent either way)."""
    ratios = [time / base for time, base in zip(times, baseline)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return first, third


def interleaved_timings(steps, repeats: int, warmup: int, device: torch.device) -> List[Timing]:
    """Median seconds and page faults of each step, and each repeat's seconds (for per-repeat ratios); the steps
    alternate inside every repeat. The faults tell runs apart whose ratios differ only because one step's freshly
    allocated memory was handed back to the system and faulted in again: on a small VM that cost varies from run
    to run and from step to step."""
    for step in steps:
        for _ in range(warmup):
            step()
    synchronize(device)
    times, faults = [[] for _ in steps], [[] for _ in steps]
    for _ in range(repeats):
        for step, record, faulted in zip(steps, times, faults):
            faults_before = page_faults()
            start = time.perf_counter()
            step()
            synchronize(device)
            record.append(time.perf_counter() - start)
            if faults_before is not None:
                faulted.append(page_faults() - faults_before)
    return [Timing(statistics.median(record), statistics.median(faulted) if faulted else None, tuple(record))
            for record, faulted in zip(times, faults)]


def interleaved_medians(steps, repeats: int, warmup: int, device: torch.device) -> List[float]:
    """Median seconds of each step; the steps alternate inside every repeat."""
    return [timing.seconds for timing in interleaved_timings(steps, repeats, warmup, device)]


def layer_table(device, dtype, repeats, warmup, shapes=SHAPES):
    rows = []
    for batch, seq_len in shapes:
        grid_side = math.isqrt(seq_len - 1)
        structure = dict(d_hidden=WIDTH, num_heads=3, attention_dropout=0.0, num_tokens=seq_len,
                         grid_size=(grid_side, grid_side))
        x = torch.randn(batch, seq_len, WIDTH, device=device, requires_grad=True)
        names, steps, forwards = [], [], []
        for name, extra in LAYER_CASES:
            layer_name = name.split()[0]
            options = options_from(layer_name, dict(K=9, kernel_size=9, branch_ratio=0.5, **extra))
            layer = build_layer(layer_name, **structure, **options).to(device).train()

            def forward(layer=layer):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    return layer(x)

            names.append(name)
            forwards.append(forward)
            steps.append(lambda forward=forward: forward().float().sum().backward())
        timings = interleaved_timings(steps, repeats, warmup, device)
        memory = [saved_bytes(forward) for forward in forwards]
        for name, timing, saved in zip(names, timings, memory):
            rows.append(dict(batch=batch, tokens=seq_len, layer=name, ms=timing.seconds * 1e3,
                             time_ratio=timing.seconds / timings[0].seconds,
                             time_ratio_quartiles=list(ratio_quartiles(timing.repeats, timings[0].repeats)),
                             page_faults=timing.page_faults,
                             saved_mib=saved / 2**20, memory_ratio=saved / memory[0]))
    return rows


def training_step(model, optimizer, images, labels, dtype, device):
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# (image size, patch size, dropout): the CLI's dropout of 0.1 for the residual branches and inside the token
# mixer, and at 32 px also none, where Attention keeps its fused kernel and the rows compare the mixers alone.
MODEL_CASES = ((32, 4, 0.1), (32, 4, 0.0), (224, 16, 0.1))


def model_table(device, dtype, repeats, warmup, batch, compile_modes, cases=MODEL_CASES):
    rows = []
    for img_size, patch, dropout in cases:
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        labels = torch.randint(0, 10, (batch,), device=device)
        names, steps = [], []
        for compiled in compile_modes:
            for layer in ("Attention", "ConvNNAttention"):
                torch.manual_seed(0)
                model = ViT(img_size=img_size, num_classes=10, layer=layer, patch_size=patch, dropout=dropout,
                            attention_dropout=dropout).to(device).train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                runnable = compile_network(model, "default", device) if compiled else model
                names.append((layer, "compiled" if compiled else "eager"))
                steps.append(training_step(runnable, optimizer, images, labels, dtype, device))
        started = time.perf_counter()
        measured = dict(zip(names, interleaved_timings(steps, repeats, warmup, device)))
        # Compiling takes most of this table's time: a line per case shows how far a run that was stopped got.
        print(f"models: {img_size} px / patch {patch}, dropout {dropout:g} measured in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for (layer, mode), timing in measured.items():
            attention = measured[("Attention", mode)]
            # Images per second compare as the inverse of the times: Attention's time over this layer's.
            attention_over_layer = ratio_quartiles(attention.repeats, timing.repeats)
            rows.append(dict(image=img_size, patch=patch, dropout=dropout, layer=layer, mode=mode, batch=batch,
                             images_per_second=batch / timing.seconds,
                             ratio_to_attention=attention.seconds / timing.seconds,
                             ratio_to_attention_quartiles=list(attention_over_layer),
                             ratio_to_eager=measured[(layer, "eager")].seconds / timing.seconds))
    return rows


def data_table(device, batches, batch_size):
    """Images per second that each data path delivers on ``device``: synthetic CIFAR-sized images
    resized to 224 px with augmentation, the worker path with one process per core."""
    train, test, _, _ = dataset.load_datasets("synthetic", "unused", resize=224, augment=True)
    on_device = dict(dataset="synthetic", resize=224, augment=True)
    workers = max(1, torch.get_num_threads())
    rows = []
    for path, options in (("workers", None), ("device", on_device)):
        loader, _ = dataset.make_loaders(train, test, batch_size=batch_size, num_workers=0 if options else workers,
                                         device=device, on_device=options)
        batches_seen, start = 0, None
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if batches_seen == 1:  # the first batch pays for starting workers
                synchronize(device)
                start = time.perf_counter()
            batches_seen += 1
            if batches_seen > batches:
                break
        synchronize(device)
        seconds = time.perf_counter() - start
        rows.append(dict(path=path, images_per_second=(batches_seen - 2) * batch_size / seconds))
    return rows


def _quartiles(quartiles: Sequence[float]) -> str:
    return f"{quartiles[0]:.2f}-{quartiles[1]:.2f}"


def print_tables(layers, models, data, operations, header):
    print(header + "\n")
    if layers:
        print("| B | N | layer | fwd+bwd ms | x Attention | middle half of repeats | page faults per step "
              "| saved MiB | x Attention |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in layers:
            faults = "-" if r["page_faults"] is None else f"{r['page_faults']:.0f}"
            print(f"| {r['batch']} | {r['tokens']} | {r['layer']} | {r['ms']:.1f} | {r['time_ratio']:.2f} "
                  f"| {_quartiles(r['time_ratio_quartiles'])} | {faults} | {r['saved_mib']:.1f} "
                  f"| {r['memory_ratio']:.2f} |")
        print()
    if models:
        print("| image / patch | dropout | layer | mode | images/s | x Attention | middle half of repeats | x eager |")
        print("|---|---|---|---|---|---|---|---|")
        for r in models:
            print(f"| {r['image']} / {r['patch']} | {r['dropout']:g} | {r['layer']} | {r['mode']} "
                  f"| {r['images_per_second']:.1f} | {r['ratio_to_attention']:.2f} "
                  f"| {_quartiles(r['ratio_to_attention_quartiles'])} | {r['ratio_to_eager']:.2f} |")
        print()
    if data:
        print("| data path | images/s at 224 px |")
        print("|---|---|")
        for r in data:
            print(f"| {r['path']} | {r['images_per_second']:.0f} |")
        print()
    if operations:
        print("| layer (GPU path) | operations per forward+backward | largest |")
        print("|---|---|---|")
        for r in operations:
            largest = ", ".join(f"{name.split('::')[-1]} {count}" for name, count in list(r["by_operator"].items())[:4])
            print(f"| {r['layer']} | {r['operations']} | {largest} |")


def model_cases(text: str) -> Optional[Tuple[Tuple[int, int, float], ...]]:
    """The (image size, patch size, dropout) cases of ``--model_cases`` ("32/4/0.1,224/16/0.1"), or None where one
    is not three numbers, the patch dividing the image and the dropout in [0, 1)."""
    cases = []
    for case in text.split(","):
        try:
            image, patch, dropout = case.split("/")
            cases.append((int(image), int(patch), float(dropout)))
        except ValueError:
            return None
    if not all(image > 0 and patch > 0 and image % patch == 0 and 0 <= dropout < 1 for image, patch, dropout in cases):
        return None
    return tuple(cases)


def argument_problems(args, parts) -> list:
    """One line per flag the run could not use, found before anything is measured."""
    problems = []
    unusable_device = device_problem(args.device)
    if unusable_device:
        problems.append(f"--device: {unusable_device}")
    unknown = sorted(parts - set(PARTS))
    if unknown:
        problems.append(f"--parts: {', '.join(unknown)} is not a part; choose from {', '.join(PARTS)}")
    least_repeats = 2 if "data" in parts else 1
    if args.repeats < least_repeats:
        problems.append(f"--repeats: must be >= {least_repeats}"
                        f"{' (the data part times the batches after the first)' if least_repeats == 2 else ''}, "
                        f"got {args.repeats}")
    if args.warmup < 0:
        problems.append(f"--warmup: must be >= 0, got {args.warmup}")
    if args.model_batch < 1:
        problems.append(f"--model_batch: must be >= 1, got {args.model_batch}")
    if model_cases(args.model_cases) is None:
        problems.append(f"--model_cases: comma-separated IMAGE/PATCH/DROPOUT cases, the patch dividing the image and "
                        f"the dropout in [0, 1), e.g. 32/4/0.1,224/16/0.1; got {args.model_cases}")
    if args.amp_dtype is not None and not args.amp:
        problems.append(f"--amp_dtype: {args.amp_dtype} applies under autocast only; add --amp")
    folder = Path(args.json).parent
    if Path(args.json).is_dir():
        problems.append(f"--json: {args.json} is a folder; give a file name, e.g. {Path(args.json) / 'benchmark.json'}")
    elif not folder.is_dir():
        problems.append(f"--json: the folder {folder} does not exist; create it or write elsewhere")
    return problems


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA/MPS, bfloat16 on CPU)")
    parser.add_argument("--amp_dtype", choices=list(AMP_DTYPES), default=None,
                        help="with --amp: the autocast dtype instead of the device's default")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed steps per row (the data part: batches timed after the first, at least 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model_batch", type=int, default=32)
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled whole-model rows")
    parser.add_argument("--json", default="benchmark.json")
    parser.add_argument("--model_cases", default=",".join(f"{image}/{patch}/{dropout:g}"
                                                          for image, patch, dropout in MODEL_CASES),
                        help="the model table's IMAGE/PATCH/DROPOUT cases, comma-separated")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    problems = argument_problems(args, parts)
    if problems:
        parser.error(problems[0])

    device = torch.device(args.device)
    dtype = None
    if args.amp:
        dtype = AMP_DTYPES[args.amp_dtype] if args.amp_dtype else AMP_DTYPE[device.type]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"{time.strftime('%Y-%m-%d')}, {device.type} ({name}), {torch.get_num_threads()} CPU threads, "
              f"torch {torch.__version__}, {'AMP ' + str(dtype).split('.')[-1] if dtype else 'float32'}")
    torch.manual_seed(0)
    layers = layer_table(device, dtype, args.repeats, args.warmup) if "layers" in parts else []
    compile_modes = (False,) if args.no_compile else (False, True)
    models = (model_table(device, dtype, args.repeats, args.warmup, args.model_batch, compile_modes,
                          model_cases(args.model_cases)) if "models" in parts else [])
    data = data_table(device, batches=args.repeats, batch_size=args.model_batch) if "data" in parts else []
    operations = operation_table(device) if "operations" in parts else []
    print_tables(layers, models, data, operations, header)
    Path(args.json).write_text(json.dumps(dict(header=header, layers=layers, models=models, data=data,
                                               operations=operations), indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
