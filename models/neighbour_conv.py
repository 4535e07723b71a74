"""The aggregation step of ConvNN-Attention as one memory-lean operator.

For every token ``i`` with neighbours ``n(i, k)`` and weights ``w_ik`` (``k < K``) it computes

    out_i = sum_k W[:, :, k] @ (w_ik * v_{n(i,k)})

which is a 1-D convolution with kernel ``K`` and stride ``K`` over the sequence of weighted
neighbour values. Written plainly, autograd would build the gathered ``(B, N, K, C)`` neighbour
values and keep them (and their weighted copy) until the backward pass. Here both passes walk the
``K`` slots one at a time, gathering one ``(B*N, C)`` slab per slot and folding it into the result,
so no ``N x K x C`` tensor ever exists, and the backward pass gathers again instead of saving:
only the inputs are kept. The slabs live in two buffers reused across slots: on the CPU a fresh
large allocation per slot is mapped and page-faulted anew each time, which costs more than the copy.

The two passes are wrapped twice:

- as ``torch.library`` custom operators (with a FLOP formula), which eager code and compiled CPU
  graphs call as they are. Traced, Inductor's CPU code turns the backward's ``index_add_`` into a
  scalar loop of atomic adds, which made the compiled model slower than the eager one;
- as an ``autograd.Function`` that ``torch.compile`` traces on GPUs, where Inductor fuses the slot
  loop into a few kernels (compiled, the ConvNN ViT ran at 1.6x to 2x its eager speed on an H100).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def _slot_rows(neighbours: Tensor) -> Tensor:
    """Row indices into ``values.reshape(B * N, C)``, one column per slot: ``(B*N, K)``."""
    batch, seq_len, slots = neighbours.shape
    offsets = torch.arange(batch, device=neighbours.device).mul_(seq_len).view(batch, 1, 1)
    return (neighbours + offsets).view(batch * seq_len, slots)


def _flat_operands(source: Tensor, neighbours: Tensor, weights: Tensor,
                   value_weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The values ``v`` as ``(B*N, C)``, their row for every token and slot ``(B*N, K)``, and the weights
    as ``(B*N, K)``; ``v = source @ value_weight.T`` when ``value_weight`` is given."""
    values = source if value_weight is None else source @ value_weight.t()
    return values.reshape(-1, values.shape[-1]), _slot_rows(neighbours), weights.reshape(-1, weights.shape[-1])


def _forward(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
             value_weight: Optional[Tensor]) -> Tensor:
    flat_values, rows, token_weights = _flat_operands(source, neighbours, weights, value_weight)
    batch, seq_len, slots = neighbours.shape
    depthwise = kernel.dim() == 2
    out = flat_values.new_zeros(batch * seq_len, kernel.shape[0])
    gathered = torch.empty_like(flat_values)
    for slot in range(slots):
        torch.index_select(flat_values, 0, rows[:, slot], out=gathered)
        if depthwise:
            out.addcmul_(gathered.mul_(kernel[:, slot]), token_weights[:, slot : slot + 1])
        else:
            out.addmm_(gathered.mul_(token_weights[:, slot : slot + 1]), kernel[:, :, slot].t())
    return out.view(batch, seq_len, -1)


_forward_operator = torch.library.custom_op("convnn::neighbour_conv", _forward, mutates_args=())


@_forward_operator.register_fake
def _forward_shape(source, neighbours, weights, kernel, value_weight):
    batch, seq_len, _ = neighbours.shape
    return source.new_empty(batch, seq_len, kernel.shape[0])


@register_flop_formula(torch.ops.convnn.neighbour_conv)
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


def _backward_kernel(grad_out: Tensor, source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                     value_weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to the values ``v`` (flattened to ``(B*N, C)``), the weights and the kernel."""
    flat_values, rows, token_weights = _flat_operands(source, neighbours, weights, value_weight)
    batch, seq_len, slots = neighbours.shape
    grad_out = grad_out.reshape(batch * seq_len, -1)
    depthwise = kernel.dim() == 2

    grad_values = torch.zeros_like(flat_values)
    grad_weights = torch.empty_like(token_weights)
    grad_kernel = torch.empty_like(kernel)
    gathered, grad_gathered = torch.empty_like(flat_values), torch.empty_like(flat_values)
    for slot in range(slots):
        slot_weights = token_weights[:, slot : slot + 1]
        torch.index_select(flat_values, 0, rows[:, slot], out=gathered)
        if depthwise:
            # gathered * grad_out is the common factor of the kernel and the weight gradients.
            gathered.mul_(grad_out)
            grad_kernel[:, slot] = token_weights[:, slot] @ gathered
            grad_weights[:, slot] = gathered @ kernel[:, slot]
            torch.mul(grad_out, kernel[:, slot], out=grad_gathered)
        else:
            torch.mm(grad_out, kernel[:, :, slot], out=grad_gathered)
            grad_weights[:, slot] = (gathered * grad_gathered).sum(-1)
            grad_kernel[:, :, slot] = grad_out.t() @ gathered.mul_(slot_weights)
        grad_values.index_add_(0, rows[:, slot], grad_gathered.mul_(slot_weights))
    return grad_values, grad_weights.view(batch, seq_len, slots), grad_kernel


_backward_operator = torch.library.custom_op("convnn::neighbour_conv_backward", _backward_kernel, mutates_args=())


@_backward_operator.register_fake
def _backward_shapes(grad_out, source, neighbours, weights, kernel, value_weight):
    batch, seq_len, _ = neighbours.shape
    channels_in = source.shape[-1] if value_weight is None else value_weight.shape[0]
    return source.new_empty(batch * seq_len, channels_in), torch.empty_like(weights), torch.empty_like(kernel)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _input_gradients(ctx, grad_out: Tensor, backward_kernel):
    source, neighbours, weights, kernel, value_weight = ctx.saved_tensors
    grad_values, grad_weights, grad_kernel = backward_kernel(grad_out, source, neighbours, weights, kernel,
                                                             value_weight)
    grad_source = grad_value_weight = None
    if value_weight is None:
        grad_source = grad_values.view_as(source)
    else:
        if ctx.needs_input_grad[0]:
            grad_source = (grad_values @ value_weight).view_as(source)
        if ctx.needs_input_grad[4]:
            grad_value_weight = grad_values.t() @ source.reshape(-1, source.shape[-1])
    return grad_source, None, grad_weights, grad_kernel, grad_value_weight


_forward_operator.register_autograd(lambda ctx, grad_out: _input_gradients(ctx, grad_out, _backward_operator),
                                    setup_context=_save_inputs)


class TracedNeighbourConv(torch.autograd.Function):
    """The same passes as an autograd function, for ``torch.compile`` to trace and fuse."""

    forward = staticmethod(_forward)
    setup_context = staticmethod(_save_inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _input_gradients(ctx, grad_out, _backward_kernel)


def neighbour_conv(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                   value_weight: Optional[Tensor] = None) -> Tensor:
    """``out = conv_K(w * v[neighbours])``, recomputing gathered neighbours instead of saving them.

      source        ``(B, N, C_in)``: the values ``v``, or with ``value_weight`` the input ``x`` of ``v = x W^T``
      neighbours    ``(B, N, K)`` integer positions into the ``N`` axis of the values
      weights       ``(B, N, K)``
      kernel        depthwise: ``(C_in, K)``; standard: ``(C_out, C_in, K)`` (a ``Conv1d`` weight)
      value_weight  ``None`` or ``(C_in, D)``: then ``v = source @ value_weight.T`` is computed here and
                    recomputed in backward, so that only ``source`` (which the query projection
                    keeps anyway) is saved instead of ``v``.
    Returns ``(B, N, C_out)``.
    """
    if torch.compiler.is_compiling() and source.device.type != "cpu":
        return TracedNeighbourConv.apply(source, neighbours, weights, kernel, value_weight)
    return _forward_operator(source, neighbours, weights, kernel, value_weight)
