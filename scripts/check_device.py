"""Checks ConvNN-Attention on an accelerator against the CPU, where the test suite holds it to the reference.

For every combination of sampling, similarity, softmax, convolution type and coordinate encoding,
the layer's output and input gradient on ``--device`` must equal the CPU's (float64 where the device
has it, else float32), and a forward+backward under autocast must run in the autocast dtype and
stay finite. Prints one line per failure and a summary; exits non-zero when anything failed.

    python scripts/check_device.py --device cuda
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vit_layers import MultiHeadConvNNAttention  # noqa: E402
from settings import CommandLineParser  # noqa: E402
from train_eval import AMP_DTYPE  # noqa: E402
from utils import device_problem  # noqa: E402

GRID = (6, 6)
SEQ_LEN = GRID[0] * GRID[1] + 1


def combinations():
    for sampling, magnitude, softmax, convolution, coordinates in itertools.product(
        ("all", "random", "spatial"), ("matmul", "cosine", "euclidean"), (True, False),
        ("standard", "depthwise", "depthwise-separable"), (False, True),
    ):
        yield dict(sampling_type=sampling, magnitude_type=magnitude, softmax_topk_val=softmax,
                   convolution_type=convolution, coordinate_encoding=coordinates,
                   num_samples={"all": -1, "random": 12, "spatial": 3}[sampling])


def output_and_grad(layer, x):
    x = x.clone().requires_grad_()
    out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def main(argv=None):
    parser = CommandLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "mps", "cpu"])
    args = parser.parse_args(argv)
    unusable_device = device_problem(args.device)
    if unusable_device:
        parser.error(f"--device: {unusable_device}")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    amp_dtype = AMP_DTYPE[device.type]

    failures, checked = [], 0
    for options in combinations():
        torch.manual_seed(0)
        layer = MultiHeadConvNNAttention(d_hidden=24, K=5, attention_dropout=0.0, num_tokens=SEQ_LEN,
                                         grid_size=GRID, **options).to(dtype).eval()
        for parameter in layer.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
        x = torch.randn(3, SEQ_LEN, 24, dtype=dtype)
        cpu_out, cpu_grad = output_and_grad(layer, x)
        layer.to(device)
        device_out, device_grad = output_and_grad(layer, x.to(device))
        error = max((device_out.cpu() - cpu_out).abs().max().item(), (device_grad.cpu() - cpu_grad).abs().max().item())
        if error > tolerance:
            failures.append(f"{options}: differs from the CPU by {error:.3g}")

        layer.float()
        with torch.autocast(device.type, dtype=amp_dtype):
            mixed_out, mixed_grad = output_and_grad(layer, x.float().to(device))
        if mixed_out.dtype != amp_dtype or not (torch.isfinite(mixed_out).all() and torch.isfinite(mixed_grad).all()):
            failures.append(f"{options}: autocast gave {mixed_out.dtype} or non-finite values")
        checked += 1

    for failure in failures:
        print(failure)
    print(f"{checked} combinations on {device}: {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
