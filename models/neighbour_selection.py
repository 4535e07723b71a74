"""The selection step of ConvNN-Attention's ``matmul`` similarity with a backward pass as sparse as its result.

``top_scores(queries, keys, bias, count, largest)`` returns each query's ``count`` best scores
``s_ij = q_i . k_j (+ bias_ij)`` and their key indices ``(B, N, count)``, best first: ``topk`` of
``bmm(queries, keys^T) + bias``.

Through autograd, ``topk``'s backward scatters the ``count`` gradients of a row into a zero ``(B, N, r)``
matrix and the matrix product's backward multiplies that matrix, mostly zeros, with the keys and with
the queries: three passes over ``B x N x r`` values for ``B x N x count`` non-zero gradients, the largest
part of the layer's backward on a CPU. Here the backward touches only the chosen pairs:

- ``dq_i = sum_k g_ik k_{j(i,k)}``: one ``embedding_bag`` (gather, weight and add the chosen keys);
- ``dk_j = sum_{(i,k): j(i,k) = j} g_ik q_i``: the pairs sorted by key, then one ``embedding_bag`` whose
  bags are the keys (a key nobody chose gets an empty bag, so zero).

That sort costs about as much as a matrix product over all ``r`` candidates when ``r`` is small, so
where ``r`` is at most ``DENSE_CANDIDATES_PER_CHOICE`` times ``count`` the keys' gradient scatters the
pair gradients into the ``(B, N, r)`` matrix after all and takes one batched product with the queries
(the queries' gradient is the ``embedding_bag`` either way: it needs no sort, and it took half the time
of the matching product at r=65).

Both are ``torch.library`` custom operators, so compiled graphs call them as they are.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from models.neighbour_conv import scratch_buffers, weighted_bag_sums

# Where the dense keys' gradient stops paying: measured on a 2-core CPU at B=32, D=192, K=9, the whole backward
# took 1.1-1.6 ms dense against 2.2-2.8 sparse at r=65, 2.2-2.6 against 4.5 at r=101, 3.8-6.4 against 3.4-4.1 at
# r=129 and 6.2-6.3 against 3.3-4.1 at r=197 (two runs).
DENSE_CANDIDATES_PER_CHOICE = 12


@torch.library.custom_op("convnn::top_scores", mutates_args=())
def top_scores(queries: Tensor, keys: Tensor, bias: Optional[Tensor], count: int,
               largest: bool) -> Tuple[Tensor, Tensor]:
    """The ``count`` best of ``queries @ keys^T (+ bias)`` along the keys, best first: ``(values, indices)``.

      queries  ``(B, N, D)``;  keys ``(B, r, D)``;  bias ``None`` or ``(N, r)``, added to every sequence's scores
      (``-inf`` / ``inf`` excludes a pair); it gets no gradient.
    """
    batch, seq_len, _ = queries.shape
    (buffer,) = scratch_buffers(queries, (batch * seq_len * keys.shape[1],))
    scores = torch.bmm(queries, keys.transpose(1, 2), out=buffer.view(batch, seq_len, keys.shape[1]))
    if bias is not None:
        scores = scores.add_(bias) if bias.dtype == scores.dtype else scores + bias
    values, indices = torch.topk(scores, count, dim=-1, largest=largest)
    return values, indices


@top_scores.register_fake
def _top_scores_shapes(queries, keys, bias, count, largest):
    batch, seq_len, _ = queries.shape
    dtype = queries.dtype if bias is None else torch.promote_types(queries.dtype, bias.dtype)
    return (queries.new_empty(batch, seq_len, count, dtype=dtype),
            queries.new_empty(batch, seq_len, count, dtype=torch.long))


@register_flop_formula(torch.ops.convnn.top_scores)
def _top_scores_flops(queries_shape, keys_shape, *args, **kwargs) -> int:
    """The FLOPs of the scores' matrix product, as counted for ``bmm`` (``model.txt`` counts them)."""
    batch, seq_len, width = queries_shape
    return 2 * batch * seq_len * keys_shape[1] * width


@torch.library.custom_op("convnn::top_scores_gradients", mutates_args=())
def top_scores_gradients(grad_values: Tensor, queries: Tensor, keys: Tensor,
                         indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of ``top_scores``'s queries and keys from those of its values, over the chosen pairs only."""
    batch, seq_len, count = indices.shape
    candidates, width = keys.shape[1], keys.shape[2]
    # 32-bit positions where they fit: the sort of the pairs by key is about twice as fast.
    position = torch.int32 if max(batch * seq_len * count, batch * candidates) < 2**31 else torch.int64
    offsets = torch.arange(batch, device=indices.device, dtype=position).mul_(candidates).view(batch, 1, 1)
    key_rows = (indices.to(position) + offsets).view(-1)
    pair_grads = grad_values.reshape(-1)

    query_bags = torch.arange(batch * seq_len, device=indices.device, dtype=position).mul_(count)
    grad_queries = weighted_bag_sums(keys.reshape(batch * candidates, width), key_rows, query_bags, pair_grads)
    if candidates <= DENSE_CANDIDATES_PER_CHOICE * count:
        (buffer,) = scratch_buffers(queries, (batch * seq_len * candidates,))
        score_grads = buffer.view(batch, seq_len, candidates).zero_()
        score_grads.scatter_(2, indices, grad_values.to(queries.dtype))  # float32 where a bias widened the scores
        return grad_queries.view_as(queries), torch.bmm(score_grads.transpose(1, 2), queries)

    sorted_rows, by_key = torch.sort(key_rows, stable=True)
    key_bags = torch.searchsorted(sorted_rows, torch.arange(batch * candidates, device=indices.device, dtype=position),
                                  out_int32=position == torch.int32)
    query_rows = by_key.div(max(count, 1), rounding_mode="floor").to(position)
    grad_keys = weighted_bag_sums(queries.reshape(batch * seq_len, width), query_rows, key_bags, pair_grads[by_key])
    return grad_queries.view_as(queries), grad_keys.view_as(keys)


@top_scores_gradients.register_fake
def _top_scores_gradients_shapes(grad_values, queries, keys, indices):
    return torch.empty_like(queries), torch.empty_like(keys)


def _save_for_gradients(ctx, inputs, output):
    queries, keys, _, _, _ = inputs
    ctx.save_for_backward(queries, keys, output[1])


def _input_gradients(ctx, grad_values: Tensor, grad_indices: Optional[Tensor]):
    queries, keys, indices = ctx.saved_tensors
    grad_queries, grad_keys = top_scores_gradients(grad_values, queries, keys, indices)
    return grad_queries, grad_keys, None, None, None


top_scores.register_autograd(_input_gradients, setup_context=_save_for_gradients)
