"""A plain, slow, obviously-correct ConvNN-Attention written straight from docs/convnn_attention.md.

It reads the parameters of a ``MultiHeadConvNNAttention`` and recomputes its output the long way:
explicit pairwise distances, an explicit sort of positions, the gathered ``(B, N, K, C)`` neighbour
values, and ``F.conv1d`` with stride ``K`` over them. It is the plain reference the test suite holds the
fast layer to, and the one ``scripts/benchmark_convnn.py`` compares the fast layer with.
"""

import math

import torch
import torch.nn.functional as F


def _coordinate_channel(x):
    batch, seq_len, _ = x.shape
    coords = torch.linspace(-1.0, 1.0, seq_len, dtype=x.dtype, device=x.device)
    return torch.cat([x, coords.view(1, seq_len, 1).expand(batch, seq_len, 1)], dim=-1)


def reference_similarity(q, k, magnitude_type, width):
    """``(B, N, r)`` similarities of every query to every key, by the textbook formulas."""
    if magnitude_type == "matmul":
        return torch.einsum("bid,bjd->bij", q, k) / math.sqrt(width)
    if magnitude_type == "cosine":
        dots = torch.einsum("bid,bjd->bij", q, k)
        return dots / (q.norm(dim=-1).unsqueeze(-1) * k.norm(dim=-1).unsqueeze(-2))
    return (q.unsqueeze(2) - k.unsqueeze(1)).norm(dim=-1)


def positional_neighbours(seq_len, K, candidates):
    """For each token, its K nearest positions (ties to the lower index) in position order."""
    rows = []
    for i in range(seq_len):
        pool = list(range(seq_len)) if candidates is None else [i] + [c for c in candidates if c != i]
        nearest = sorted(pool, key=lambda j: (abs(j - i), j))[:K]
        rows.append(sorted(nearest))
    return torch.tensor(rows)


def reference_convnn(layer, x, candidates=None):
    """Output of ``layer`` on ``x``, computed plainly; ``candidates`` fixes sampled modes."""
    batch, seq_len, width = x.shape
    K = layer.K
    if layer.sampling_type == "all":
        candidates = None
    else:
        candidates = [int(c) for c in candidates]

    v = x @ layer.W_v.weight.t()
    if layer.coordinates_in_values:
        v = _coordinate_channel(v)

    if layer.positional_selection:
        neighbours = positional_neighbours(seq_len, K, candidates).unsqueeze(0).expand(batch, -1, -1)
        weights = torch.ones(batch, seq_len, K, dtype=x.dtype)
    else:
        q = x @ layer.W_q.weight.t()
        k = x @ layer.W_k.weight.t()
        if layer.coordinates_in_similarity:
            q, k = _coordinate_channel(q), _coordinate_channel(k)
        nearest_first = layer.magnitude_type != "euclidean"
        if candidates is None:
            similarity = reference_similarity(q, k, layer.magnitude_type, width)
            values, neighbours = torch.topk(similarity, K, dim=-1, largest=nearest_first)
        else:
            similarity = reference_similarity(q, k[:, candidates], layer.magnitude_type, width)
            value_rows, index_rows = [], []
            for i in range(seq_len):
                others = [j for j, c in enumerate(candidates) if c != i]
                best = torch.topk(similarity[:, i, others], K - 1, dim=-1, largest=nearest_first)
                chosen = torch.tensor(candidates)[torch.tensor(others)[best.indices]]
                index_rows.append(torch.cat([torch.full((batch, 1), i), chosen], dim=1))
                value_rows.append(torch.cat([torch.ones(batch, 1, dtype=x.dtype), best.values], dim=1))
            values, neighbours = torch.stack(value_rows, 1), torch.stack(index_rows, 1)
        if layer.magnitude_type == "euclidean":
            weights = torch.softmax(-values, -1) if layer.softmax_topk_val else 1.0 / (values + 1e-8)
        else:
            weights = torch.softmax(values, -1) if layer.softmax_topk_val else values

    gathered = torch.stack([v[b, neighbours[b]] for b in range(batch)])  # (B, N, K, C)
    weighted = gathered * weights.unsqueeze(-1)
    sequence = weighted.reshape(batch, seq_len * K, -1).transpose(1, 2)  # (B, C, N*K)
    if layer.convolution_type == "standard":
        out = F.conv1d(sequence, layer.conv.weight, stride=K)
    elif layer.convolution_type == "depthwise":
        out = F.conv1d(sequence, layer.conv.weight, stride=K, groups=sequence.shape[1])
    else:
        out = F.conv1d(sequence, layer.conv[0].weight, stride=K, groups=sequence.shape[1])
        out = F.conv1d(out, layer.conv[1].weight)
    return out.transpose(1, 2) @ layer.W_o.weight.t()
