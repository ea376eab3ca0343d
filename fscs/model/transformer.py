"""The correlation transformer: attention along the support axis of the correlation tensor (METHOD.md §5).

Tensors are laid out as 2-D "images" (B, C, Pq, Ns): C channels, Pq query tokens, Ns support positions,
position 0 being the support CLS (or the token derived from it) and positions 1.. an S x S support grid.
For every query token separately, the block attends from a support-pooled set of positions (the CLS-derived
token kept apart, the grid average-pooled to S' x S') to all Ns positions. Attention logits are plain dot
products (no 1/sqrt(d) scaling); grid keys whose support-mask cell is 0 are masked out, the CLS key never is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


def pool_support(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, C, Pq, 1+S*S) -> (B, C, Pq, 1+S'*S'): CLS position kept, the S x S grid average-pooled to S'."""
    b, c, pq, ns = x.shape
    s = int(round((ns - 1) ** 0.5))
    if s * s != ns - 1:
        raise ValueError(f"support axis of length {ns} is not 1 + a square grid")
    if s == out_size:
        return x
    grid = x[..., 1:].reshape(b, c * pq, s, s)
    pooled = F.adaptive_avg_pool2d(grid, out_size).reshape(b, c, pq, out_size * out_size)
    return torch.cat([x[..., :1], pooled], dim=-1)


def pool_mask(mask: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, S, S) float support mask -> (B, S', S'); a pooled cell is 0 only if all its cells are 0."""
    if mask.shape[-1] == out_size:
        return mask
    return F.adaptive_avg_pool2d(mask.unsqueeze(1), out_size).squeeze(1)


class SupportAttention(nn.Module):
    """Multi-head attention along the support axis, one attention per (batch, query token)."""

    def __init__(self, cin: int, cout: int, heads: int):
        super().__init__()
        if cout % heads:
            raise ValueError(f"{cout} channels do not split into {heads} heads")
        self.heads = heads
        self.to_q = conv1x1(cin, cout)
        self.to_k = conv1x1(cin, cout)
        self.to_v = conv1x1(cin, cout)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x_q (B, Cin, Pq, Nq), x_kv (B, Cin, Pq, Nk), key_valid (B, Nk) bool -> (B, Cout, Pq, Nq)."""
        b, _, pq, nq = x_q.shape
        nk = x_kv.shape[-1]
        h = self.heads
        q = self.to_q(x_q)
        dh = q.shape[1] // h
        q = q.reshape(b, h, dh, pq, nq).permute(0, 1, 3, 4, 2)  # B h Pq Nq dh
        k = self.to_k(x_kv).reshape(b, h, dh, pq, nk).permute(0, 1, 3, 2, 4)  # B h Pq dh Nk
        v = self.to_v(x_kv).reshape(b, h, dh, pq, nk).permute(0, 1, 3, 4, 2)  # B h Pq Nk dh
        logits = torch.matmul(q, k)  # B h Pq Nq Nk, no 1/sqrt(dh) scaling
        bias = torch.zeros(key_valid.shape, dtype=logits.dtype, device=logits.device)
        bias = bias.masked_fill(~key_valid, float("-inf")).reshape(b, 1, 1, 1, nk)
        attn = torch.softmax(logits + bias, dim=-1)
        out = torch.matmul(attn, v)  # B h Pq Nq dh
        return out.permute(0, 1, 4, 2, 3).reshape(b, h * dh, pq, nq)


class CorrelationBlock(nn.Module):
    """One transformer block: pooled-query support attention, aggregation, residual, bottleneck FFN.

    shortcut = ReLU(GN(conv1x1(pooled x)));  a = attention(pooled x -> x)
    y = GN(ReLU(GN(conv1x1(ReLU(GN(a))))) + shortcut);  out = GN(y + FFN(y)), FFN = conv1x1 C->C/4, ReLU,
    conv1x1 C/4->C.
    """

    def __init__(self, cin: int, cout: int, out_size: int, heads: int = 8, groups: int = 4, ffn_ratio: int = 4):
        super().__init__()
        self.out_size = out_size
        self.shortcut = nn.Sequential(conv1x1(cin, cout), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))
        self.attn = SupportAttention(cin, cout, heads)
        self.aggregate = nn.Sequential(
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
            conv1x1(cout, cout),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
        )
        self.norm = nn.GroupNorm(groups, cout)
        hidden = max(cout // ffn_ratio, groups)
        self.ffn = nn.Sequential(conv1x1(cout, hidden), nn.ReLU(inplace=True), conv1x1(hidden, cout))
        self.ffn_norm = nn.GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Cin, Pq, 1+S*S), mask (B, S, S) float -> (B, Cout, Pq, 1+S'*S'), pooled mask (B, S', S')."""
        b = x.shape[0]
        key_valid = torch.cat(
            [torch.ones(b, 1, dtype=torch.bool, device=x.device), mask.reshape(b, -1) > 0], dim=1
        )
        x_q = pool_support(x, self.out_size)
        y = self.aggregate(self.attn(x_q, x, key_valid)) + self.shortcut(x_q)
        y = self.norm(y)
        y = self.ffn_norm(y + self.ffn(y))
        return y, pool_mask(mask, self.out_size)
