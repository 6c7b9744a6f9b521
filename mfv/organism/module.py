"""The model organism's training recipe as a LightningModule.

A small OpenFlamingo built from the real open_flamingo / open_clip / transformers classes
(ViT, perceiver resampler, gated cross-attention before every GPT-NeoX block), trained from
scratch to infer a spatial relation from image demonstrations in the paper's format.
Training-only auxiliary losses (never saved with the model) make the resampler latents name
each object and its role in the scene, and ask the residual stream for the relation at
demonstrations' answers and at in-context queries. Warm-up, cosine schedule, gradient
clipping, checkpoints, resume and logging are Lightning's.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from einops import rearrange

from mfv.evaluation.scoring import Score
from mfv.models.openflamingo import TinyFlamingoConfig, build_tiny_openflamingo
from mfv.organism.data import CARDINAL, ROLES, VALIDATION, TrainingBatch
from mfv.vocabulary import OBJECT_NAMES

BACKBONE_ID = "openflamingo-organism"


def organism_config(image_size: int = 64, num_layers: int = 8, num_heads: int = 8, hidden_size: int = 128,
                    intermediate_size: int = 512) -> TinyFlamingoConfig:
    """The organism's sizes."""
    return TinyFlamingoConfig(
        words=[*OBJECT_NAMES, *CARDINAL], image_size=image_size, patch_size=8, vision_width=64, vision_layers=2,
        vision_head_width=32, perceiver_depth=1,
        perceiver_latents=(image_size // 8) ** 2,  # one per patch: the auxiliary loss makes them spatial slots
        perceiver_heads=4, perceiver_dim_head=32, xattn_heads=4, xattn_dim_head=32, xattn_ff_mult=2,
        cross_attn_every_n_layers=1, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        intermediate_size=intermediate_size, gate_init=1.0, seed=0,
    )


def probe_layers(num_layers: int) -> tuple[int, int]:
    """Residual-stream indices (0 = embeddings, i = output of block i-1) where the relation
    probes read: the demonstrations' answers early, the in-context queries one block later."""
    demo = max(1, num_layers // 2 - 1)
    return demo, demo + 1


class OrganismModule(L.LightningModule):
    """Trains every weight of a small OpenFlamingo (plus training-only read-outs).

    Args:
        image_size, num_layers, num_heads, hidden_size, intermediate_size: Model sizes.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up.
        total_steps: Length of the cosine schedule (to 5% of ``lr``).
        aux_weight: Weight of the auxiliary losses.
    """

    def __init__(self, image_size: int = 64, num_layers: int = 8, num_heads: int = 8, hidden_size: int = 128,
                 intermediate_size: int = 512, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 300,
                 total_steps: int = 5000, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = organism_config(image_size, num_layers, num_heads, hidden_size, intermediate_size)
        self.adapter = build_tiny_openflamingo(self.config, backbone_id=BACKBONE_ID)
        self.model = self.adapter.model
        self.model.requires_grad_(True)
        self.model.train()  # the builder returns a frozen model in eval mode
        classes = len(OBJECT_NAMES) + 1
        width = self.config.vision_width
        self.heads = torch.nn.ModuleDict({
            "patch": torch.nn.Linear(width, classes), "latent": torch.nn.Linear(width, classes),
            "role": torch.nn.Linear(width, len(ROLES) + 1),
            "demo_relation": torch.nn.Linear(hidden_size, len(CARDINAL)),
            "query_relation": torch.nn.Linear(hidden_size, len(CARDINAL)),
        })
        self._val: dict[int, list[torch.Tensor]] = {}

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.attach(self.adapter)

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)

    def _encode_vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_flamingo's ``_encode_vision_x`` without its ``no_grad`` (the ViT trains here)."""
        b, t, f = pixels.shape[:3]
        tokens = self.model.vision_encoder(rearrange(pixels, "b T F c h w -> (b T F) c h w"))[1]
        latents = self.model.perceiver(rearrange(tokens, "(b T F) v d -> b T F v d", b=b, T=t, F=f))
        for layer in self.model.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(latents)
        return tokens, latents

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> torch.Tensor:
        loss, parts = self.organism_loss(batch)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "answer")
        return loss

    def organism_loss(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer cross-entropy plus the auxiliary losses (see module docstring)."""
        ce = torch.nn.functional.cross_entropy
        prompts = batch.prompts
        tokens, latents = self._encode_vision(prompts.pixel_values.to(self.dtype))
        lang = self.model.lang_encoder
        try:
            out = lang(**self.adapter.lm_inputs(prompts.input_ids, prompts.attention_mask), output_hidden_states=True)
        finally:
            lang.clear_conditioned_layers()
        rows, cols, targets = batch.answers.T
        answer = ce(out.logits[rows, cols], targets)
        present = torch.zeros(prompts.pixel_values.shape[:2], dtype=torch.bool, device=self.device)
        for b, images in enumerate(batch.image_rows):
            present[b, : len(images)] = True
        scenes = [i for images in batch.image_rows for i in images]
        pool = self.trainer.datamodule.pool
        labels = pool.patch_labels[scenes].to(self.device)
        roles = pool.role_labels[scenes].to(self.device)
        patch_tokens = tokens.reshape(*present.shape, *tokens.shape[1:])[present]
        slots = latents[present]  # (images, latents, d)
        # Background covers most patches: weight it down so objects drive the loss.
        weight = torch.ones(len(OBJECT_NAMES) + 1, device=self.device)
        weight[-1] = 0.1
        role_weight = torch.ones(len(ROLES) + 1, device=self.device)
        role_weight[-1] = 0.1
        vision = (ce(self.heads["patch"](patch_tokens).flatten(0, 1), labels.flatten(), weight=weight)
                  + ce(self.heads["latent"](slots).flatten(0, 1), labels.flatten(), weight=weight)
                  + ce(self.heads["role"](slots).flatten(0, 1), roles.flatten(), weight=role_weight))
        demo_layer, query_layer = probe_layers(len(out.hidden_states) - 1)
        parts = {"answer": answer.detach(), "vision": vision.detach()}
        loss = answer + self.hparams.aux_weight * vision
        for name, table, layer in (("demo_probe", batch.demo_probe, demo_layer),
                                   ("query_probe", batch.query_probe, query_layer)):
            if len(table):
                r, c, y = table.T
                probe = ce(self.heads[name.replace("probe", "relation")](out.hidden_states[layer][r, c]), y)
                loss = loss + self.hparams.aux_weight * probe
                parts[name] = probe.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    # ----- validation: the paper's prompts through the production path -------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        correct = (self.adapter.forward(batch.prompts).argmax(-1) == batch.answer_ids).float()
        self._val.setdefault(dataloader_idx, []).append(torch.stack([correct, batch.relation_ids.float()]))

    def on_validation_epoch_end(self) -> None:
        for index, parts in sorted(self._val.items()):
            joined = torch.cat(parts, dim=1).cpu()
            score = Score.from_tensors(CARDINAL, joined[0], joined[1].long())
            self.log(f"val/{VALIDATION[index][0]}", score.accuracy)
        self._val = {}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, total = self.hparams.warmup_steps, self.hparams.total_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
