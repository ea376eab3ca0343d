"""Multi-layer, multi-head correlation between a query's patch tokens and a support's tokens (METHOD.md §5).

Every selected backbone block's D-dim token is split into its H attention-head sub-vectors (D = H*d), and
each (layer, head) pair gives one correlation channel: the cosine similarity between every query patch
token and every support position. The support side is the support CLS token followed by the support patch
grid bilinearly downsampled (on the D-dim features, before the head split) to S x S. No clamping.
Result: X (B, L*H, Pq, 1 + S*S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, T, D) -> (B, L*H, T, d), channel index = layer * H + head."""
    b, n_layers, t, dim = tokens.shape
    if dim % num_heads:
        raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
    d = dim // num_heads
    return (
        tokens.reshape(b, n_layers, t, num_heads, d)
        .permute(0, 1, 3, 2, 4)
        .reshape(b, n_layers * num_heads, t, d)
    )


def downsample_support(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(B, L, 1+P, D) -> (B, L, 1+S*S, D): CLS kept first, patch grid bilinearly resized to S x S."""
    b, n_layers, t, dim = tokens.shape
    gh, gw = grid
    if t != 1 + gh * gw:
        raise ValueError(f"support tokens have {t} positions, expected 1 + {gh}x{gw}")
    cls = tokens[:, :, :1]
    patches = tokens[:, :, 1:]
    if (gh, gw) != (size, size):
        img = patches.reshape(b * n_layers, gh, gw, dim).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        patches = img.permute(0, 2, 3, 1).reshape(b, n_layers, size * size, dim)
    return torch.cat([cls, patches], dim=2)


def normalize_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, T, D) -> (B, L*H, T, d) unit vectors per head."""
    return F.normalize(split_heads(tokens, num_heads), dim=-1, eps=EPS)


def prepare_query(query_tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Query tokens (B, L, 1+Pq, D), CLS first -> unit per-head patch vectors (B, L*H, Pq, d); CLS dropped."""
    return normalize_heads(query_tokens[:, :, 1:].float(), num_heads)


def prepare_support(
    support_tokens: torch.Tensor, grid: tuple[int, int], num_heads: int, size: int
) -> torch.Tensor:
    """Support tokens (B, L, 1+P, D) -> unit per-head vectors (B, L*H, 1+S*S, d), CLS first."""
    return normalize_heads(downsample_support(support_tokens.float(), grid, size), num_heads)


def correlate(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Prepared query (B, C, Pq, d) x prepared support (B, C, Ss, d) -> cosine X (B, C, Pq, Ss).

    A query batch of 1 against B supports (one query, several support images) is one larger product per
    channel instead of B copies of the query."""
    if query.shape[0] == 1 and support.shape[0] > 1:
        b, c, ss, d = support.shape
        s = support.permute(1, 3, 0, 2).reshape(c, d, b * ss)  # C, d, B*Ss
        x = torch.matmul(query[0], s)  # C, Pq, B*Ss
        return x.reshape(c, -1, b, ss).permute(2, 0, 1, 3)
    return torch.matmul(query, support.transpose(-1, -2))


def correlation(
    query_tokens: torch.Tensor,
    support_tokens: torch.Tensor,
    grid: tuple[int, int],
    num_heads: int,
    support_size: int,
) -> torch.Tensor:
    """Raw store tokens -> X (B, L*H, Pq, 1 + S*S) per-layer, per-head cosine similarities."""
    return correlate(
        prepare_query(query_tokens, num_heads), prepare_support(support_tokens, grid, num_heads, support_size)
    )


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Support mask (B, h, w) float/bool -> (B, size, size) float in [0, 1] by area averaging.

    A cell of the result is non-zero iff it overlaps a foreground pixel; the transformer masks out the
    support keys whose cell is exactly 0.
    """
    m = mask.float().unsqueeze(1)
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="area")
    return m.squeeze(1)
