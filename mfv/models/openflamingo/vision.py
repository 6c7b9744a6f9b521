"""The CLIP vision tower of a released OpenFlamingo without its CPU hot spots, same weights.

Profiled at full size (``benchmarks/full_size.py --profile``), the prompt pass of
OpenFlamingo-4B spends most of its time in the ViT-L/14 tower, and there half of it outside
the matmuls: open_clip's ``QuickGELU`` (``x * sigmoid(1.702 x)``) allocates three tensors the
size of the MLP's activations per block (20 images: 168 MB each, fresh pages every time),
and ``nn.MultiheadAttention``'s fast path materialises the ``(B, heads, 257, 257)`` scores
and softmax. :func:`speed_up_vision_tower` replaces, on the instances, the activation by the
same three operations in place (bit for bit the same values) and, without gradients, the
attention by ``scaled_dot_product_attention`` (fused; equal to float rounding). With
gradients, a mask or cross-attention inputs, open_clip's own code runs.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` with one allocation instead of three where no graph is recorded."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x * torch.sigmoid(1.702 * x)
    out = torch.mul(x, 1.702)
    out.sigmoid_()
    return out.mul_(x)


def fused_attention(block: nn.Module, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                    v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.attention`` through ``scaled_dot_product_attention``
    (self-attention without a mask or gradients; anything else runs the original)."""
    attn = block.attn
    if (k_x is not None or v_x is not None or attn_mask is not None or torch.is_grad_enabled()
            or not attn.batch_first or attn.in_proj_weight is None):
        return type(block).attention(block, q_x, k_x, v_x, attn_mask)
    batch, length, width = q_x.shape
    heads = attn.num_heads
    qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).view(batch, length, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def speed_up_vision_tower(visual: nn.Module) -> int:
    """Installs :func:`quick_gelu` and :func:`fused_attention` on ``visual``'s open_clip
    modules (instance attributes); returns how many modules were changed."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    changed = 0
    for module in visual.modules():
        if isinstance(module, QuickGELU):
            module.forward = quick_gelu
            changed += 1
        elif isinstance(module, ResidualAttentionBlock) and isinstance(module.attn, nn.MultiheadAttention):
            module.attention = partial(fused_attention, module)
            changed += 1
    return changed
