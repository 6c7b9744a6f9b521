"""The minimal exact computation of single-head patches at the last position (OpenFlamingo).

Patching head ``h`` of layer ``l`` at the last position changes nothing before layer ``l``
and nothing at earlier positions, so the patched logits need only: one full forward of the
prompt (which yields every layer's last-position input, every layer's prefix keys/values and
the query image's latents), then, per patched site, the last position of layers ``l..L-1``.
This module does exactly that, for all ``layers x heads`` sites of a batch at once:

* the query image's cross-attention keys/values are computed once per prompt and layer
  (the last token attends only to the latest image) and shared by the prompt's rows;
* rows attend to their prompt's cached prefix keys/values by a batched product
  (``(prompt, row, ...)`` against ``(prompt, ...)``), never a per-row copy;
* rows patched at layer ``l`` join at layer ``l``, starting from the full forward's state;
  every layer is run once over all rows that have joined so far.

GPT-NeoX language models (OpenFlamingo-4B, tiny and organism models) are covered; other
families fall back to the generic cached path (:meth:`BackboneAdapter.forward_last`).
Equal to the reference loop to float rounding (contract test).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange

from mfv.hooks import record_last_inputs
from mfv.models.base import (PrefixState, first_attended, join_inputs, join_positions, pad_left_cat,
                             share_inputs, share_positions, steer_upward)


@dataclass
class _Prefix:
    inputs: list[torch.Tensor]  # per layer: (P, D) last-position input of the layer
    keys: list[torch.Tensor]  # per layer: (P, heads, S-1, hs), rotary applied
    values: list[torch.Tensor]
    mask: torch.Tensor  # (P, 1, 1, S-1) additive: 0 or dtype min
    cos: torch.Tensor  # (P, 1, 1, rot)
    sin: torch.Tensor
    image_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (P, xheads, n, dh) each
    base_logits: torch.Tensor | None  # (P, vocab); None in a prompt store's share
    latents: torch.Tensor | None  # (P, images, n, d_visual): every image's resampler latents (None in a share)
    media_locations: torch.Tensor | None  # (P, S): where the images are (None in a share)
    heads: list[torch.Tensor] | None = None  # per layer: (P, heads * hs), the full forward's head outputs
    decoder_inputs: list[torch.Tensor] | None = None  # per layer: (P, D), after cross-attention

    def share(self, row: int, first_layer: int) -> "_Prefix":
        """Prompt ``row``'s share from ``first_layer`` up (:class:`~mfv.models.base.PromptShare`):
        what the steered path reads, the prompt's left padding cut off."""
        start = first_attended([self.mask[row]])

        def own(t: torch.Tensor) -> torch.Tensor:
            return t[row:row + 1].clone()

        return _Prefix(share_inputs(self.inputs, row, first_layer), share_positions(self.keys, row, first_layer, start),
                       share_positions(self.values, row, first_layer, start), own(self.mask[..., start:]),
                       own(self.cos), own(self.sin),
                       {i: (own(k), own(v)) for i, (k, v) in self.image_kv.items() if i >= first_layer},
                       None, None, None)

    @classmethod
    def join(cls, shares: Sequence["_Prefix"]) -> "_Prefix":
        """A batch of shares, keys and values left-padded and masked (:class:`~mfv.models.base.PromptShare`)."""
        first, inputs = join_inputs([s.inputs for s in shares])
        mask = pad_left_cat([s.mask for s in shares], -1, torch.finfo(shares[0].mask.dtype).min)
        image_kv = {i: tuple(torch.cat([s.image_kv[i][n] for s in shares]) for n in (0, 1)) for i in shares[0].image_kv}
        return cls(inputs, join_positions([s.keys for s in shares], first),
                   join_positions([s.values for s in shares], first), mask, torch.cat([s.cos for s in shares]),
                   torch.cat([s.sin for s in shares]), image_kv, None, None, None)


def supports(adapter) -> bool:
    """Whether the minimal path applies: a GPT-NeoX Flamingo attending to its latest image only."""
    layers = adapter.blocks
    if adapter.family.layers_attr != "gpt_neox.layers":
        return False
    blocks = [layer.gated_cross_attn_layer for layer in layers if layer.gated_cross_attn_layer is not None]
    return all(block.attn.only_attend_immediate_media for block in blocks)


def _prefill(adapter, batch, record: bool = False) -> _Prefix:
    from transformers import DynamicCache

    lang = adapter.model.lang_encoder
    kwargs = adapter.lm_inputs(batch.input_ids, batch.attention_mask)
    # Recording (fast AIE only) hooks the per-head sites and decoder-layer inputs; steering skips it.
    sites = [adapter.head_site(i) for i in range(adapter.num_layers)] + [l.decoder_layer for l in adapter.blocks]
    with (adapter.conditioned(batch.pixel_values),
          (record_last_inputs(sites) if record else nullcontext()) as recorded):
        first = adapter.blocks[0]
        latents = first.vis_x
        out = lang(**kwargs, past_key_values=DynamicCache(), use_cache=True, output_hidden_states=True,
                   logits_to_keep=1)
        media_locations = first.media_locations
    cache = out.past_key_values
    num_layers = len(adapter.blocks)
    inputs = [out.hidden_states[layer][:, -1] for layer in range(num_layers)]
    keys = [cache.layers[layer].keys[:, :, :-1] for layer in range(num_layers)]
    values = [cache.layers[layer].values[:, :, :-1] for layer in range(num_layers)]
    dtype = inputs[0].dtype
    mask = torch.zeros(batch.attention_mask[:, :-1].shape, dtype=dtype, device=adapter.device)
    mask = mask.masked_fill(batch.attention_mask[:, :-1] == 0, torch.finfo(dtype).min)[:, None, None]
    position = kwargs["position_ids"][:, -1:]
    cos, sin = lang.gpt_neox.rotary_emb(inputs[0][:, None], position)
    # The last token attends to the latest image only: the count of images in its prefix.
    latest = media_locations.sum(-1) - 1
    query_latents = latents[torch.arange(len(latest), device=latents.device), latest]  # (P, n, d_visual)
    image_kv = {}
    for index, layer in enumerate(adapter.blocks):
        block = layer.gated_cross_attn_layer
        if block is not None:
            k, v = block.attn.to_kv(query_latents).chunk(2, dim=-1)
            image_kv[index] = (rearrange(k, "p n (h d) -> p h n d", h=block.attn.heads),
                               rearrange(v, "p n (h d) -> p h n d", h=block.attn.heads))
    heads = recorded[:num_layers] if record else None
    decoder_inputs = recorded[num_layers:] if record else None
    return _Prefix(inputs, keys, values, mask, cos[:, None], sin[:, None], image_kv, out.logits[:, -1], latents,
                   media_locations, heads, decoder_inputs)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from transformers.models.gpt_neox.modeling_gpt_neox import rotate_half

    rotary = cos.shape[-1]
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail], dim=-1)


def _attend(adapter, index: int, x: torch.Tensor, prefix: _Prefix) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half of layer ``index`` at the last position, for rows ``x`` ``(P, M, D)``.

    Returns the decoder layer's input (after the gated cross-attention) and the heads'
    outputs ``(P, M, heads * hs)`` (the per-head site).
    """
    layer = adapter.blocks[index]
    block = layer.gated_cross_attn_layer
    if block is not None:
        attn = block.attn
        q = rearrange(attn.to_q(attn.norm(x)), "p m (h d) -> p m h d", h=attn.heads) * attn.scale
        k, v = prefix.image_kv[index]
        weights = torch.einsum("pmhd,phnd->pmhn", q, k).softmax(dim=-1)
        out = rearrange(torch.einsum("pmhn,phnd->pmhd", weights, v), "p m h d -> p m (h d)")
        x = attn.to_out(out) * block.attn_gate.tanh() + x
        x = block.ff(x) * block.ff_gate.tanh() + x
    decoder = layer.decoder_layer
    attention = decoder.attention
    heads, size = adapter.num_heads, attention.head_size
    qkv = attention.query_key_value(decoder.input_layernorm(x)).view(*x.shape[:2], heads, 3 * size)
    q, k, v = qkv.chunk(3, dim=-1)
    q, k = _rotate(q, prefix.cos, prefix.sin), _rotate(k, prefix.cos, prefix.sin)
    scores = torch.einsum("pmhd,phsd->pmhs", q, prefix.keys[index]) * attention.scaling + prefix.mask
    own = (q * k).sum(-1, keepdim=True) * attention.scaling
    weights = torch.cat([scores, own], dim=-1).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    heads_out = torch.einsum("pmhs,phsd->pmhd", weights[..., :-1], prefix.values[index]) + weights[..., -1:] * v
    return x, heads_out.reshape(*x.shape[:2], heads * size)


def _finish(adapter, index: int, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """The rest of layer ``index``: output projection, residual and MLP, from the decoder
    layer's input ``x`` and the heads' outputs."""
    decoder = adapter.blocks[index].decoder_layer
    attn_out = decoder.attention.dense(heads_out)
    if decoder.use_parallel_residual:
        return decoder.mlp(decoder.post_attention_layernorm(x)) + attn_out + x
    attn_out = attn_out + x
    return decoder.mlp(decoder.post_attention_layernorm(attn_out)) + attn_out


def _layer(adapter, index: int, x: torch.Tensor, prefix: _Prefix) -> torch.Tensor:
    """Layer ``index`` at the last position for rows ``x`` ``(P, M, D)``."""
    return _finish(adapter, index, *_attend(adapter, index, x, prefix))


@torch.no_grad()
def single_head_patch_logits(adapter, batch, values: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer probabilities of a per-layer baseline ``(P, L)`` and with each single head
    patched ``(P, L, H)``.

    Rows joining at layer ``l`` (``H`` patched, one baseline) all start from the full
    forward's layer-``l`` state: its decoder input and its heads' outputs (what the reference
    loop's patch hook sees), with head ``h`` replaced in row ``h``. Baseline and patched rows
    then run the same computation in the same batch, so a patch that writes a head's own
    activation gives exactly the baseline, in every dtype.

    Args:
        values: ``(P, L, H, head_dim)``: the activation written into head ``(l, h)`` of prompt ``p``.
        answers: ``(P,)`` answer token ids.
    """
    batch = batch.to(adapter.device)
    prefix = _prefill(adapter, batch, record=True)
    lang = adapter.model.lang_encoder
    num_prompts, num_layers, heads = values.shape[:3]
    values = values.to(adapter.device, adapter.dtype)
    slots = torch.arange(heads, device=adapter.device)
    rows = None
    for index in range(num_layers):
        # H + 1 rows join: row h patches head h, row H is the layer's baseline.
        joining_heads = prefix.heads[index].reshape(num_prompts, 1, heads, -1).repeat(1, heads + 1, 1, 1)
        joining_heads[:, slots, slots] = values[:, index]
        joining_heads = joining_heads.reshape(num_prompts, heads + 1, -1)
        joining_x = prefix.decoder_inputs[index][:, None].expand(num_prompts, heads + 1, -1)
        if rows is None:
            x, heads_out = joining_x, joining_heads
        else:
            x, heads_out = _attend(adapter, index, rows, prefix)
            x, heads_out = torch.cat([x, joining_x], dim=1), torch.cat([heads_out, joining_heads], dim=1)
        rows = _finish(adapter, index, x, heads_out)
    logits = lang.get_output_embeddings()(lang.gpt_neox.final_layer_norm(rows))  # (P, L*(H+1), vocab)
    answers = answers.to(adapter.device)
    probabilities = logits.float().softmax(-1).gather(-1, answers[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    probabilities = probabilities.reshape(num_prompts, num_layers, heads + 1).cpu()
    return probabilities[..., heads], probabilities[..., :heads]


def prefill(adapter, batch) -> PrefixState:
    """The prompt run once, whole (no graph): the state :meth:`OpenFlamingoAdapter.forward_last`
    continues from (keys and values of positions ``0..S-2``) and, under ``"minimal"``, what
    :func:`steered_logits` continues from; with the unsteered logits."""
    with torch.no_grad():
        prefix = _prefill(adapter, batch)
    data = adapter.cached_prompt(batch, prefix.keys, prefix.values, prefix.latents, prefix.media_locations)
    return PrefixState(data={**data, "minimal": prefix}, batch_size=len(batch), base_logits=prefix.base_logits)


def steered_logits(adapter, vectors: torch.Tensor, layers: list[int], prefix: _Prefix) -> torch.Tensor | None:
    """Last-position logits with ``vectors[:, i]`` (``(B, len(layers), D)``) added after
    ``layers[i]`` (increasing), differentiable in ``vectors`` only: the prompt ran once without
    a graph (``prefix``), then the last position of layers ``layers[0]+1..L-1`` runs with one.
    The graph (and what backward keeps) is those layers at one position, whatever the prompt
    length. ``None`` where this path does not apply (an injection after the last layer)."""
    if not layers or layers[-1] >= adapter.num_layers - 1:
        return None
    x = steer_upward(prefix.inputs[layers[0] + 1][:, None], vectors, layers, adapter.num_layers,
                     lambda index, rows: _layer(adapter, index, rows, prefix))
    lang = adapter.model.lang_encoder
    return lang.get_output_embeddings()(lang.gpt_neox.final_layer_norm(x))[:, 0]
