"""The fused float32 CPU path for timm ViT blocks (LayerScale folded into the weights, bias + residual fused
into the GEMMs), used by `fscs.features.backbone.Backbone`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedBlocks:
    """The ViT blocks with LayerScale folded into the output projections and bias + residual fused into GEMMs.

    timm's block runs, around its four GEMMs, a bias copy before each GEMM, two LayerScale multiplies and
    two residual adds as separate memory-bound passes. Here, for each residual branch, ``y = x + gamma*b``
    is one pass and the GEMM accumulates into ``y`` in place (``addmm_`` with beta=1), with gamma folded into
    the weight: ``x + gamma*(W a + b) = (x + gamma*b) + (gamma*W) a``. Float32 throughout, plain PyTorch
    ops; equal to timm's blocks up to float32 rounding (~1e-7 relative). Only plain timm ``Block``s with
    standard attention/MLP qualify (`supports`). (A oneDNN variant with bias/GELU/residual post-ops was
    measured slower on an AVX2 CPU and dropped.)
    """

    def __init__(self, model: torch.nn.Module):
        def fold(linear: torch.nn.Linear, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            w = linear.weight.detach()
            b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0])
            if gamma is not None:
                w, b = w * gamma[:, None], b * gamma
            return w.t(), b.contiguous()  # (in, out) view of the (out, in) weight, as F.linear uses it

        self.blocks = []
        for blk in model.blocks:
            attn, mlp = blk.attn, blk.mlp
            g1 = blk.ls1.gamma.detach() if hasattr(blk.ls1, "gamma") else None
            g2 = blk.ls2.gamma.detach() if hasattr(blk.ls2, "gamma") else None
            self.blocks.append(
                dict(
                    n1=blk.norm1,
                    n2=blk.norm2,
                    qkv=fold(attn.qkv, None),
                    proj=fold(attn.proj, g1),
                    fc1=fold(mlp.fc1, None),
                    fc2=fold(mlp.fc2, g2),
                    heads=attn.num_heads,
                    head_dim=attn.head_dim,
                )
            )
        self._gelu = [blk.mlp.act.approximate for blk in model.blocks]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from timm.layers import LayerScale, Mlp
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block

        for blk in model.blocks:
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                return False
            a, m = blk.attn, blk.mlp
            plain = (torch.nn.Identity, torch.nn.Dropout)
            if not all(
                isinstance(mod, plain) for mod in (a.q_norm, a.k_norm, a.norm, m.norm, m.drop1, m.drop2)
            ):
                return False
            if getattr(a, "gate", None) is not None or not isinstance(m.act, torch.nn.GELU):
                return False
            if not isinstance(blk.norm1, torch.nn.LayerNorm) or not isinstance(blk.norm2, torch.nn.LayerNorm):
                return False
            if not all(isinstance(ls, LayerScale | torch.nn.Identity) for ls in (blk.ls1, blk.ls2)):
                return False
            if not all(isinstance(d, torch.nn.Identity) for d in (blk.drop_path1, blk.drop_path2)):
                return False
        return True

    def block(
        self, i: int, x: torch.Tensor, keep_qkv: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``i`` on x (B, N, D) -> a new (B, N, D) tensor, and its qkv (B, N, 3D) if asked."""
        p = self.blocks[i]
        b, n, d = x.shape
        x2 = x.reshape(b * n, d)
        n1, n2 = p["n1"], p["n2"]
        h = F.layer_norm(x2, (d,), n1.weight, n1.bias, n1.eps)
        qkv = torch.addmm(p["qkv"][1], h, p["qkv"][0])
        q, k, v = qkv.view(b, n, 3, p["heads"], p["head_dim"]).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, d)
        y = torch.add(x2, p["proj"][1])
        y.addmm_(a, p["proj"][0])
        h = F.layer_norm(y, (d,), n2.weight, n2.bias, n2.eps)
        h = F.gelu(torch.addmm(p["fc1"][1], h, p["fc1"][0]), approximate=self._gelu[i])
        z = torch.add(y, p["fc2"][1])
        z.addmm_(h, p["fc2"][0])
        return z.view(b, n, d), (qkv.view(b, n, -1) if keep_qkv else None)
