"""The aggregation step of ConvNN-Attention as one memory-lean autograd function.

For every token ``i`` with neighbours ``n(i, k)`` and weights ``w_ik`` (``k < K``) it computes

    out_i = sum_k W[:, :, k] @ (w_ik * v_{n(i,k)})

which is a 1-D convolution with kernel ``K`` and stride ``K`` over the sequence of weighted
neighbour values. Written plainly, autograd would build the gathered ``(B, N, K, C)`` neighbour
values and keep them (and their weighted copy) until the backward pass. Here both passes walk the
``K`` slots one at a time, gathering one ``(B*N, C)`` slab per slot and folding it into the result,
so no ``N x K x C`` tensor ever exists, and the backward pass gathers again instead of saving:
only the inputs are kept. The slabs live in two buffers reused across slots: on the CPU a fresh
large allocation per slot is mapped and page-faulted anew each time, which costs more than the copy.
"""

from typing import Optional

import torch
from torch import Tensor


def _slot_rows(neighbours: Tensor) -> Tensor:
    """Row indices into ``values.reshape(B * N, C)``, one column per slot: ``(B*N, K)``."""
    batch, seq_len, slots = neighbours.shape
    offsets = torch.arange(batch, device=neighbours.device).mul_(seq_len).view(batch, 1, 1)
    return (neighbours + offsets).view(batch * seq_len, slots)


def _values(source: Tensor, value_weight: Optional[Tensor]) -> Tensor:
    return source if value_weight is None else source @ value_weight.t()


class NeighbourConv(torch.autograd.Function):
    """``out = conv_K(w * v[neighbours])``, recomputing gathered neighbours instead of saving them.

    Arguments of ``apply``:
      source        ``(B, N, C_in)``: the values ``v``, or with ``value_weight`` the input ``x`` of ``v = x W^T``
      neighbours    ``(B, N, K)`` integer positions into the ``N`` axis of the values
      weights       ``(B, N, K)``
      kernel        depthwise: ``(C_in, K)``; standard: ``(C_out, C_in, K)`` (a ``Conv1d`` weight)
      value_weight  ``None`` or ``(C_in, D)``: then ``v = source @ value_weight.T`` is computed here and
                    recomputed in backward, so that only ``source`` (which the query projection
                    keeps anyway) is saved instead of ``v``.
    Returns ``(B, N, C_out)``.
    """

    @staticmethod
    def forward(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                value_weight: Optional[Tensor]) -> Tensor:
        values = _values(source, value_weight)
        batch, seq_len, slots = neighbours.shape
        flat_values = values.reshape(-1, values.shape[-1])
        rows = _slot_rows(neighbours)
        token_weights = weights.reshape(batch * seq_len, slots)
        depthwise = kernel.dim() == 2
        out = values.new_zeros(batch * seq_len, kernel.shape[0])
        gathered = values.new_empty(batch * seq_len, values.shape[-1])
        for slot in range(slots):
            torch.index_select(flat_values, 0, rows[:, slot], out=gathered)
            if depthwise:
                out.addcmul_(gathered.mul_(kernel[:, slot]), token_weights[:, slot : slot + 1])
            else:
                # addmm with out= rather than addmm_: FLOP counters see this form.
                torch.addmm(out, gathered.mul_(token_weights[:, slot : slot + 1]), kernel[:, :, slot].t(), out=out)
        return out.view(batch, seq_len, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        source, neighbours, weights, kernel, value_weight = ctx.saved_tensors
        values = _values(source, value_weight)
        batch, seq_len, slots = neighbours.shape
        channels_in = values.shape[-1]
        flat_values = values.reshape(-1, channels_in)
        rows = _slot_rows(neighbours)
        token_weights = weights.reshape(batch * seq_len, slots)
        grad_out = grad_out.reshape(batch * seq_len, -1)
        depthwise = kernel.dim() == 2

        grad_values = torch.zeros_like(flat_values)
        grad_weights = values.new_empty(batch * seq_len, slots)
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

        grad_source = grad_value_weight = None
        if value_weight is None:
            grad_source = grad_values.view_as(values)
        else:
            if ctx.needs_input_grad[0]:
                grad_source = (grad_values @ value_weight).view_as(source)
            if ctx.needs_input_grad[4]:
                grad_value_weight = grad_values.t() @ source.reshape(-1, source.shape[-1])
        return grad_source, None, grad_weights.view(batch, seq_len, slots), grad_kernel, grad_value_weight


def neighbour_conv(source: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor,
                   value_weight: Optional[Tensor] = None) -> Tensor:
    """Functional form of :class:`NeighbourConv`; see there for shapes."""
    return NeighbourConv.apply(source, neighbours, weights, kernel, value_weight)
