"""ConvNN-Attention: the fast layer against the plain reference of the test suite, side by side.

Measures forward+backward time (median over repeats after warm-up) and the bytes autograd saves
for the backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``), and prints a
markdown table of both and their ratios.

    python scripts/benchmark_convnn.py --batch 32 --tokens 197 --width 192 --K 9

With ``--profile`` it prints instead where the time of a forward+backward step goes, by operator
(``torch.profiler``, self CPU time, and with ``--device cuda`` also self GPU time, kernel by kernel), for
ConvNN-Attention and for ``Attention``; with ``--chunks 2,4,6,8``
the layer's forward+backward time at each chunk budget of the CPU aggregation (MiB), side by side with
``Attention``'s, and with ``--runs 5`` that comparison five times over, since one run on a shared machine
can be off by more than the difference it measures.
"""

import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.neighbour_conv as neighbour_conv_module  # noqa: E402
from benchmark import interleaved_medians, saved_bytes  # noqa: E402
from models.vit import build_layer  # noqa: E402
from models.vit_layers import MultiHeadConvNNAttention, options_from  # noqa: E402
from scripts.convnn_reference import reference_convnn  # noqa: E402
from utils import device_problem, synchronize  # noqa: E402
from settings import CommandLineParser  # noqa: E402


def compare_with_reference(args):
    torch.manual_seed(0)
    rows = []
    for convolution_type in ("depthwise", "standard"):
        layer = MultiHeadConvNNAttention(d_hidden=args.width, K=args.K, attention_dropout=0.0,
                                         convolution_type=convolution_type, num_tokens=args.tokens).eval()
        x = torch.randn(args.batch, args.tokens, args.width, requires_grad=True)
        fast, plain = (lambda: layer(x)), (lambda: reference_convnn(layer, x))
        steps = [lambda forward=forward: forward().sum().backward() for forward in (fast, plain)]
        fast_time, plain_time = interleaved_medians(steps, args.repeats, args.warmup, torch.device("cpu"))
        fast_saved, plain_saved = saved_bytes(fast), saved_bytes(plain)
        rows.append((convolution_type, fast_time, plain_time, fast_saved, plain_saved))

    print(f"ConvNN-Attention forward+backward, B={args.batch} N={args.tokens} D={args.width} K={args.K}, "
          f"sampling all, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| convolution | fast ms | reference ms | speed-up | fast saved MiB | reference saved MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for convolution_type, fast_time, plain_time, fast_saved, plain_saved in rows:
        print(f"| {convolution_type} | {fast_time * 1e3:.1f} | {plain_time * 1e3:.1f} | {plain_time / fast_time:.2f}x "
              f"| {fast_saved / 2**20:.1f} | {plain_saved / 2**20:.1f} | {fast_saved / plain_saved:.3f} |")


def operator_shares(step, steps: int, device: torch.device = torch.device("cpu")):
    """Per kind of time (``"CPU"``, and ``"GPU"`` on CUDA): self milliseconds per step, and ``(operator, share of
    that time, calls per step)`` largest first. GPU time is that of the kernels, each named as launched."""
    for _ in range(2):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        for _ in range(steps):
            step()
        synchronize(device)
    kinds = {"CPU": "self_cpu_time_total"}
    if device.type == "cuda":
        kinds["GPU"] = "self_device_time_total"
    result = {}
    for kind, attribute in kinds.items():
        events = [event for event in profiled.key_averages() if getattr(event, attribute) > 0]
        total = sum(getattr(event, attribute) for event in events)
        shares = sorted(((event.key, getattr(event, attribute) / total, event.count / steps) for event in events),
                        key=lambda share: -share[1])
        result[kind] = (total / steps / 1e3, shares)
    return result


def print_profile(args, top: int = 8):
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.tokens, args.width, device=device, requires_grad=True)
    print(f"Where one forward+backward goes on {device}, B={args.batch} N={args.tokens} D={args.width} K={args.K}, "
          f"depthwise, sampling all, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in ("ConvNNAttention", "Attention"):
        layer = build_layer(name, d_hidden=args.width, num_heads=3, attention_dropout=0.0, num_tokens=args.tokens,
                            **options_from(name, dict(K=args.K))).to(device).train()

        def step(layer=layer):
            layer(x).sum().backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)  # as a training step does, so no gradient is accumulated

        for kind, (per_step, shares) in operator_shares(step, args.repeats, device).items():
            print(f"\n{name}: {per_step:.2f} ms of self {kind} time per step (under the profiler)\n")
            print("| operator | share | calls per step |")
            print("|---|---|---|")
            for key, share, calls in shares[:top]:
                print(f"| `{key}` | {share:.0%} | {calls:g} |")


def compare_chunk_budgets(args):
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.width, requires_grad=True)
    budgets = args.chunks
    layers = {name: build_layer(name, d_hidden=args.width, num_heads=3, attention_dropout=0.0, num_tokens=args.tokens,
                                **options_from(name, dict(K=args.K))).train()
              for name in ("Attention", "ConvNNAttention")}

    def step(layer, budget=None):
        if budget is not None:
            neighbour_conv_module.CHUNK_BYTES = int(budget * 2**20)
        layer(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    default = neighbour_conv_module.CHUNK_BYTES
    steps = [lambda: step(layers["Attention"])]
    steps += [lambda budget=budget: step(layers["ConvNNAttention"], budget) for budget in budgets]
    runs = []  # per run, the median seconds of Attention and of every budget
    try:
        for _ in range(args.runs):
            runs.append(interleaved_medians(steps, args.repeats, args.warmup, torch.device("cpu")))
    finally:
        neighbour_conv_module.CHUNK_BYTES = default
    print(f"ConvNN-Attention forward+backward by chunk budget, B={args.batch} N={args.tokens} D={args.width} "
          f"K={args.K}, {torch.get_num_threads()} threads (default budget {default / 2**20:g} MiB), "
          f"{args.runs} run(s) of {args.repeats} repeats\n")
    print("| chunk budget MiB | sequences per chunk | ms, median of runs | x Attention, each run | median |")
    print("|---|---|---|---|---|")
    bytes_per_token = args.K * args.width * 4
    for column, budget in enumerate(budgets, start=1):
        per_chunk = neighbour_conv_module.sequences_per_chunk(args.tokens, bytes_per_token, int(budget * 2**20))
        ratios = [times[column] / times[0] for times in runs]
        milliseconds = statistics.median(times[column] for times in runs) * 1e3
        print(f"| {budget:g} | {min(per_chunk, args.batch)} | {milliseconds:.1f} "
              f"| {', '.join(f'{ratio:.2f}' for ratio in ratios)} | {statistics.median(ratios):.2f} |")


def chunk_budgets(text: str):
    """The budgets in MiB of ``--chunks``, or None where one is not a positive number."""
    try:
        budgets = [float(budget) for budget in text.split(",")]
    except ValueError:
        return None
    return budgets if all(budget > 0 for budget in budgets) else None


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--K", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="print where the time goes by operator instead of comparing with the reference")
    parser.add_argument("--chunks", help="comma-separated chunk budgets in MiB to compare instead")
    parser.add_argument("--runs", type=int, default=1,
                        help="with --chunks: repeat the interleaved comparison, printing each run's ratio")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                        help="with --profile: the device to profile on (the other modes measure the CPU)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    unusable_device = device_problem(args.device)
    if unusable_device:
        parser.error(f"--device: {unusable_device}")
    if args.device != "cpu" and not args.profile:
        parser.error(f"--device: only --profile runs on {args.device}; the other modes measure the CPU")
    for flag in ("batch", "tokens", "width", "K", "repeats", "runs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.K > args.tokens:
        parser.error(f"--K: {args.K} neighbours out of {args.tokens} tokens; use at most --tokens")
    if (args.profile or args.chunks) and args.width % 3:
        parser.error(f"--width: Attention's 3 heads need a multiple of 3, got {args.width}")
    if args.chunks is not None:
        args.chunks = chunk_budgets(args.chunks)
        if args.chunks is None:
            parser.error("--chunks: comma-separated chunk budgets in MiB, each > 0, e.g. 2,4,6,8")
    if args.profile:
        print_profile(args)
    elif args.chunks:
        compare_chunk_budgets(args)
    else:
        compare_with_reference(args)


if __name__ == "__main__":
    main()
