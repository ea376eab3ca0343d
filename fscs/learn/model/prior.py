"""The masked-prototype prior map fed to CST's heads (``train.model.prior: prototype``).

The training-free `prototype` baselines match a query against the masked average of the support's patch
tokens at full token resolution, while the correlation transformer sees the support downsampled to S x S
and its mask as "any overlap" per cell. The prior gives the heads that full-resolution match as an input,
as PFENet's prior mask does: per query token, the cosine between its (one block's) token and the support's
mask-weighted prototype, raw and min-max normalised over the query (two channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6
CHANNELS = 2  # raw cosine, and the same min-max normalised over the query's tokens


def prepare_prior(tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Store tokens (B, L, 1+P, D), CLS first -> unit patch vectors of stored layer ``layer`` (B, P, D)."""
    return F.normalize(tokens[:, layer, 1:].float(), dim=-1, eps=EPS)


def prototype_prior(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    grid: tuple[int, int],
    shots: int = 1,
) -> torch.Tensor:
    """Prepared query (B or 1, P, D) and support (B*shots, P, D) vectors, support mask (B*shots, h, w) ->
    prior (B, 2, gh, gw): cosine with the mask-weighted prototype, and its per-query min-max rescaling.

    The weights are the mask's area fraction per token cell; a support whose mask is empty falls back to
    all its patches with equal weights (as the prototype baselines do). With ``shots`` > 1 each group of
    consecutive supports gives one prototype, their weighted tokens pooled (the K-shot prototype)."""
    gh, gw = grid
    w = F.adaptive_avg_pool2d(support_mask.float().unsqueeze(1), (gh, gw)).flatten(1)  # B*K, P
    empty = w.sum(dim=1, keepdim=True) <= 0
    w = torch.where(empty, torch.ones_like(w), w)
    pooled = torch.einsum("bp,bpd->bd", w, support)
    if shots > 1:
        pooled = pooled.unflatten(0, (-1, shots)).sum(dim=1)
    proto = F.normalize(pooled, dim=-1, eps=EPS)
    cos = torch.matmul(query, proto.unsqueeze(-1)).squeeze(-1)  # a query batch of 1 broadcasts: B, P
    lo = cos.min(dim=1, keepdim=True).values
    hi = cos.max(dim=1, keepdim=True).values
    scaled = (cos - lo) / (hi - lo).clamp(min=EPS)
    return torch.stack([cos, scaled], dim=1).reshape(-1, CHANNELS, gh, gw)
