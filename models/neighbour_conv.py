"""The aggregation step of ConvNN-Attention as one memory-lean operator.

For every token ``i`` with neighbours ``n(i, k)`` and weights ``w_ik`` (``k < K``) it computes

    out_i = sum_k W_k (w_ik * v_{n(i,k)})        (W_k = W[:, :, k]; depthwise: kern[:, k] * ...)

which is a 1-D convolution with kernel ``K`` and stride ``K`` over the sequence of weighted
neighbour values. Written plainly, autograd would build the gathered ``(B, N, K, C)`` neighbour
values and keep them until the backward pass; here only the inputs are kept, and ``v = x W_v^T``
is recomputed in backward.

On the CPU both passes are sums of weighted rows, which ``embedding_bag`` computes in one fused
pass (gather, scale and add, without writing the gathered rows out):

- forward: a *slot table* holds every value as each slot's kernel sees it, ``T[j*K + k] = W_k v_j``
  (depthwise, one broadcast multiply; standard, one ``(C_in, K*C_out)`` matrix product), and
  ``out_i = sum_k w_ik T[n(i,k)*K + k]`` is one ``embedding_bag`` over it;
- backward: the table of what each slot passes back, ``G[i*K + k] = W_k^T g_i``, gives the weights'
  gradient ``dw_ik = <G[i*K + k], v_{n(i,k)}>`` as ``embedding_bag``'s fused per-sample-weight
  gradient; weighted by ``w_ik``, its rows are added into the rows they chose (one ``index_add_``
  for all slots); the kernel's gradient sums ``g_i (w_ik v_{n(i,k)})^T`` over tokens.

The ``K``-times-larger tables are built a few sequences at a time (a token's neighbours lie in its
own sequence), and each chunk's results are written in place into the outputs. The tables, the values
``v`` and their gradient (whole-batch, so that the projections stay one matrix product each) live in a
per-thread scratch block kept from call to call (``scratch_buffers``): a chunk stays in the shared cache,
and the block stays mapped. Memory freed and allocated anew at every call is handed back to the system
and page-faulted in again: with two threads, freeing and faulting the 40 MiB of a whole batch's tables
made a training step several times slower, and a fresh 6 MiB table still cost 1,400 faults per layer step.

The two passes are ``torch.library`` custom operators (with a FLOP formula), which eager code and
compiled graphs call as they are: traced, Inductor's CPU code would turn a scatter into a scalar
loop of atomic adds.

On a GPU, where every operation launches a kernel, the aggregation is instead one Triton kernel
forward and one backward (``models/neighbour_conv_triton.py``), around the projections' matrix
products: the backward adds into the gradients of ``v`` and of the kernel atomically. Triton is
imported only there, and only used where installed and where deterministic algorithms are not
requested (atomic additions make float sums vary in their last bits from run to run); otherwise
GPUs take the CPU's passes, whose operations all have GPU kernels. Where Triton cannot compile or
launch the kernels (no usable Triton, no C compiler for its launcher, a GPU its compiler does not
support), the first failure is reported once as a ``TritonFallbackWarning`` and the process takes the
CPU's passes from then on, the failed call included. A graph compiled before the failure computes that
call's kernel sums with plain tensor operations instead, and is compiled anew with the CPU's passes at its
next call (the compiler guards on the recorded failure).
"""

import importlib
import importlib.util
import itertools
import subprocess
import sys
import threading
import warnings
from types import ModuleType
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Budget for one chunk's slot table. Each chunk costs a dozen operations whatever its size, and a chunk of one
# sequence at N=197 (1.4 MiB) made the layer's step 15 % slower than chunks of four; past about 8 MiB a chunk's
# table no longer stays in the shared cache between its passes (scripts/benchmark_convnn.py --chunks measures this).
CHUNK_BYTES = 6 << 20
# The most memory a thread's scratch block holds for one dtype between calls: a chunk's table and the whole batch's
# values and their gradient (15 MB at B=32, N=197, C=192), or the selection's (B, N, r) scores up to (32, 512, 512).
# Larger calls take fresh memory, as before there was a block.
SCRATCH_BYTES = 32 << 20


def sequences_per_chunk(seq_len: int, bytes_per_token: int, budget: int) -> int:
    """As many whole sequences as keep a chunk's per-slot rows within ``budget`` bytes, and at least one."""
    return max(1, budget // (seq_len * bytes_per_token))


def _chunks(batch: int, seq_len: int, per_chunk: int) -> List[Tuple[int, int]]:
    """Row ranges of ``per_chunk`` sequences each (the last may hold fewer)."""
    return [(first * seq_len, min(batch, first + per_chunk) * seq_len) for first in range(0, batch, per_chunk)]


def _chunk_rows(neighbours: Tensor, per_chunk: int) -> Tensor:
    """Each token's neighbour rows, counted from the first row of its chunk: ``(B*N, K)``, row-major (the chunks
    are row ranges of it, whatever the layout of ``neighbours``)."""
    batch, seq_len, slots = neighbours.shape
    offsets = torch.arange(batch, device=neighbours.device).remainder_(per_chunk).mul_(seq_len).view(batch, 1, 1)
    return (neighbours + offsets).reshape(batch * seq_len, slots).contiguous()


class _SlotKernel(NamedTuple):
    """The kernel laid out for slot tables: depthwise ``(K, C)`` both ways; standard ``(C_in, K*C_out)`` for
    values and ``(C_out, K*C_in)`` for output gradients."""

    depthwise: bool
    forward: Tensor
    backward: Tensor


def _slot_kernel(kernel: Tensor) -> _SlotKernel:
    if kernel.dim() == 2:
        per_slot = kernel.t().contiguous()
        return _SlotKernel(True, per_slot, per_slot)
    kernel_out, channels_in, slots = kernel.shape
    return _SlotKernel(False, kernel.permute(1, 2, 0).reshape(channels_in, slots * kernel_out),
                       kernel.transpose(1, 2).reshape(kernel_out, slots * channels_in))


def _slot_table(rows: Tensor, per_slot: Tensor, depthwise: bool, slots: int, buffer: Tensor) -> Tensor:
    """``(n*K, C')``: row ``j*K + k`` is slot ``k``'s kernel applied to ``rows[j]``, written into ``buffer``."""
    count = rows.shape[0]
    width = per_slot.shape[-1] if depthwise else per_slot.shape[1] // slots
    table = buffer[: count * slots * width]
    if depthwise:
        torch.mul(rows.unsqueeze(1), per_slot, out=table.view(count, slots, width))
    else:
        torch.mm(rows, per_slot, out=table.view(count, slots * width))
    return table.view(count * slots, width)


def _values(source: Tensor, value_weight: Optional[Tensor], buffer: Optional[Tensor] = None) -> Tensor:
    """``v = source W^T`` (``source`` itself without ``W``), written into ``buffer`` where one is given."""
    if value_weight is None:
        return source
    if buffer is None:
        return source @ value_weight.t()
    return torch.mm(source, value_weight.t(), out=buffer[: source.shape[0] * value_weight.shape[0]].view(
        source.shape[0], value_weight.shape[0]))


class _ScratchBlocks(threading.local):
    """One block of scratch memory per thread and dtype, kept from call to call (see ``scratch_buffers``)."""

    def __init__(self):
        self.by_dtype = {}


_scratch_blocks = _ScratchBlocks()


def scratch_buffers(like: Tensor, sizes: Tuple[int, ...]) -> Tuple[Tensor, ...]:
    """Flat buffers of ``sizes`` elements of ``like``'s dtype, side by side, for what lives only inside one call of
    a CPU operator and never leaves it: the chunks' tables, values and value gradients, the selection's scores.

    On the CPU they are views of this thread's block, which outlives the call: reused, it is already mapped and
    mostly still in cache, where a fresh 6 MiB table was page-faulted in at every call and cost three times its
    later writes. Per thread, because eager calls from several threads (and the autograd engine's) may run at
    once. On other devices, whose allocators cache freed memory themselves, and for requests over
    ``SCRATCH_BYTES`` (the scores of a large batch), a fresh tensor."""
    total = sum(sizes)
    if like.device.type != "cpu" or total * like.element_size() > SCRATCH_BYTES:
        block = like.new_empty(total)
    else:
        block = _scratch_blocks.by_dtype.get(like.dtype)
        if block is None or block.numel() < total:
            # A block made under inference_mode could not be written outside it by a later training step.
            with torch.inference_mode(False):
                block = _scratch_blocks.by_dtype[like.dtype] = torch.empty(total, dtype=like.dtype)
    starts = [0, *itertools.accumulate(sizes)]
    return tuple(block[start:stop] for start, stop in zip(starts, starts[1:]))


def weighted_bag_sums(table: Tensor, rows: Tensor, bag_starts: Tensor, row_weights: Tensor,
                      out: Optional[Tensor] = None) -> Tensor:
    """``out[b] = sum of row_weights[p] * table[rows[p]]`` over the positions ``p`` of bag ``b``: one
    ``embedding_bag`` pass (gather, weight and add, without writing the gathered rows out). Given ``out`` (a slice
    of a tensor allocated once per call) it writes there: a fresh chunk-sized result at every chunk would be
    handed back to the system and page-faulted anew."""
    row_weights = row_weights.to(table.dtype)
    if out is None:
        return torch.ops.aten._embedding_bag_forward_only(table, rows, bag_starts, False, 0, False, row_weights)[0]
    bookkeeping = [rows.new_empty(0) for _ in range(3)]
    torch.ops.aten._embedding_bag_forward_only.out(table, rows, bag_starts, False, 0, False, row_weights,
                                                   out0=out, out1=bookkeeping[0], out2=bookkeeping[1],
                                                   out3=bookkeeping[2])
    return out


def _check_neighbours(neighbours: Tensor) -> None:
    """Refuses positions outside their sequence: the CPU passes index the batch's rows flat, where position ``N``
    of one sequence is token 0 of the next. Checked on the CPU only, where reading two numbers back costs no
    synchronisation with a device."""
    if neighbours.device.type != "cpu" or neighbours.numel() == 0:
        return
    seq_len = neighbours.shape[1]
    lowest, highest = (int(bound) for bound in torch.aminmax(neighbours))
    if lowest < 0 or highest >= seq_len:
        raise IndexError(f"neighbour_conv: neighbours must be positions 0..{seq_len - 1} within their sequence, "
                         f"got {lowest}..{highest}")


def _forward(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
             value_weight: Optional[Tensor]) -> Tensor:
    _check_neighbours(neighbours)
    batch, seq_len, slots = neighbours.shape
    kernel_out = kernel.shape[0]
    channels = source.shape[-1] if value_weight is None else value_weight.shape[0]
    per_chunk = sequences_per_chunk(seq_len, slots * kernel_out * source.element_size(), CHUNK_BYTES)
    table_rows = _chunk_rows(neighbours, per_chunk) * slots + torch.arange(slots, device=neighbours.device)
    flat_source = source.reshape(batch * seq_len, source.shape[-1])
    token_weights = weights.reshape(batch * seq_len, slots)
    slot_kernel = _slot_kernel(kernel)

    chunk_tokens = min(batch, per_chunk) * seq_len
    projected = 0 if value_weight is None else batch * seq_len * channels
    table_buffer, values_buffer = scratch_buffers(source, (chunk_tokens * slots * kernel_out, projected))
    all_values = _values(flat_source, value_weight, values_buffer)
    bag_starts = torch.arange(0, chunk_tokens * slots, slots, device=source.device)
    out = source.new_empty(batch * seq_len, kernel_out)
    for start, stop in _chunks(batch, seq_len, per_chunk):
        table = _slot_table(all_values[start:stop], slot_kernel.forward, slot_kernel.depthwise, slots, table_buffer)
        weighted_bag_sums(table, table_rows[start:stop].reshape(-1), bag_starts[: stop - start],
                          token_weights[start:stop].reshape(-1), out[start:stop])
    return out.view(batch, seq_len, kernel_out)


# Named apart from the earlier per-slot operators (``convnn::neighbour_conv`` and its backward, whose outputs
# differed): Inductor's on-disk caches of compiled graphs do not see a changed implementation behind an
# unchanged name.
_forward_operator = torch.library.custom_op("convnn::neighbour_bags", _forward, mutates_args=())


@_forward_operator.register_fake
def _forward_shape(source, neighbours, weights, kernel, value_weight):
    batch, seq_len, _ = neighbours.shape
    return source.new_empty(batch, seq_len, kernel.shape[0])


@register_flop_formula(torch.ops.convnn.neighbour_bags)
def _forward_flops(source_shape, neighbours_shape, weights_shape, kernel_shape, value_weight_shape,
                   *args, **kwargs) -> int:
    """The FLOPs of the convolution this computes (as counted for ``conv1d``) and of ``v = x W^T``."""
    batch, seq_len, slots = neighbours_shape
    channels_in = source_shape[-1] if value_weight_shape is None else value_weight_shape[0]
    per_output = slots if len(kernel_shape) == 2 else slots * channels_in
    flops = 2 * batch * seq_len * kernel_shape[0] * per_output
    if value_weight_shape is not None:
        flops += 2 * batch * seq_len * value_weight_shape[0] * value_weight_shape[1]
    return flops


def _projected_source_gradient(grad_values: Tensor, value_weight: Tensor, source: Tensor) -> Tensor:
    """``dv W`` in the source's shape, as a tensor of its own rather than a view of a flat product: the layer's
    input also reaches the selection, and autograd adds that path's gradient into this one in place only if it
    is not a view (otherwise it allocates a fresh ``(B, N, D)`` sum at every step)."""
    grad_source = source.new_empty(source.shape)
    torch.mm(grad_values.reshape(-1, grad_values.shape[-1]), value_weight,
             out=grad_source.view(-1, value_weight.shape[1]))
    return grad_source


def _backward_kernel(grad_out: Tensor, source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                     value_weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients with respect to the source, the weights, the kernel and the value projection (an empty
    tensor when there is none)."""
    batch, seq_len, slots = neighbours.shape
    channels = source.shape[-1] if value_weight is None else value_weight.shape[0]
    per_chunk = sequences_per_chunk(seq_len, slots * channels * source.element_size(), CHUNK_BYTES)
    chunk_rows = _chunk_rows(neighbours, per_chunk)
    flat_source = source.reshape(batch * seq_len, source.shape[-1])
    token_weights = weights.reshape(batch * seq_len, slots)
    grad_out = grad_out.reshape(batch * seq_len, grad_out.shape[-1])
    slot_kernel = _slot_kernel(kernel)
    chunk_tokens = min(batch, per_chunk) * seq_len
    one_per_bag = torch.arange(chunk_tokens * slots, device=source.device)

    grad_weights = source.new_empty(batch * seq_len, slots)  # contiguous, whatever the layout of weights
    # Depthwise: sum_i g_i * (w_ik v_{n(i,k)}) as (K*C,); standard: sum_i g_i (w_ik v_{n(i,k)})^T as (C_out, K*C_in).
    grad_kernel = source.new_zeros(slots * channels) if slot_kernel.depthwise else source.new_zeros(
        kernel.shape[0], slots * channels)
    # One table serves both of a chunk's passes: the slot gradients are used up before the neighbours are gathered.
    projected = 0 if value_weight is None else batch * seq_len * channels
    chunk_buffer, values_buffer, grad_values_buffer = scratch_buffers(
        source, (chunk_tokens * slots * channels, projected, projected))
    all_values = _values(flat_source, value_weight, values_buffer)
    if value_weight is None:
        grad_source = source.new_zeros(source.shape)
        grad_values = grad_source.view(batch * seq_len, channels)
    else:
        grad_values = grad_values_buffer.view(batch * seq_len, channels).zero_()
    for start, stop in _chunks(batch, seq_len, per_chunk):
        count = stop - start
        chunk_grad, chunk_weights = grad_out[start:stop], token_weights[start:stop]
        values = all_values[start:stop]
        rows = chunk_rows[start:stop].reshape(-1)
        bags = one_per_bag[: rows.numel()]

        # What each slot passes back to the neighbour it chose; its dot product with that neighbour's value is
        # the weight's gradient, and weighted, its sum over the slots that chose a row is the row's gradient.
        slot_grads = _slot_table(chunk_grad, slot_kernel.backward, slot_kernel.depthwise, slots, chunk_buffer)
        torch.ops.aten._embedding_bag_per_sample_weights_backward.out(
            slot_grads, values, rows, bags, bags, 0, out=grad_weights[start:stop].view(-1))
        slot_grads.view(count, slots, -1).mul_(chunk_weights.unsqueeze(-1))
        grad_values[start:stop].index_add_(0, rows, slot_grads)

        weighted = torch.index_select(values, 0, rows, out=chunk_buffer[: rows.numel() * channels].view(-1, channels))
        weighted = weighted.view(count, slots, channels).mul_(chunk_weights.unsqueeze(-1))
        if slot_kernel.depthwise:
            # A sum over the tokens, not a matrix-vector product with ones: the CPU's addmv runs on one thread.
            grad_kernel.add_(weighted.mul_(chunk_grad.unsqueeze(1)).view(count, -1).sum(0))
        else:
            grad_kernel.addmm_(chunk_grad.t(), weighted.view(count, -1))
    if slot_kernel.depthwise:
        grad_kernel = grad_kernel.view(slots, channels).t().contiguous()
    else:
        grad_kernel = grad_kernel.view(kernel.shape[0], slots, channels).transpose(1, 2).contiguous()
    grad_weights = grad_weights.view_as(weights)
    if value_weight is None:
        return grad_source, grad_weights, grad_kernel, source.new_zeros(0)
    return (_projected_source_gradient(grad_values, value_weight, source), grad_weights, grad_kernel,
            grad_values.t() @ flat_source)


_backward_operator = torch.library.custom_op("convnn::neighbour_bags_gradients", _backward_kernel, mutates_args=())


@_backward_operator.register_fake
def _backward_shapes(grad_out, source, neighbours, weights, kernel, value_weight):
    grad_value_weight = source.new_empty(0) if value_weight is None else torch.empty_like(value_weight)
    return torch.empty_like(source), torch.empty_like(weights), torch.empty_like(kernel), grad_value_weight


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _input_gradients(ctx, grad_out: Tensor):
    source, neighbours, weights, kernel, value_weight = ctx.saved_tensors
    grad_source, grad_weights, grad_kernel, grad_value_weight = _backward_operator(
        grad_out, source, neighbours, weights, kernel, value_weight)
    return grad_source, None, grad_weights, grad_kernel, None if value_weight is None else grad_value_weight


_forward_operator.register_autograd(_input_gradients, setup_context=_save_inputs)


class TritonFallbackWarning(RuntimeWarning):
    """Triton could not compile or launch the aggregation's kernels here; the CPU's passes run instead."""


# Why Triton could not compile or launch the kernels in this process, once a launch has failed; from then on the
# aggregation takes the CPU's passes, without trying the kernels again.
_triton_failure: Optional[str] = None


def _kernels_apply_to(source: Tensor) -> bool:
    """Whether the Triton kernels are meant for ``source``: on a CUDA device, with Triton installed, and without
    deterministic algorithms requested (the tests force it, to run the kernels interpreted)."""
    return source.is_cuda and _TRITON_INSTALLED and not torch.are_deterministic_algorithms_enabled()


def _uses_triton(source: Tensor) -> bool:
    """Whether the aggregation takes the GPU path: the kernels are meant for ``source`` and have not failed to
    compile or launch in this process."""
    return _triton_failure is None and _kernels_apply_to(source)


def takes_gpu_path(source: Tensor) -> bool:
    """Whether ConvNN-Attention on ``source`` runs the GPU path (the Triton kernels)."""
    return _uses_triton(source)


def _raised_inside_triton(error: BaseException) -> bool:
    """Whether ``error`` passed through Triton's own code, whose launcher and compiler drivers raise plain
    ``RuntimeError``s and ``OSError``s that would otherwise look like anyone's."""
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__name__", "").partition(".")[0] == "triton":
            return True
        traceback = traceback.tb_next
    return False


def _cannot_compile_or_launch(error: Exception) -> bool:
    """Whether ``error``, raised while importing or launching the kernels, says that Triton cannot compile or
    launch them here (a Triton that does not import, a kernel its compiler rejects, no C compiler for its
    launcher, a driver or GPU it does not support) rather than something the CPU's passes would only hide: a
    memory shortage, a bad argument, a kernel failing in Triton's interpreter."""
    if isinstance(error, ImportError):
        return True
    if isinstance(error, torch.OutOfMemoryError):
        return False
    interpreter_errors = sys.modules.get("triton.runtime.errors")
    if interpreter_errors is not None and isinstance(error, interpreter_errors.InterpreterError):
        return False
    triton_errors = sys.modules.get("triton.errors")
    if triton_errors is not None and isinstance(error, triton_errors.TritonError):
        return True
    return isinstance(error, (RuntimeError, OSError, subprocess.SubprocessError)) and _raised_inside_triton(error)


def _failure_summary(error: Exception) -> str:
    """``error``'s type and the first line of its message (a compilation error's is the compiler's, not the
    source excerpt before it)."""
    message = getattr(error, "error_message", None) or str(error)
    first_line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first_line[:300]}" if first_line else type(error).__name__


def _launched(launch: Callable[[ModuleType], None]) -> bool:
    """Runs ``launch`` with the kernels' module; False, without running it, once Triton could not compile or
    launch a kernel in this process. The first such failure warns, once per process; other errors are raised."""
    global _triton_failure
    if _triton_failure is not None:
        return False
    try:
        launch(importlib.import_module("models.neighbour_conv_triton"))
        return True
    except Exception as error:
        if not _cannot_compile_or_launch(error):
            raise
        _triton_failure = _failure_summary(error)
    warnings.warn(f"ConvNN-Attention: Triton cannot compile or launch its kernels here ({_triton_failure}); "
                  "the aggregation takes the CPU's passes (same results, slower) from now on",
                  TritonFallbackWarning, stacklevel=2)
    return False


def _accumulation_dtype(table: Tensor) -> torch.dtype:
    return torch.float64 if table.dtype == torch.float64 else torch.float32


def _slot_rows(neighbours: Tensor, slot_stride: int) -> Tensor:
    """``(B, N, K)``: the row that token ``i``'s slot ``k`` reads in the table viewed as ``(-1, C)`` (rows of one
    segment per slot, with a slot stride, as rows of their own)."""
    batch, seq_len, slots = neighbours.shape
    rows = neighbours + torch.arange(batch, device=neighbours.device).view(batch, 1, 1) * seq_len
    return rows * slots + torch.arange(slots, device=neighbours.device) if slot_stride else rows


def _gathered_slots(table: Tensor, neighbours: Tensor, scale: Optional[Tensor], slot_stride: int,
                    channels: int) -> Tensor:
    """``(B, N, K, C)``: ``scale[:, k] * table[row(i,k), k]`` in the kernels' accumulation type."""
    gathered = table.reshape(-1, channels)[_slot_rows(neighbours, slot_stride)].to(_accumulation_dtype(table))
    return gathered if scale is None else gathered * scale.t().to(gathered.dtype)


@torch.library.custom_op("convnn::slot_gather", mutates_args=())
def _slot_gather(table: Tensor, neighbours: Tensor, weights: Tensor, scale: Optional[Tensor], slot_stride: int,
                 channels: int) -> Tensor:
    """``out_i = sum_k w_ik scale[:, k] * table[row(i,k), k]`` in one kernel (see ``neighbour_conv_triton``), or
    with tensor operations where the kernel cannot run (after the GPU path was traced into a compiled graph)."""
    out = table.new_empty(neighbours.shape[0], neighbours.shape[1], channels)
    neighbours, weights = neighbours.contiguous(), weights.contiguous()
    if not _launched(lambda kernels: kernels.forward(table, neighbours, weights, scale, slot_stride, out)):
        gathered = _gathered_slots(table, neighbours, scale, slot_stride, channels)
        out.copy_((weights.to(gathered.dtype).unsqueeze(-2) @ gathered).squeeze(-2))
    return out


@_slot_gather.register_fake
def _slot_gather_shape(table, neighbours, weights, scale, slot_stride, channels):
    return table.new_empty(neighbours.shape[0], neighbours.shape[1], channels)


@register_flop_formula(torch.ops.convnn.slot_gather)
def _slot_gather_flops(table_shape, neighbours_shape, weights_shape, scale_shape, slot_stride, channels,
                       *args, **kwargs) -> int:
    """A depthwise kernel's convolution, as counted for ``conv1d``; with a standard kernel, the matrix product
    that built the table has counted it already."""
    batch, seq_len, slots = neighbours_shape
    return 0 if scale_shape is None else 2 * batch * seq_len * channels * slots


@torch.library.custom_op("convnn::slot_gather_backward", mutates_args=("accumulators",))
def _slot_gather_backward(grad_out: Tensor, table: Tensor, neighbours: Tensor, weights: Tensor,
                          scale: Optional[Tensor], slot_stride: int, accumulators: Tensor) -> None:
    """Adds the gradients of the table, of the weights and of the scale, in that order, into ``accumulators``
    (zeroed by the caller): one kernel."""
    grad_table, grad_weights, grad_scale = _accumulated(accumulators, table, weights, scale)
    grad_out, neighbours, weights = grad_out.contiguous(), neighbours.contiguous(), weights.contiguous()
    if _launched(lambda kernels: kernels.backward(grad_out, table, neighbours, weights, scale, slot_stride,
                                                  grad_table, grad_scale, grad_weights)):
        return
    channels = grad_out.shape[-1]
    values = _gathered_slots(table, neighbours, None, slot_stride, channels)
    grad = grad_out.to(values.dtype).unsqueeze(-2)
    token_weights = weights.to(values.dtype)
    if scale is not None:
        grad_scale.copy_(torch.einsum("bnk,bnkc->ck", token_weights, grad * values))
        grad = grad * scale.t().to(values.dtype)
    grad_weights.copy_((grad * values).sum(-1))
    slot_grads = (token_weights.unsqueeze(-1) * grad).expand_as(values)
    grad_table.zero_().view(-1, channels).index_add_(0, _slot_rows(neighbours, slot_stride).reshape(-1),
                                                     slot_grads.reshape(-1, channels))


@_slot_gather_backward.register_fake
def _slot_gather_backward_shape(grad_out, table, neighbours, weights, scale, slot_stride, accumulators):
    return None


def _accumulated(accumulators: Tensor, table: Tensor, weights: Tensor,
                 scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The table's, the weights' and the scale's gradient in ``accumulators``."""
    grad_table, rest = accumulators[: table.numel()], accumulators[table.numel():]
    grad_weights, grad_scale = rest[: weights.numel()], rest[weights.numel():]
    return (grad_table.view(table.shape), grad_weights.view(weights.shape),
            None if scale is None else grad_scale.view(scale.shape))


def _gather_table(values: Tensor, kernel: Tensor) -> Tuple[Tensor, Optional[Tensor], int]:
    """What the kernels gather from: depthwise, ``v`` itself scaled by the kernel; standard, each row's value
    as every slot's kernel sees it, ``(B*N, K*C_out)`` (slot stride ``C_out``), unscaled."""
    flat_values = values.reshape(-1, values.shape[-1])
    if kernel.dim() == 2:
        return flat_values, kernel, 0
    return flat_values @ _slot_kernel(kernel).forward, None, kernel.shape[0]


class _TritonNeighbourConv(torch.autograd.Function):
    """The GPU path: the projections' matrix products and one kernel each way."""

    @staticmethod
    def forward(source, neighbours, weights, kernel, value_weight):
        table, scale, slot_stride = _gather_table(_values(source, value_weight), kernel)
        return torch.ops.convnn.slot_gather(table, neighbours, weights, scale, slot_stride, kernel.shape[0])

    setup_context = staticmethod(_save_inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        source, neighbours, weights, kernel, value_weight = ctx.saved_tensors
        values = _values(source, value_weight)
        table, scale, slot_stride = _gather_table(values, kernel)
        accumulate = torch.float64 if table.dtype == torch.float64 else torch.float32
        size = table.numel() + weights.numel() + (0 if scale is None else scale.numel())
        accumulators = torch.zeros(size, dtype=accumulate, device=table.device)
        torch.ops.convnn.slot_gather_backward(grad_out, table, neighbours, weights, scale, slot_stride, accumulators)
        if _triton_failure is not None:  # the kernel could not run: the CPU's passes' gradients, as later calls get
            return _input_gradients(ctx, grad_out)
        grad_table, grad_weights, grad_scale = _accumulated(accumulators, table, weights, scale)
        grad_table, grad_weights = grad_table.to(table.dtype), grad_weights.to(weights.dtype)
        if scale is None:
            grad_values = grad_table @ _slot_kernel(kernel).forward.t()
            flat_values = values.reshape(-1, values.shape[-1])
            grad_kernel = (flat_values.t() @ grad_table).view(kernel.shape[1], kernel.shape[2], kernel.shape[0])
            grad_kernel = grad_kernel.permute(2, 0, 1)
        else:
            grad_values = grad_table
            grad_kernel = grad_scale.to(kernel.dtype)
        if value_weight is None:
            return grad_values.view_as(source), None, grad_weights, grad_kernel, None
        grad_source = _projected_source_gradient(grad_values, value_weight, source) if ctx.needs_input_grad[0] else None
        grad_value_weight = None
        if ctx.needs_input_grad[4]:
            grad_value_weight = grad_values.t() @ source.reshape(-1, source.shape[-1])
        return grad_source, None, grad_weights, grad_kernel, grad_value_weight


def neighbour_conv(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                   value_weight: Optional[Tensor] = None) -> Tensor:
    """``out = conv_K(w * v[neighbours])``, recomputing gathered neighbours instead of saving them.

      source        ``(B, N, C_in)``: the values ``v``, or with ``value_weight`` the input ``x`` of ``v = x W^T``
      neighbours    ``(B, N, K)`` integer positions ``0..N-1`` into the ``N`` axis of the values (the CPU passes
                    refuse others with an ``IndexError``; the GPU path does not check them, which would make it
                    wait for the device)
      weights       ``(B, N, K)``
      kernel        depthwise: ``(C_in, K)``; standard: ``(C_out, C_in, K)`` (a ``Conv1d`` weight)
      value_weight  ``None`` or ``(C_in, D)``: then ``v = source @ value_weight.T`` is computed here and
                    recomputed in backward, so that only ``source`` (which the query projection
                    keeps anyway) is saved instead of ``v``.
    Returns ``(B, N, C_out)``.
    """
    if _uses_triton(source):
        out = _TritonNeighbourConv.apply(source, neighbours, weights, kernel, value_weight)
        if _triton_failure is None:
            return out
        # This call found that the kernel cannot run: the CPU's passes' result, as every later call gets.
    return _forward_operator(source, neighbours, weights, kernel, value_weight)
