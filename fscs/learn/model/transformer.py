"""The correlation transformer: attention along the support axis of the correlation tensor (METHOD.md §5).

Tensors are channel-last, (B, Pq, Ns, C): Pq query tokens, Ns support positions, C channels; position 0 is
the support CLS (or the token derived from it) and positions 1.. an S x S support grid, row-major.
(Channel-last makes every 1x1 convolution one large matrix product, several times faster on CPU than
convolutions over the (C, Pq, Ns) layout; the 1x1 convolutions are therefore ``nn.Linear`` layers, with
the same parameters.)

For every query token separately, a block attends from a support-pooled set of positions (the CLS-derived
token kept apart, the grid average-pooled to S' x S') to all Ns positions. Attention logits are plain dot
products (no 1/sqrt(d) scaling); grid keys whose support-mask cell is 0 are masked out, the CLS key never is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fscs.learn.model.fused_attention import sdpa_attention, tiny_attention


class GroupNormLast(nn.Module):
    """GroupNorm over a channel-last tensor (B, ..., C): statistics per sample and channel group over all
    positions, as ``nn.GroupNorm`` computes them on the channel-first layout."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, P, N, C) contiguous viewed as (B, C, P, N) is channels_last memory: native kernel, no copy
        shape = x.shape
        x4 = x.reshape(shape[0], -1, 1, shape[-1]).permute(0, 3, 1, 2)
        y = F.group_norm(x4, self.groups, self.weight, self.bias, self.eps)
        return y.permute(0, 2, 3, 1).reshape(shape)


def grid_side(ns: int) -> int:
    s = int(round((ns - 1) ** 0.5))
    if s * s != ns - 1:
        raise ValueError(f"support axis of length {ns} is not 1 + a square grid")
    return s


def pool_support(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, Pq, 1+S*S, C) -> (B, Pq, 1+S'*S', C): CLS position kept, the S x S grid average-pooled to S'."""
    b, pq, ns, c = x.shape
    s = grid_side(ns)
    if s == out_size:
        return x
    grid = x[:, :, 1:]
    if s % out_size == 0:
        k = s // out_size
        pooled = grid.reshape(b, pq, out_size, k, out_size, k, c).mean(dim=(3, 5))
    else:
        img = grid.reshape(b * pq, s, s, c).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(img, out_size).permute(0, 2, 3, 1)
    return torch.cat([x[:, :, :1], pooled.reshape(b, pq, out_size * out_size, c)], dim=2)


def pool_mask(mask: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, S, S) float support mask -> (B, S', S'); a pooled cell is 0 only if all its cells are 0."""
    if mask.shape[-1] == out_size:
        return mask
    return F.adaptive_avg_pool2d(mask.unsqueeze(1), out_size).squeeze(1)


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, S, S) support mask -> (B, 1+S*S) bool: which keys take part; the CLS key always does."""
    b = mask.shape[0]
    cls = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
    return torch.cat([cls, mask.reshape(b, -1) > 0], dim=1)


def join_shots(
    shots: int, x_q: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, pooled_mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """K consecutive supports of each query as one support: the attention queries (and the shortcut) are the
    mean of their pooled correlations, the keys all K x Ns positions, each masked by its own support's
    mask; the pooled mask the mean of theirs (0 only where every support's is). One support is unchanged.

    x_q (B*K, Pq, Nq, C), x (B*K, Pq, Ns, C), valid (B*K, Ns), pooled_mask (B*K, S', S')
    -> (B, Pq, Nq, C), (B, Pq, K*Ns, C), (B, K*Ns), (B, S', S')."""
    bk, pq, ns, c = x.shape
    if bk % shots:
        raise ValueError(f"a batch of {bk} supports does not split into groups of {shots} shots")
    b = bk // shots
    x_q = x_q.unflatten(0, (b, shots)).mean(dim=1)
    x = x.unflatten(0, (b, shots)).transpose(1, 2).reshape(b, pq, shots * ns, c)
    return x_q, x, valid.reshape(b, shots * ns), pooled_mask.unflatten(0, (b, shots)).mean(dim=1)


class SupportAttention(nn.Module):
    """Multi-head attention along the support axis, one attention per (sample, query token).

    ``attention``: "fused" runs the CPU kernel of `fscs.learn.model.fused_attention` (torch's op on other
    devices), "sdpa" always torch's `scaled_dot_product_attention`; same function, different rounding."""

    def __init__(self, cin: int, cout: int, heads: int, attention: str = "fused"):
        super().__init__()
        if cout % heads:
            raise ValueError(f"{cout} channels do not split into {heads} heads")
        self.heads = heads
        self.cout = cout
        self.attention = attention
        self.to_q = nn.Linear(cin, cout)
        self.to_kv = nn.Linear(cin, 2 * cout)  # key and value projections as one matrix product

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x_q (B, Pq, Nq, Cin), x_kv (B, Pq, Nk, Cin), key_valid (B, Nk) bool -> (B, Pq, Nq, Cout)."""
        b, pq, nq, _ = x_q.shape
        nk = x_kv.shape[2]
        h, c = self.heads, self.cout
        q = self.to_q(x_q).reshape(b * pq, nq, h, c // h)
        kv = self.to_kv(x_kv).reshape(b * pq, nk, 2, h, c // h)
        valid = key_valid[:, None].expand(b, pq, nk).reshape(b * pq, nk)
        fused = self.attention == "fused" and q.device.type == "cpu"
        out = (tiny_attention if fused else sdpa_attention)(q, kv, valid)
        return out.reshape(b, pq, nq, c)


class CorrelationBlock(nn.Module):
    """One transformer block: pooled-query support attention, aggregation, residual, bottleneck FFN.

    shortcut = ReLU(GN(W_s pooled x));  a = attention(pooled x -> x)
    y = GN(ReLU(GN(W_a ReLU(GN(a)))) + shortcut);  out = GN(y + FFN(y)), FFN = Linear C->C/4, ReLU, C/4->C.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        out_size: int,
        heads: int = 8,
        groups: int = 4,
        ffn_ratio: int = 4,
        attention: str = "fused",
    ):
        super().__init__()
        self.out_size = out_size
        self.shortcut = nn.Sequential(nn.Linear(cin, cout), GroupNormLast(groups, cout), nn.ReLU())
        self.attn = SupportAttention(cin, cout, heads, attention)
        self.aggregate = nn.Sequential(
            GroupNormLast(groups, cout),
            nn.ReLU(),
            nn.Linear(cout, cout),
            GroupNormLast(groups, cout),
            nn.ReLU(),
        )
        self.norm = GroupNormLast(groups, cout)
        hidden = max(cout // ffn_ratio, 1)
        self.ffn = nn.Sequential(nn.Linear(cout, hidden), nn.ReLU(), nn.Linear(hidden, cout))
        self.ffn_norm = GroupNormLast(groups, cout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, x_pooled: torch.Tensor | None = None, shots: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Pq, 1+S*S, Cin), mask (B, S, S) float -> (B, Pq, 1+S'*S', Cout), pooled mask (B, S', S').

        ``x_pooled``: the support-pooled x if the caller has it already (else pooled here). ``shots`` > 1:
        the batch is B/shots groups of that many supports of one query (consecutive), joined by
        `join_shots` into one attention over all their positions: the output has B/shots rows.
        """
        x_q = pool_support(x, self.out_size) if x_pooled is None else x_pooled
        valid, pooled_mask = key_mask(mask), pool_mask(mask, self.out_size)
        if shots > 1:
            x_q, x, valid, pooled_mask = join_shots(shots, x_q, x, valid, pooled_mask)
        y = self.aggregate(self.attn(x_q, x, valid)) + self.shortcut(x_q)
        y = self.norm(y)
        y = self.ffn_norm(y + self.ffn(y))
        return y, pooled_mask
