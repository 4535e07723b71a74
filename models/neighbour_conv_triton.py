"""Triton kernels of the aggregation for GPUs: the whole forward in one kernel, the whole backward in another.

Imported only when the GPU path runs, so that Triton is needed nowhere else. Both kernels read a
*table* of rows and, for every token ``i`` and slot ``k``, the row ``b*N + n(i,k)`` of its sequence
``b``; with ``slot_stride`` set, each row holds one ``C``-wide segment per slot and slot ``k`` reads
segment ``k``. An optional per-channel, per-slot ``scale`` (a depthwise kernel) multiplies what is read:

    forward:   out_i = sum_k w_ik * scale[:, k] * table[row(i,k), k]
    backward:  grad_table[row(i,k), k] += w_ik * scale[:, k] * g_i
               grad_w_ik += <g_i * scale[:, k], table[row(i,k), k]>         (over each block of channels)
               grad_scale[:, k] += sum_i w_ik * g_i * table[row(i,k), k]    (over each block of tokens)

Each program takes a block of tokens and a block of channels, and adds its share with atomic adds.
Sums are taken in float32 (float64 for float64 inputs), and the gradients are added into buffers of
that type, which the caller zeroes.
"""

import triton
import triton.language as tl
from torch import Tensor

BLOCK_TOKENS = 32
BLOCK_CHANNELS = 64


@triton.jit
def _table_offsets(neighbours_ptr, tokens, seq_len, slots, slot, row_stride, slot_stride, BLOCK_T: tl.constexpr):
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    in_range = token < tokens
    neighbour = tl.load(neighbours_ptr + token * slots + slot, mask=in_range, other=0)
    row = (token // seq_len) * seq_len + neighbour
    return token, in_range, row * row_stride + slot * slot_stride


@triton.jit
def _forward_kernel(table_ptr, neighbours_ptr, weights_ptr, scale_ptr, out_ptr,
                    tokens, seq_len, slots, channels, row_stride, slot_stride, scale_channel_stride, scale_slot_stride,
                    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in_range = channel < channels
    total = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACCUMULATE)
    for slot in range(0, slots):
        token, in_range, offset = _table_offsets(neighbours_ptr, tokens, seq_len, slots, slot, row_stride,
                                                 slot_stride, BLOCK_T)
        mask = in_range[:, None] & channel_in_range[None, :]
        weight = tl.load(weights_ptr + token * slots + slot, mask=in_range, other=0.0).to(ACCUMULATE)
        value = tl.load(table_ptr + offset[:, None] + channel[None, :], mask=mask, other=0.0).to(ACCUMULATE)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + channel * scale_channel_stride + slot * scale_slot_stride,
                            mask=channel_in_range, other=0.0).to(ACCUMULATE)
            value = value * scale[None, :]
        total += weight[:, None] * value
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask = (token < tokens)[:, None] & channel_in_range[None, :]
    tl.store(out_ptr + token[:, None] * channels + channel[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, table_ptr, neighbours_ptr, weights_ptr, scale_ptr,
                     grad_table_ptr, grad_weights_ptr, grad_scale_ptr,
                     tokens, seq_len, slots, channels, row_stride, slot_stride, scale_channel_stride,
                     scale_slot_stride, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in_range = channel < channels
    for slot in range(0, slots):
        token, in_range, offset = _table_offsets(neighbours_ptr, tokens, seq_len, slots, slot, row_stride,
                                                 slot_stride, BLOCK_T)
        mask = in_range[:, None] & channel_in_range[None, :]
        weight = tl.load(weights_ptr + token * slots + slot, mask=in_range, other=0.0).to(ACCUMULATE)
        grad = tl.load(grad_ptr + token[:, None] * channels + channel[None, :], mask=mask, other=0.0).to(ACCUMULATE)
        value = tl.load(table_ptr + offset[:, None] + channel[None, :], mask=mask, other=0.0).to(ACCUMULATE)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + channel * scale_channel_stride + slot * scale_slot_stride,
                            mask=channel_in_range, other=0.0).to(ACCUMULATE)
            tl.atomic_add(grad_scale_ptr + channel * slots + slot, tl.sum(weight[:, None] * grad * value, axis=0),
                          mask=channel_in_range)
            grad = grad * scale[None, :]
        tl.atomic_add(grad_weights_ptr + token * slots + slot, tl.sum(grad * value, axis=1), mask=in_range)
        tl.atomic_add(grad_table_ptr + offset[:, None] + channel[None, :], weight[:, None] * grad, mask=mask)


def _accumulate_type(table: Tensor):
    return tl.float64 if table.dtype.is_floating_point and table.element_size() == 8 else tl.float32


def _channel_block(channels: int) -> int:
    return min(BLOCK_CHANNELS, triton.next_power_of_2(channels))


def forward(table: Tensor, neighbours: Tensor, weights: Tensor, scale, slot_stride: int, out: Tensor) -> None:
    """Writes ``out`` (``(B, N, C)``, contiguous); see the module's docstring."""
    batch, seq_len, slots = neighbours.shape
    channels = out.shape[-1]
    block_c = _channel_block(channels)
    grid = (triton.cdiv(batch * seq_len, BLOCK_TOKENS), triton.cdiv(channels, block_c))
    scale_strides = (0, 0) if scale is None else scale.stride()
    _forward_kernel[grid](table, neighbours, weights, table if scale is None else scale, out,
                          batch * seq_len, seq_len, slots, channels, table.stride(0), slot_stride, *scale_strides,
                          HAS_SCALE=scale is not None, ACCUMULATE=_accumulate_type(table),
                          BLOCK_T=BLOCK_TOKENS, BLOCK_C=block_c)


def backward(grad_out: Tensor, table: Tensor, neighbours: Tensor, weights: Tensor, scale, slot_stride: int,
             grad_table: Tensor, grad_scale, grad_weights: Tensor) -> None:
    """Adds into ``grad_table`` (laid out as ``table``), ``grad_scale`` (``(C, K)``) and ``grad_weights``
    (``(B, N, K)``), all contiguous; see the module's docstring."""
    batch, seq_len, slots = neighbours.shape
    channels = grad_out.shape[-1]
    block_c = _channel_block(channels)
    grid = (triton.cdiv(batch * seq_len, BLOCK_TOKENS), triton.cdiv(channels, block_c))
    scale_strides = (0, 0) if scale is None else scale.stride()
    _backward_kernel[grid](grad_out, table, neighbours, weights, table if scale is None else scale,
                           grad_table, grad_weights, grad_table if grad_scale is None else grad_scale,
                           batch * seq_len, seq_len, slots, channels, table.stride(0), slot_stride, *scale_strides,
                           HAS_SCALE=scale is not None, ACCUMULATE=_accumulate_type(table),
                           BLOCK_T=BLOCK_TOKENS, BLOCK_C=block_c)
