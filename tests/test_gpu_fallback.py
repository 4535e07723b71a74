"""ConvNN-Attention where Triton cannot compile or launch its kernels: the CPU's passes take over, once per
process and with one warning, and every other error is still raised. The GPU path runs on CPU tensors here, its
kernel launches replaced by ones that fail as Triton's do."""

import ast
import sys
import types
import warnings

import pytest
import torch

import models.neighbour_conv as neighbour_conv_module
from models.neighbour_conv import TritonFallbackWarning, neighbour_conv
from models.vit_layers import MultiHeadConvNNAttention
from tests.helpers import read_metrics
import vit_main

triton = pytest.importorskip("triton")
triton_kernels = pytest.importorskip("models.neighbour_conv_triton")

GRID = (4, 4)
SEQ_LEN = GRID[0] * GRID[1] + 1
WIDTH = 6


@pytest.fixture
def forced_gpu_path(monkeypatch):
    """The aggregation takes the GPU path on CPU tensors, with no failure on record (restored afterwards, so that
    no other test runs the CPU's passes where it means to run the kernels)."""
    monkeypatch.setattr(neighbour_conv_module, "_kernels_apply_to", lambda source: True)
    monkeypatch.setattr(neighbour_conv_module, "_triton_failure", None)


def raise_compilation_error():
    from triton.compiler.errors import CompilationError

    raise CompilationError("def _forward_kernel(): ...", ast.parse("tl.dot(a, b)").body[0],
                           "unsupported MMA instruction for this architecture")


def raise_ptxas_error():
    from triton.runtime.errors import PTXASError

    raise PTXASError("ptxas fatal: Value 'sm_200' is not defined for option 'gpu-name'")


def raise_from_triton_launcher():
    # Raised in a frame of Triton's own launcher module, as the compiled launcher's errors are.
    exec(compile("raise RuntimeError('Triton Error [CUDA]: device kernel image is invalid')", "driver.py", "exec"),
         {"__name__": "triton.backends.nvidia.driver"})


def find_no_c_compiler():
    from triton.runtime.build import _find_compiler

    _find_compiler("c")


FAILURES = {
    "compilation-error": raise_compilation_error,
    "ptxas-error": raise_ptxas_error,
    "launcher-error": raise_from_triton_launcher,
    "no-c-compiler": find_no_c_compiler,
}


@pytest.fixture
def no_c_compiler(monkeypatch, tmp_path):
    """Triton's search for a C compiler (to build its launcher) finds none."""
    from triton.runtime.build import _find_compiler

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    _find_compiler.cache_clear()
    yield
    _find_compiler.cache_clear()


def failing_launches(monkeypatch, failure, which=("forward", "backward")):
    """Makes the kernels' launches in ``which`` fail with ``failure()``; returns the list of attempted launches."""
    attempts = []

    def launch(name):
        def attempt(*args):
            attempts.append(name)
            failure()

        return attempt

    for name in which:
        monkeypatch.setattr(triton_kernels, name, launch(name))
    return attempts


def make_layer(convolution_type):
    torch.manual_seed(0)
    layer = MultiHeadConvNNAttention(d_hidden=WIDTH, num_heads=3, attention_dropout=0.0, K=4, num_tokens=SEQ_LEN,
                                     grid_size=GRID, convolution_type=convolution_type).double()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return layer


def output_and_gradients(layer, x):
    x = x.clone().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out), materialize_grads=True)
    return [out.detach(), *grads]


def operator_path_results(monkeypatch, layer, x):
    with monkeypatch.context() as patch:
        patch.setattr(neighbour_conv_module, "_kernels_apply_to", lambda source: False)
        return output_and_gradients(layer, x)


def fallback_warnings(caught):
    return [str(warning.message) for warning in caught if issubclass(warning.category, TritonFallbackWarning)]


@pytest.mark.parametrize("convolution_type", ["depthwise", "standard"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_kernels_that_cannot_compile_or_launch_give_the_cpu_passes_results_with_one_warning(
        failure, convolution_type, forced_gpu_path, monkeypatch, request):
    if failure == "no-c-compiler":
        request.getfixturevalue("no_c_compiler")
    layer = make_layer(convolution_type)
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    expected = operator_path_results(monkeypatch, layer, x)
    attempts = failing_launches(monkeypatch, FAILURES[failure])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [output_and_gradients(layer, x) for _ in range(3)]

    assert attempts == ["forward"]  # later calls, the first one's backward among them, do not try again
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert neighbour_conv_module._triton_failure in messages[0]
    assert not neighbour_conv_module.takes_gpu_path(x)
    first, *later = steps
    for actual, wanted in zip(first, expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-12)
    for step in later:  # the CPU's passes themselves
        for actual, wanted in zip(step, expected, strict=True):
            assert torch.equal(actual, wanted)


@pytest.mark.parametrize("failing", [("forward", "backward"), ("backward",)], ids=["forward", "backward-only"])
@pytest.mark.parametrize("kernel_shape", [(4, 3), (5, 4, 3)], ids=["depthwise", "standard"])
def test_the_call_that_finds_the_kernels_cannot_run_gives_exactly_the_cpu_passes_results(kernel_shape, failing,
                                                                                       forced_gpu_path, monkeypatch):
    if failing == ("backward",) and not triton.knobs.runtime.interpret:
        pytest.skip("the forward kernel runs on CPU tensors only in Triton's interpreter")
    torch.manual_seed(0)
    source, weights = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    neighbours = torch.randint(0, 6, (2, 6, 3))
    kernel, value_weight = torch.randn(kernel_shape, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    differentiable = [tensor.requires_grad_() for tensor in (source, weights, kernel, value_weight)]

    def results():
        out = neighbour_conv(source, neighbours, weights, kernel, value_weight)
        return [out, *torch.autograd.grad(out.square().sum(), differentiable)]

    with monkeypatch.context() as patch:
        patch.setattr(neighbour_conv_module, "_kernels_apply_to", lambda source: False)
        expected = results()
    failing_launches(monkeypatch, raise_compilation_error, which=failing)
    with pytest.warns(TritonFallbackWarning):
        actual = results()
    for value, wanted in zip(actual, expected, strict=True):
        assert torch.equal(value, wanted)


def test_the_warning_names_the_compilers_message_not_the_source_excerpt(forced_gpu_path, monkeypatch):
    failing_launches(monkeypatch, raise_compilation_error)
    with pytest.warns(TritonFallbackWarning,
                      match=r"\(CompilationError: unsupported MMA instruction for this architecture\)"):
        output_and_gradients(make_layer("depthwise"), torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64))


def test_a_triton_that_does_not_import_gives_the_cpu_passes(forced_gpu_path, monkeypatch):
    layer = make_layer("depthwise")
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    expected = operator_path_results(monkeypatch, layer, x)
    monkeypatch.setitem(sys.modules, "models.neighbour_conv_triton", None)
    with pytest.warns(TritonFallbackWarning, match="ModuleNotFoundError"):
        actual = output_and_gradients(layer, x)
    for value, wanted in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, wanted, rtol=0, atol=1e-12)


def test_a_backward_kernel_that_cannot_compile_gives_the_cpu_passes_gradients(forced_gpu_path, monkeypatch):
    if not triton.knobs.runtime.interpret:
        pytest.skip("the forward kernel runs on CPU tensors only in Triton's interpreter")
    layer = make_layer("standard")
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    expected = operator_path_results(monkeypatch, layer, x)
    attempts = failing_launches(monkeypatch, raise_compilation_error, which=("backward",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = output_and_gradients(layer, x)
    assert attempts == ["backward"] and len(fallback_warnings(caught)) == 1
    for value, wanted in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, wanted, rtol=0, atol=1e-12)


def raise_interpreter_error():
    from triton.runtime.errors import InterpreterError

    raise InterpreterError("IndexError('index 40 is out of bounds')")


def raise_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def raise_bad_shape():
    raise ValueError("not enough values to unpack (expected 3, got 2)")


def raise_outside_triton():
    raise RuntimeError("The size of tensor a (5) must match the size of tensor b (4) at non-singleton dimension 1")


@pytest.mark.parametrize("error,raised_type", [
    (raise_out_of_memory, "OutOfMemoryError"), (raise_bad_shape, "ValueError"),
    (raise_outside_triton, "RuntimeError"), (raise_interpreter_error, "InterpreterError"),
], ids=["out-of-memory", "bad-shape", "runtime-error-outside-triton", "kernel-failing-in-the-interpreter"])
def test_errors_that_are_not_about_compiling_or_launching_are_raised(error, raised_type, forced_gpu_path,
                                                                     monkeypatch):
    failing_launches(monkeypatch, error)
    layer = make_layer("depthwise")
    x = torch.randn(2, SEQ_LEN, WIDTH, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception) as raised:
            layer(x)
    assert type(raised.value).__name__ == raised_type
    assert not fallback_warnings(caught)
    assert neighbour_conv_module._triton_failure is None
    assert neighbour_conv_module.takes_gpu_path(x)


def test_gpus_take_the_cpu_passes_once_the_kernels_failed(monkeypatch):
    on_gpu = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(neighbour_conv_module, "_triton_failure", None)
    assert neighbour_conv_module.takes_gpu_path(on_gpu)
    monkeypatch.setattr(neighbour_conv_module, "_triton_failure", "PTXASError: ptxas fatal")
    assert not neighbour_conv_module.takes_gpu_path(on_gpu)


@pytest.mark.slow
def test_a_training_run_goes_on_after_the_kernels_fail_with_the_cpu_passes_metrics(tiny_argv, tmp_path,
                                                                                 forced_gpu_path, monkeypatch):
    flags = ["--layer", "ConvNNAttention", "--num_epochs", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(neighbour_conv_module, "_kernels_apply_to", lambda source: False)
        vit_main.main(tiny_argv(tmp_path / "cpu-passes", *flags))
    attempts = failing_launches(monkeypatch, raise_ptxas_error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit_main.main(tiny_argv(tmp_path / "fallback", *flags))
    assert attempts == ["forward"] and len(fallback_warnings(caught)) == 1
    expected, actual = read_metrics(tmp_path / "cpu-passes"), read_metrics(tmp_path / "fallback")
    assert len(actual) == len(expected) == 2
    for wanted, row in zip(expected, actual):
        for column in ("train_loss", "train_top1", "test_loss", "test_top1"):
            assert float(row[column]) == pytest.approx(float(wanted[column]), rel=1e-4, abs=1e-6), column


@pytest.mark.slow
def test_a_graph_compiled_before_the_kernels_fail_gives_the_cpu_passes_results(forced_gpu_path, monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    source = torch.randn(2, 6, 4, requires_grad=True)
    neighbours = torch.randint(0, 6, (2, 6, 3))
    weights = torch.randn(2, 6, 3, requires_grad=True)
    kernel = torch.randn(5, 4, 3, requires_grad=True)
    value_weight = torch.randn(4, 4, requires_grad=True)
    differentiable = [source, weights, kernel, value_weight]

    def results(function):
        out = function(source, neighbours, weights, kernel, value_weight)
        return [out, *torch.autograd.grad(out.square().sum(), differentiable)]

    with monkeypatch.context() as patch:
        patch.setattr(neighbour_conv_module, "_kernels_apply_to", lambda source: False)
        expected = results(neighbour_conv)
    attempts = failing_launches(monkeypatch, raise_compilation_error)
    compiled = torch.compile(neighbour_conv, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [results(compiled) for _ in range(2)]
    torch._dynamo.reset()
    assert attempts == ["forward"] and len(fallback_warnings(caught)) == 1
    for step in steps:
        for actual, wanted in zip(step, expected, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_graph_compiled_before_the_kernels_fail_is_compiled_anew_with_the_cpu_passes(forced_gpu_path, monkeypatch):
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        return graph_module.forward

    torch._dynamo.reset()
    failing_launches(monkeypatch, raise_compilation_error)
    compiled = torch.compile(neighbour_conv, backend=capture, fullgraph=True)
    inputs = (torch.randn(2, 6, 4), torch.randint(0, 6, (2, 6, 3)), torch.randn(2, 6, 3), torch.randn(4, 3),
              torch.randn(4, 4))
    with pytest.warns(TritonFallbackWarning):
        for _ in range(3):
            compiled(*inputs)
    torch._dynamo.reset()
    assert [sorted(name for name in graph if name.startswith("convnn.")) for graph in graphs] == [
        ["convnn.slot_gather"], ["convnn.neighbour_bags.default"]]
