"""Gated cross-attention that computes only what it keeps (OpenFlamingo, latest image only).

open_flamingo's ``MaskedCrossAttention`` lets every text token score the latents of *every*
image in its prompt and then masks all but the latest image's away: with ``T`` images, ``T - 1``
of every ``T`` products (and their softmax and value sums) are thrown out. At 10 shots that is
most of the language model's time on small backbones. Here tokens are grouped by the image
they follow, and each group attends to that image's latents only: the same weights and
outputs, exact to float rounding (the dropped terms were exactly zero after the softmax).

It replaces the module's ``forward`` on the instance, not a hook: a forward hook can change
the output but cannot skip the masked product, which is the cost to remove. The context
manager always restores the original.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
from einops import rearrange
from torch import nn


def immediate_media_attention(attn: nn.Module, x: torch.Tensor, media: torch.Tensor,
                              media_locations: torch.Tensor | None = None, use_cached_media: bool = False
                              ) -> torch.Tensor:
    """``MaskedCrossAttention.forward`` (``only_attend_immediate_media``) without masked products.

    Args:
        attn: The ``MaskedCrossAttention`` module (its weights are used).
        x: ``(B, T_txt, D)`` text features.
        media: ``(B, T_img, n, D_visual)`` latents of each prompt's images.
        media_locations: ``(B, T_txt)`` True at each image token.
        use_cached_media: Generation with cached media; handled by the original code.

    Returns:
        ``(B, T_txt, D)``, equal to the original to float rounding.
    """
    if use_cached_media or media_locations is None:
        return type(attn).forward(attn, x, media, media_locations=media_locations, use_cached_media=use_cached_media)
    batch, length = x.shape[:2]
    images = media.shape[1]
    q = attn.to_q(attn.norm(x)) * attn.scale
    k, v = attn.to_kv(media).chunk(2, dim=-1)
    positions = torch.arange(length, device=x.device)
    image_of = media_locations.cumsum(-1) - 1  # -1 before the first image: no attention at all
    latest_image_token = torch.where(media_locations, positions, -1).cummax(-1).values
    offset = positions - latest_image_token  # place of the token in its image's segment
    rows, cols = (image_of >= 0).nonzero(as_tuple=True)
    segment, place = image_of[rows, cols], offset[rows, cols]
    span = int(place.max()) + 1 if place.numel() else 1
    # Queries laid out per (prompt, image, place in segment); unused places stay zero and are never read.
    grid = q.new_zeros(batch, images, span, q.shape[-1])
    grid[rows, segment, place] = q[rows, cols]
    grid = rearrange(grid, "b t s (h d) -> b t h s d", h=attn.heads)
    k, v = (rearrange(t, "b t n (h d) -> b t h n d", h=attn.heads) for t in (k, v))
    sim = torch.matmul(grid, k.transpose(-1, -2))
    weights = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)  # the original's steps, the same rounding
    out = rearrange(torch.matmul(weights, v), "b t h s d -> b t s (h d)")
    result = q.new_zeros(batch, length, q.shape[-1])  # tokens before any image get nothing, as in the original
    result[rows, cols] = out[rows, segment, place]
    return attn.to_out(result)


@contextmanager
def attend_immediate_media_only(layers: nn.ModuleList) -> Iterator[None]:
    """Inside the block every gated cross-attention that attends to the latest image only runs
    :func:`immediate_media_attention`; the original ``forward`` is restored on exit."""
    patched = []
    try:
        for layer in layers:
            block = getattr(layer, "gated_cross_attn_layer", None)
            if block is not None and block.attn.only_attend_immediate_media and "forward" not in vars(block.attn):
                block.attn.forward = partial(immediate_media_attention, block.attn)
                patched.append(block.attn)
        yield
    finally:
        for attn in patched:
            del attn.forward
