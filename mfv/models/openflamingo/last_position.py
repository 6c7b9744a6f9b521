"""OpenFlamingo's layer runner of the shared last-position replay (:mod:`mfv.models.replay`).

One full forward of the prompt yields every layer's last-position input (and the final
norm's), every layer's prefix keys/values and the query image's latents. Layer ``i`` at the
last position, for rows ``x``, is then (by the layer's kind,
:attr:`~mfv.models.openflamingo.adapter.OpenFlamingoAdapter.layer_kinds`):

* the gated cross-attention block, where the layer has one, over the latest image's keys and
  values, computed once per prompt and layer at the prefill (the last token attends only to
  the latest image) and shared by the prompt's rows;
* the GPT-NeoX decoder layer, its rows attending to their prompt's cached prefix keys/values
  by a batched product (``(prompt, row, ...)`` against ``(prompt, ...)``), never a per-row copy.

Rows that join a layer in fast AIE start from the full forward's input of its decoder layer
(after the cross-attention) and skip the attention whose output the head site overwrites.

Fast AIE, steered logits (an injection after the last layer included) and the prompt store's
shares are the shared replay's. GPT-NeoX language models (OpenFlamingo-4B, tiny and organism
models) are covered; other families fall back to the generic cached path
(:meth:`BackboneAdapter.forward_last`). Equal to the reference loop to float rounding
(contract test).
"""

from __future__ import annotations

import torch
from einops import rearrange

from mfv.hooks import record_last_inputs
from mfv.models.base import BackboneAdapter, PrefixState, PromptBatch
from mfv.models.replay import LayerRunner, Replay, attends_image, head_sites, replayable


def supports(adapter: BackboneAdapter) -> bool:
    """Whether the replay applies to an :class:`~mfv.models.openflamingo.adapter.OpenFlamingoAdapter`:
    a causal GPT-NeoX Flamingo attending to its latest image only."""
    if adapter.family.layers_attr != "gpt_neox.layers" or not replayable(adapter):
        return False
    blocks = [layer.gated_cross_attn_layer for layer in adapter.blocks if layer.gated_cross_attn_layer is not None]
    return all(block.attn.only_attend_immediate_media for block in blocks)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from transformers.models.gpt_neox.modeling_gpt_neox import rotate_half

    rotary = cos.shape[-1]
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail], dim=-1)


class FlamingoLayers(LayerRunner):
    """The replay's runner for a GPT-NeoX Flamingo (:func:`supports`).

    Args:
        adapter: An :class:`~mfv.models.openflamingo.adapter.OpenFlamingoAdapter`.
    """

    def __init__(self, adapter: BackboneAdapter) -> None:
        super().__init__(adapter)
        self.kinds = adapter.layer_kinds

    def prefill(self, batch: PromptBatch, record_heads: bool = False) -> PrefixState:
        """The prompt run once, whole (no graph): the state
        :meth:`OpenFlamingoAdapter.forward_last` continues from (keys and values of positions
        ``0..S-2``, the images' latents) and, under ``"minimal"``, the
        :class:`~mfv.models.replay.Replay`; with the unsteered logits."""
        from transformers import DynamicCache

        adapter = self.adapter
        lang = adapter.model.lang_encoder
        kwargs = adapter.lm_inputs(batch.input_ids, batch.attention_mask)
        num_layers = adapter.num_layers
        # Fast AIE also records each decoder layer's input (after the cross-attention): joining rows start there.
        attention_sites = [layer.decoder_layer for layer in adapter.blocks] if record_heads else []
        recorded_sites = [*adapter.blocks, lang.gpt_neox.final_layer_norm, *head_sites(adapter, record_heads),
                          *attention_sites]
        with torch.no_grad(), adapter.conditioned(batch.pixel_values), record_last_inputs(recorded_sites) as recorded:
            first = adapter.blocks[0]
            latents = first.vis_x
            out = lang(**kwargs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            media_locations = first.media_locations
        cache = out.past_key_values
        keys = [cache.layers[layer].keys[:, :, :-1] for layer in range(num_layers)]
        values = [cache.layers[layer].values[:, :, :-1] for layer in range(num_layers)]
        inputs = recorded[:num_layers + 1]
        dtype = inputs[0].dtype
        mask = torch.zeros(batch.attention_mask[:, :-1].shape, dtype=dtype, device=adapter.device)
        mask = mask.masked_fill(batch.attention_mask[:, :-1] == 0, torch.finfo(dtype).min)[:, None, None]
        cos, sin = lang.gpt_neox.rotary_emb(inputs[0][:, None], kwargs["position_ids"][:, -1:])  # (P, 1, rot)
        # Every layer's call is the same (one mask, one position); share/join treat them per layer.
        call = {"attention_mask": mask, "position_embeddings": (cos, sin)}
        # The last token attends to the latest image only: the count of images in its prefix.
        latest = media_locations.sum(-1) - 1
        query_latents = latents[torch.arange(len(latest), device=latents.device), latest]  # (P, n, d_visual)
        with torch.no_grad():
            images = [self._image_keys(index, query_latents) if attends_image(kind) else None
                      for index, kind in enumerate(self.kinds)]
        heads = recorded[num_layers + 1:2 * num_layers + 1] if record_heads else None
        replay = Replay(inputs, keys, values, [call] * num_layers, images, heads,
                        recorded[2 * num_layers + 1:] if record_heads else None)
        data = adapter.cached_prompt(batch, keys, values, latents, media_locations)
        return PrefixState(data={**data, "minimal": replay}, batch_size=len(batch), base_logits=out.logits[:, -1])

    def _image_keys(self, index: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s cross-attention keys and values ``(P, heads, n, dh)`` of ``latents``."""
        attn = self.adapter.blocks[index].gated_cross_attn_layer.attn
        k, v = attn.to_kv(latents).chunk(2, dim=-1)
        return (rearrange(k, "p n (h d) -> p h n d", h=attn.heads), rearrange(v, "p n (h d) -> p h n d", h=attn.heads))

    def layer(self, replay: Replay, index: int, x: torch.Tensor, joining: int = 0) -> torch.Tensor:
        """Rows joining here (fast AIE) start from the recorded input of the decoder layer (after
        the cross-attention) and skip the attention whose output the head site overwrites: only
        the output projection, residual and MLP run for them."""
        kept = x.shape[1] - joining
        layer = self.adapter.blocks[index]
        x = x[:, :kept]
        if attends_image(self.kinds[index]):
            x = self._cross_attention(replay, index, x)
        heads_out = self._self_attention(replay, index, x)
        if joining:
            x = torch.cat([x, replay.attention_inputs[index][:, None].expand(-1, joining, -1)], dim=1)
            # The joining rows' head outputs are written at the head site: zeros stand in until then.
            heads_out = torch.cat([heads_out, heads_out.new_zeros(x.shape[0], joining, heads_out.shape[-1])], dim=1)
        decoder = layer.decoder_layer
        attn_out = decoder.attention.dense(heads_out)  # the head site, a module call (fast AIE writes through it)
        if decoder.use_parallel_residual:
            return decoder.mlp(decoder.post_attention_layernorm(x)) + attn_out + x
        attn_out = attn_out + x
        return decoder.mlp(decoder.post_attention_layernorm(attn_out)) + attn_out

    def _cross_attention(self, replay: Replay, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s gated cross-attention block over the latest image's keys and values."""
        block = self.adapter.blocks[index].gated_cross_attn_layer
        attn = block.attn
        q = rearrange(attn.to_q(attn.norm(x)), "p m (h d) -> p m h d", h=attn.heads) * attn.scale
        k, v = replay.images[index]
        weights = torch.einsum("pmhd,phnd->pmhn", q, k).softmax(dim=-1)
        out = rearrange(torch.einsum("pmhn,phnd->pmhd", weights, v), "p m h d -> p m (h d)")
        x = attn.to_out(out) * block.attn_gate.tanh() + x
        return block.ff(x) * block.ff_gate.tanh() + x

    def _self_attention(self, replay: Replay, index: int, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs ``(P, M, heads * hs)`` of layer ``index``'s decoder for rows ``x``:
        each row attends to its prompt's cached keys and values and to its own key."""
        decoder = self.adapter.blocks[index].decoder_layer
        attention = decoder.attention
        heads, size = self.adapter.num_heads, attention.head_size
        call = replay.calls[index]
        cos, sin = (t[:, :, None] for t in call["position_embeddings"])  # (P, 1, 1, rot): every row, every head
        qkv = attention.query_key_value(decoder.input_layernorm(x)).view(*x.shape[:2], heads, 3 * size)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = torch.einsum("pmhd,phsd->pmhs", q, replay.keys[index]) * attention.scaling + call["attention_mask"]
        own = (q * k).sum(-1, keepdim=True) * attention.scaling
        weights = torch.cat([scores, own], dim=-1).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        heads_out = torch.einsum("pmhs,phsd->pmhd", weights[..., :-1], replay.values[index]) + weights[..., -1:] * v
        return heads_out.reshape(*x.shape[:2], heads * size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        lang = self.adapter.model.lang_encoder
        return lang.get_output_embeddings()(lang.gpt_neox.final_layer_norm(x))
