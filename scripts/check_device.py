"""Checks ConvNN-Attention on an accelerator against the CPU, where the test suite holds it to the reference.

For every combination of sampling, similarity, softmax, convolution type and coordinate encoding:

- float64 (float32 on MPS, which lacks float64): the layer's output and input gradient on ``--device`` must
  equal the CPU's to 1e-9 (1e-4);
- float32: the same, to 1e-4 of the output's and the gradient's largest magnitude;
- under autocast, in each of the device's autocast dtypes (bfloat16 and float16; float16 on MPS): a
  forward+backward must run in the autocast dtype and stay finite, and the aggregation (the GPU path's
  kernels on CUDA), given the inputs the layer passed it, must give the output and gradients that the CPU
  computes from the same inputs in float64, to within the rounding of the autocast dtype (a relative error,
  the norm of the difference over the norm of the CPU's result). The whole layer is not compared under
  autocast: its neighbour selection, made in low precision, may pick other neighbours on another device.

Prints one line per failure and a table of the largest error of each check; exits non-zero when anything failed,
or when the Triton kernels could not compile or launch (ConvNN-Attention then runs the CPU's passes on the GPU,
with a ``TritonFallbackWarning``, and the checks no longer cover the kernels).

    python scripts/check_device.py --device cuda
"""

import itertools
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.neighbour_conv as neighbour_conv_module  # noqa: E402
import models.vit_layers as vit_layers_module  # noqa: E402
from models.neighbour_conv import neighbour_conv  # noqa: E402
from models.vit_layers import MultiHeadConvNNAttention  # noqa: E402
from utils import device_problem  # noqa: E402
from settings import CommandLineParser  # noqa: E402

GRID = (6, 6)
SEQ_LEN = GRID[0] * GRID[1] + 1
WIDTH = 24
BATCH = 3

AUTOCAST_DTYPES = {"cuda": (torch.bfloat16, torch.float16), "cpu": (torch.bfloat16, torch.float16),
                   "mps": (torch.float16,)}
# Relative error allowed in the aggregation under autocast: its table and result are rounded to the autocast
# dtype (relative steps of 2^-8 and 2^-11), its sums taken in float32. A wrong kernel is off by order 1.
AUTOCAST_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def combinations():
    for sampling, magnitude, softmax, convolution, coordinates in itertools.product(
        ("all", "random", "spatial"), ("matmul", "cosine", "euclidean"), (True, False),
        ("standard", "depthwise", "depthwise-separable"), (False, True),
    ):
        yield dict(sampling_type=sampling, magnitude_type=magnitude, softmax_topk_val=softmax,
                   convolution_type=convolution, coordinate_encoding=coordinates,
                   num_samples={"all": -1, "random": 12, "spatial": 3}[sampling])


class Check(NamedTuple):
    name: str
    tolerance: float
    errors: List[float]
    failures: List[str]


def output_and_grad(layer, x):
    x = x.clone().requires_grad_()
    out = layer(x)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    return out.detach(), grad


def largest_error(actual, expected) -> float:
    """Largest difference between the device's and the CPU's tensors, over the largest magnitude of the CPU's
    (at least 1)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def relative_error(actual, expected) -> float:
    """Norm of the difference between the device's and the CPU's tensors over the norm of the CPU's."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_layer(options, dtype):
    torch.manual_seed(0)
    layer = MultiHeadConvNNAttention(d_hidden=WIDTH, K=5, attention_dropout=0.0, num_tokens=SEQ_LEN, grid_size=GRID,
                                     **options).to(dtype).eval()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return layer


def device_error(options, dtype, device) -> float:
    """Largest error of the layer's output and input gradient on ``device`` against the CPU's, in ``dtype``."""
    layer = make_layer(options, dtype)
    x = torch.randn(BATCH, SEQ_LEN, WIDTH, dtype=dtype)
    cpu_out, cpu_grad = output_and_grad(layer, x)
    layer.to(device)
    device_out, device_grad = output_and_grad(layer, x.to(device))
    return max(largest_error(device_out, cpu_out), largest_error(device_grad, cpu_grad))


def aggregation_error(inputs, device) -> float:
    """Relative error of ``neighbour_conv``'s output and gradients on ``device``, given ``inputs`` as the layer
    passed them (in the autocast dtype, autocast off), against the CPU's from the same inputs in float64."""
    torch.manual_seed(1)
    grad_out = None
    results = []
    for on_cpu in (False, True):
        leaves = [None if tensor is None else tensor.detach().to("cpu" if on_cpu else device) for tensor in inputs]
        if on_cpu:
            leaves = [tensor.double() if tensor is not None and tensor.is_floating_point() else tensor
                      for tensor in leaves]
        differentiable = [tensor.requires_grad_() for tensor in leaves
                          if tensor is not None and tensor.is_floating_point()]
        out = neighbour_conv(*leaves)
        if grad_out is None:
            grad_out = torch.randn(out.shape)
        gradients = torch.autograd.grad(out, differentiable, grad_out.to(out.device, out.dtype))
        results.append([out, *gradients])
    return max(relative_error(actual, expected) for actual, expected in zip(*results, strict=True))


def autocast_run(options, device, amp_dtype):
    """Forward+backward of the float32 layer under autocast: its output, input gradient, and the inputs it passed
    to the aggregation."""
    layer = make_layer(options, torch.float32).to(device)
    x = torch.randn(BATCH, SEQ_LEN, WIDTH, device=device)
    passed = []

    def recording(*inputs):
        passed[:] = [None if tensor is None else tensor.detach() for tensor in inputs]
        return neighbour_conv(*inputs)

    with mock.patch.object(vit_layers_module, "neighbour_conv", recording), \
            torch.autocast(device.type, dtype=amp_dtype):
        out, grad = output_and_grad(layer, x)
    return out, grad, passed


def autocast_problem(out, grad, amp_dtype) -> Optional[str]:
    if out.dtype != amp_dtype:
        return f"gave {out.dtype}"
    if not (torch.isfinite(out).all() and torch.isfinite(grad).all()):
        return "gave non-finite values"
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def run_checks(device: torch.device) -> List[Check]:
    dtypes = [torch.float32] if device.type == "mps" else [torch.float64, torch.float32]
    checks = [Check(dtype_name(dtype), 1e-9 if dtype == torch.float64 else 1e-4, [], []) for dtype in dtypes]
    autocast_checks = [Check(f"autocast {dtype_name(amp_dtype)}", AUTOCAST_TOLERANCE[amp_dtype], [], [])
                       for amp_dtype in AUTOCAST_DTYPES[device.type]]
    for options in combinations():
        for check, dtype in zip(checks, dtypes):
            error = device_error(options, dtype, device)
            check.errors.append(error)
            if not error <= check.tolerance:
                check.failures.append(f"{check.name} {options}: differs from the CPU by {error:.3g}")
        for check, amp_dtype in zip(autocast_checks, AUTOCAST_DTYPES[device.type]):
            out, grad, passed = autocast_run(options, device, amp_dtype)
            problem = autocast_problem(out, grad, amp_dtype)
            error = aggregation_error(passed, device)
            check.errors.append(error)
            if problem:
                check.failures.append(f"{check.name} {options}: {problem}")
            elif not error <= check.tolerance:
                check.failures.append(f"{check.name} {options}: the aggregation differs from the CPU's by {error:.3g}")
    return checks + autocast_checks


def print_report(checks: List[Check], device: torch.device) -> int:
    """Prints the failures and a table of the checks; returns how many failed."""
    failures = [failure for check in checks for failure in check.failures]
    for failure in failures:
        print(failure)
    print(f"\n| check on {device} | combinations | failed | largest error | tolerance |")
    print("|---|---|---|---|---|")
    for check in checks:
        print(f"| {check.name} | {len(check.errors)} | {len(check.failures)} | {max(check.errors, default=0):.3g} "
              f"| {check.tolerance:g} |")
    print(f"\n{len(checks[0].errors)} combinations on {device}: {len(failures)} checks failed")
    return len(failures)


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "mps", "cpu"])
    return parser


def kernel_failure() -> Optional[str]:
    """Why the GPU path's Triton kernels could not run in this process, where they failed to compile or launch
    (the checks then compared the CPU's passes on the device instead)."""
    failure = neighbour_conv_module._triton_failure
    if failure is None:
        return None
    return f"the Triton kernels could not compile or launch ({failure}): the results above are the CPU passes'"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    unusable_device = device_problem(args.device)
    if unusable_device:
        parser.error(f"--device: {unusable_device}")
    device = torch.device(args.device)
    failed = print_report(run_checks(device), device)
    failure = kernel_failure()
    if failure:
        print(failure)
    elif device.type == "cuda":
        kernels = neighbour_conv_module.takes_gpu_path(torch.empty(0, device=device))
        print(f"aggregation on {device}: "
              f"{'the Triton kernels' if kernels else 'the CPU passes (no Triton, or deterministic algorithms)'}")
    sys.exit(1 if failed or failure else 0)


if __name__ == "__main__":
    main()
