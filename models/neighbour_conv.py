"""The aggregation step of ConvNN-Attention as one memory-lean autograd function.

For every token ``i`` with neighbours ``n(i, k)`` and weights ``w_ik`` (``k < K``) it computes

    out_i = sum_k W[:, :, k] @ (w_ik * v_{n(i,k)})

which is a 1-D convolution with kernel ``K`` and stride ``K`` over the sequence of weighted
neighbour values. Written plainly, autograd would keep the gathered ``(B, N, K, C)`` neighbour
values (and their weighted copy) alive until the backward pass. Here the forward pass gathers
them once into a transient buffer, and the backward pass gathers them again: only ``v``,
the indices, the weights and the kernel are saved.
"""

import torch
from torch import Tensor


def _flat_rows(neighbours: Tensor, seq_len: int) -> Tensor:
    """Row indices into ``values.reshape(B * N, C)`` for every neighbour slot, shape ``(B*N*K,)``."""
    batch = neighbours.shape[0]
    offsets = torch.arange(batch, device=neighbours.device).mul_(seq_len).view(batch, 1, 1)
    return (neighbours + offsets).reshape(-1)


def _gather(values: Tensor, rows: Tensor, shape) -> Tensor:
    batch, seq_len, slots = shape
    return values.reshape(-1, values.shape[-1]).index_select(0, rows).view(batch, seq_len, slots, -1)


class NeighbourConv(torch.autograd.Function):
    """``out = conv_K(w * v[neighbours])`` with recomputation instead of saved neighbour values.

    Arguments of ``apply``:
      values      ``(B, N, C_in)``
      neighbours  ``(B, N, K)`` integer positions into the ``N`` axis of ``values``
      weights     ``(B, N, K)``
      kernel      depthwise: ``(C_in, K)``; standard: ``(C_out, C_in, K)`` (a ``Conv1d`` weight)
    Returns ``(B, N, C_out)``.
    """

    @staticmethod
    def forward(values: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor) -> Tensor:
        batch, seq_len, slots = neighbours.shape
        rows = _flat_rows(neighbours, values.shape[1])
        gathered = _gather(values, rows, (batch, seq_len, slots))
        gathered.mul_(weights.unsqueeze(-1))
        if kernel.dim() == 2:
            return gathered.mul_(kernel.t()).sum(dim=2)
        flat_kernel = kernel.permute(2, 1, 0).reshape(-1, kernel.shape[0])
        return gathered.view(batch, seq_len, -1) @ flat_kernel

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, neighbours, weights, kernel = inputs
        ctx.save_for_backward(values, neighbours, weights, kernel)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, neighbours, weights, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, seq_len, slots = neighbours.shape
        channels_in = values.shape[-1]
        rows = _flat_rows(neighbours, values.shape[1])
        gathered = _gather(values, rows, (batch, seq_len, slots))

        if kernel.dim() == 2:
            # grad of each weighted neighbour value: grad_out * W[:, k], shape (B, N, K, C)
            grad_weighted = grad_out.unsqueeze(2) * kernel.t()
            grad_weights = (gathered.unsqueeze(-2) @ grad_weighted.unsqueeze(-1)).view(batch, seq_len, slots)
            grad_kernel = None
            if ctx.needs_input_grad[3]:
                gathered.mul_(weights.unsqueeze(-1)).mul_(grad_out.unsqueeze(2))
                grad_kernel = gathered.sum(dim=(0, 1)).t()
        else:
            flat_kernel = kernel.permute(2, 1, 0).reshape(-1, kernel.shape[0])
            grad_weighted = (grad_out @ flat_kernel.t()).view(batch, seq_len, slots, channels_in)
            grad_weights = (gathered.unsqueeze(-2) @ grad_weighted.unsqueeze(-1)).view(batch, seq_len, slots)
            grad_kernel = None
            if ctx.needs_input_grad[3]:
                gathered.mul_(weights.unsqueeze(-1))
                grad_flat = gathered.view(-1, slots * channels_in).t() @ grad_out.reshape(-1, grad_out.shape[-1])
                grad_kernel = grad_flat.view(slots, channels_in, -1).permute(2, 1, 0)
        del gathered

        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_weighted.mul_(weights.unsqueeze(-1))
            grad_values = torch.zeros_like(values).view(-1, channels_in)
            grad_values.index_add_(0, rows, grad_weighted.reshape(-1, channels_in))
            grad_values = grad_values.view_as(values)
        return grad_values, None, grad_weights, grad_kernel


def neighbour_conv(values: Tensor, neighbours: Tensor, weights: Tensor, kernel: Tensor) -> Tensor:
    """Functional form of :class:`NeighbourConv`; see there for shapes."""
    return NeighbourConv.apply(values, neighbours, weights, kernel)
