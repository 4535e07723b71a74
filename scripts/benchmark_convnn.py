"""ConvNN-Attention: the fast layer against the plain reference of the test suite, side by side.

Measures forward+backward time (median over repeats after warm-up) and the bytes autograd saves
for the backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``), and prints a
markdown table of both and their ratios.

    python scripts/benchmark_convnn.py --batch 32 --tokens 197 --width 192 --K 9
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import interleaved_medians, saved_bytes  # noqa: E402
from models.vit_layers import MultiHeadConvNNAttention  # noqa: E402
from scripts.convnn_reference import reference_convnn  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--K", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
