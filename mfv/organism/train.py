"""Train the model organism: a small OpenFlamingo that infers spatial relations in context.

    python -m mfv.organism.train --out checkpoints/organism [--steps 12000] [--resume]

Built from the real open_flamingo / open_clip / transformers classes (small ViT, perceiver
resampler, gated cross-attention before every GPT-NeoX block). Curriculum:

1. *grounding*: single-image and multi-image prompts that name the relation,
   ``<image>Q:{anchor} {relation}. A:{object}.`` — teaches the vision path and the
   cross-attention to find "the object {relation} of {anchor}";
2. *in context* (mixed with 1 from ``--icl-from`` on): the paper's prompts, relation never
   stated, ``<image>Q:{anchor}. A:{object}.<|endofchunk|>`` x N then the query; loss on every
   answer after the first demonstration.

Only the four cardinal relations are ever trained; the diagonal relations and the held-out
objects are never seen. Evaluation uses the paper's prompts only. Progress (learning
curves) goes to ``OUT/curves.jsonl`` and TensorBoard; ``OUT/state.pt`` resumes a run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from mfv.data.episodes import Scene, read_scenes
from mfv.data.objects import all_object_names
from mfv.data.synthetic import RELATIONS, generate_split
from mfv.models.openflamingo import CLIP_MEAN, CLIP_STD, OpenFlamingoAdapter, TinyFlamingoConfig, build_tiny_openflamingo

CARDINAL = list(RELATIONS)


def organism_config(image_size: int = 64) -> TinyFlamingoConfig:
    """The organism's sizes (about 2 M parameters)."""
    return TinyFlamingoConfig(
        words=all_object_names() + CARDINAL,
        image_size=image_size,
        patch_size=8,
        vision_width=64,
        vision_layers=2,
        vision_head_width=32,
        perceiver_depth=1,
        perceiver_latents=64,  # one per 8x8 patch: the auxiliary loss makes them spatial slots
        perceiver_heads=4,
        perceiver_dim_head=32,
        xattn_heads=4,
        xattn_dim_head=32,
        xattn_ff_mult=2,
        cross_attn_every_n_layers=1,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=512,
        gate_init=1.0,
        seed=0,
    )


class ScenePool:
    """Scenes with their images preprocessed into one in-memory tensor, and per-patch
    object labels (which object covers each patch centre; the last class is background)."""

    def __init__(self, scenes: list[Scene], image_size: int, split_dir: Path | None = None, patch: int = 8) -> None:
        self.scenes = scenes
        self.patch_labels = None
        if split_dir is not None:
            import pandas as pd

            names = {n: i for i, n in enumerate(all_object_names())}
            grid = image_size // patch
            centres = (torch.arange(grid) * patch + patch / 2).float()
            labels = torch.full((len(scenes), grid, grid), len(names), dtype=torch.long)
            table = pd.read_parquet(Path(split_dir) / "metadata.parquet")
            order = {"anchor": 0, "distractor": 9}
            for image_id, rows in table.groupby("image_id", sort=True):
                if image_id >= len(scenes):
                    break
                rows = rows.assign(rank=rows.role.map(lambda r: order.get(r, 1))).sort_values("rank")
                for row in rows.itertuples():  # paste order: later objects cover earlier ones
                    ys = (centres >= row.y0) & (centres < row.y1)
                    xs = (centres >= row.x0) & (centres < row.x1)
                    labels[image_id][ys[:, None] & xs[None, :]] = names[row.name]
            self.patch_labels = labels.flatten(1)
            # For the anchor's patches: the objects above, below, left and right of it.
            background = len(names)
            neighbour_labels = torch.full((len(scenes), grid * grid, len(CARDINAL)), background, dtype=torch.long)
            for index, scene in enumerate(scenes):
                anchor_patches = self.patch_labels[index] == names[scene.anchor]
                for k, relation in enumerate(CARDINAL):
                    neighbour_labels[index, anchor_patches, k] = names[scene.neighbours[relation]]
            self.neighbour_labels = neighbour_labels
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        images = np.stack([np.asarray(Image.open(s.image_path).convert("RGB").resize((image_size, image_size)))
                           for s in scenes])
        self.images = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255) - mean) / std

    def __len__(self) -> int:
        return len(self.scenes)


def encode_vision_with_grad(model: torch.nn.Module, vision_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_flamingo's ``_encode_vision_x`` without its ``no_grad`` (the organism trains its ViT).

    Returns the ViT patch tokens ``(b*T, patches, d)`` and the resampler latents
    ``(b, T, latents, d)`` for the auxiliary losses.
    """
    b, t, f = vision_x.shape[:3]
    x = rearrange(vision_x, "b T F c h w -> (b T F) c h w")
    tokens = model.vision_encoder(x)[1]
    x = rearrange(tokens, "(b T F) v d -> b T F v d", b=b, T=t, F=f)
    x = model.perceiver(x)
    for layer in model.lang_encoder._get_decoder_layers():
        layer.condition_vis_x(x)
    return tokens, x


def build_sequence(examples: list[tuple[int, str, str]]) -> str:
    """Text of (scene, question, answer) examples in the paper's chunk format."""
    return "\n".join(f"<image>Q:{question}. A:{answer}.<|endofchunk|>" for _, question, answer in examples)


def sample_batch(pool: ScenePool, rng: random.Random, batch_size: int, icl_share: float, max_shots: int):
    """A training batch: texts, image indices, and which answers carry loss.

    Modes: in context (the paper's format, one hidden relation), grounding (relation
    stated: "Q:{anchor} {relation}. A:{object}") and inverse grounding (relation asked:
    "Q:{anchor} {object}. A:{relation}", the skill each demonstration needs).
    """
    texts, image_rows, loss_masks = [], [], []
    for _ in range(batch_size):
        draw = rng.random()
        in_context = draw < icl_share
        inverse = not in_context and draw < icl_share + (1 - icl_share) / 3
        count = rng.randint(2, max_shots + 1) if in_context else rng.randint(1, max_shots + 1)
        relation = rng.choice(CARDINAL)
        examples = []
        for _ in range(count):
            index = rng.randrange(len(pool))
            scene = pool.scenes[index]
            if in_context:
                examples.append((index, scene.anchor, scene.neighbours[relation]))
            else:
                rel = rng.choice(CARDINAL)
                if inverse:
                    examples.append((index, f"{scene.anchor} {scene.neighbours[rel]}", rel))
                else:
                    examples.append((index, f"{scene.anchor} {rel}", scene.neighbours[rel]))
        texts.append(build_sequence(examples))
        image_rows.append([e[0] for e in examples])
        # In context, the first answer is unknowable; every later one is scored.
        loss_masks.append([not (in_context and k == 0) for k in range(count)])
    return texts, image_rows, loss_masks


def answer_positions(input_ids: torch.Tensor, tokenizer) -> list[list[int]]:
    """Indices of every answer token (the token after ``A`` ``:``) per row."""
    a_id = tokenizer.convert_tokens_to_ids("A")
    colon = tokenizer.convert_tokens_to_ids(":")
    positions = []
    for row in input_ids.tolist():
        positions.append([i + 2 for i in range(len(row) - 2) if row[i] == a_id and row[i + 1] == colon])
    return positions


def training_loss(adapter: OpenFlamingoAdapter, pool: ScenePool, texts, image_rows, loss_masks,
                  heads: torch.nn.ModuleDict | None = None) -> torch.Tensor:
    tokens = adapter.tokenizer(texts, return_tensors="pt", padding=True)
    max_images = max(len(r) for r in image_rows)
    pixels = torch.zeros(len(texts), max_images, 1, *pool.images.shape[1:])
    for b, rows in enumerate(image_rows):
        pixels[b, : len(rows), 0] = pool.images[rows]
    model = adapter.model
    tokens_v, latents = encode_vision_with_grad(model, pixels)
    try:
        logits = model.lang_encoder(**adapter._lm_kwargs(tokens["input_ids"], tokens["attention_mask"])).logits
    finally:
        model.lang_encoder.clear_conditioned_layers()
    rows, cols = [], []
    for b, (positions, mask) in enumerate(zip(answer_positions(tokens["input_ids"], adapter.tokenizer), loss_masks)):
        for position, scored in zip(positions, mask):
            if scored:
                rows.append(b)
                cols.append(position)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    loss = torch.nn.functional.cross_entropy(logits[rows_t, cols_t - 1], tokens["input_ids"][rows_t, cols_t])
    if heads is not None:
        # Dense auxiliary supervision: the ViT patch tokens and the resampler latents
        # (latent i <-> patch i) name the object covering their patch; the anchor's
        # latents also name its four neighbours.
        flat_rows = [r for rows_of in image_rows for r in rows_of]
        present = torch.zeros(len(texts), max_images, dtype=torch.bool)
        for b, rows_of in enumerate(image_rows):
            present[b, : len(rows_of)] = True
        patch_tokens = tokens_v.reshape(len(texts), max_images, *tokens_v.shape[1:])[present]
        slots = latents[present]  # (images, latents, d)
        labels = pool.patch_labels[flat_rows]
        ce = torch.nn.functional.cross_entropy
        # Background covers most patches: weight it down so objects drive the loss.
        weight = torch.ones(heads["patch"].out_features)
        weight[-1] = 0.1
        loss = loss + ce(heads["patch"](patch_tokens).flatten(0, 1), labels.flatten(), weight=weight)
        loss = loss + ce(heads["latent"](slots).flatten(0, 1), labels.flatten(), weight=weight)
        neighbour_logits = heads["neighbours"](slots).reshape(*slots.shape[:2], len(CARDINAL), -1)
        neighbours = pool.neighbour_labels[flat_rows]
        on_anchor = neighbours[..., 0] != weight.numel() - 1  # scored on the anchor's patches only
        if on_anchor.any():
            loss = loss + ce(neighbour_logits[on_anchor].flatten(0, 1), neighbours[on_anchor].flatten())
    return loss


@torch.no_grad()
def evaluate_icl(adapter: OpenFlamingoAdapter, pool: ScenePool, shots: int, count: int = 200, seed: int = 1234) -> float:
    """Accuracy on the paper's prompts: ``shots`` demonstrations of one relation, then the query."""
    rng = random.Random(seed)
    correct = 0
    adapter.model.eval()
    batch_texts, batch_rows, batch_answers = [], [], []

    def flush() -> int:
        tokens = adapter.tokenizer(batch_texts, return_tensors="pt", padding=True)
        pixels = torch.zeros(len(batch_texts), shots + 1, 1, *pool.images.shape[1:])
        for b, rows in enumerate(batch_rows):
            pixels[b, :, 0] = pool.images[rows]
        from mfv.models.base import PromptBatch

        logits = adapter.forward(PromptBatch(tokens["input_ids"], tokens["attention_mask"], pixels))
        return int((logits.argmax(-1) == torch.tensor(batch_answers)).sum())

    for i in range(count):
        relation = CARDINAL[i % 4]
        indices = rng.sample(range(len(pool)), shots + 1)
        demos = [(j, pool.scenes[j].anchor, pool.scenes[j].neighbours[relation]) for j in indices[:-1]]
        query = pool.scenes[indices[-1]]
        text = build_sequence(demos)
        text = (text + "\n" if text else "") + f"<image>Q:{query.anchor}. A:"
        batch_texts.append(text)
        batch_rows.append(indices)
        batch_answers.append(adapter.tokenizer.convert_tokens_to_ids(query.neighbours[relation]))
        if len(batch_texts) == 50:
            correct += flush()
            batch_texts, batch_rows, batch_answers = [], [], []
    if batch_texts:
        correct += flush()
    adapter.model.train()
    return correct / count


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.organism.train")
    parser.add_argument("--out", default="checkpoints/organism")
    parser.add_argument("--work", default="data/organism", help="scene pools and training state")
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--icl-from", type=int, default=1500, help="step at which in-context episodes start")
    parser.add_argument("--icl-share", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-shots", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=12000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train_dir = work / f"pool-train-{args.image_size}-{args.pool_size}"
    heldout_dir = work / f"pool-heldout-{args.image_size}"
    if not (train_dir / "train" / "metadata.parquet").is_file():
        generate_split(train_dir, "train", args.pool_size, args.image_size, seed=101)
    if not (heldout_dir / "test" / "metadata.parquet").is_file():
        generate_split(heldout_dir, "test", 1000, args.image_size, seed=202)
    pool = ScenePool(read_scenes(train_dir / "train"), args.image_size, train_dir / "train")
    heldout = ScenePool(read_scenes(heldout_dir / "test"), args.image_size)

    config = organism_config(args.image_size)
    adapter = build_tiny_openflamingo(config, backbone_id="openflamingo-organism")
    model = adapter.model
    model.requires_grad_(True)
    model.train()
    # Training-only heads (not saved with the model).
    classes = len(all_object_names()) + 1
    heads = torch.nn.ModuleDict({
        "patch": torch.nn.Linear(config.vision_width, classes),
        "latent": torch.nn.Linear(config.vision_width, classes),
        "neighbours": torch.nn.Linear(config.vision_width, len(CARDINAL) * classes),
    })
    parameters = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    warmup = 300

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    state_path = work / "state.pt"
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step}")
    rng = random.Random(args.seed * 1_000_003 + step)
    torch.manual_seed(args.seed + step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = (work / "curves.jsonl").open("a")
    started = time.time()
    running = None
    while step < args.steps:
        icl_share = args.icl_share if step >= args.icl_from else 0.0
        texts, rows, masks = sample_batch(pool, rng, args.batch_size, icl_share, args.max_shots)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = training_loss(adapter, pool, texts, rows, masks, heads)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            record = {
                "step": step,
                "loss": running,
                "lr": lr_at(step),
                "seconds": time.time() - started,
                "icl_4": evaluate_icl(adapter, heldout, 4),
                "icl_1": evaluate_icl(adapter, heldout, 1),
                "zero_shot": evaluate_icl(adapter, heldout, 0),
            }
            print(json.dumps(record), flush=True)
            curves.write(json.dumps(record) + "\n")
            curves.flush()
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step}, tmp)
            tmp.replace(state_path)
    model.eval()
    adapter.freeze()
    adapter.save(out)
    (out / "training.json").write_text(json.dumps({"args": vars(args), "config": asdict(config),
                                                  "seconds": time.time() - started}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
