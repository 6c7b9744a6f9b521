"""Train the model organism: a small OpenFlamingo that infers spatial relations in context.

The committed ``checkpoints/organism`` came from (the second command resumes the first's state)::

    python -m mfv.organism.train --steps 5000 --stop-at 2000
    python -m mfv.organism.train --steps 5000 --score-first-from 2000 --stop-at 2500

Built from the real open_flamingo / open_clip / transformers classes (small ViT, perceiver
resampler, gated cross-attention before every GPT-NeoX block). Each batch mixes in-context
rows (the paper's prompts, relation never stated, from ``--icl-from`` on), grounding rows
(``Q:{anchor} {relation}. A:{object}``) and inverse-grounding rows
(``Q:{anchor} {object}. A:{relation}``); see :func:`sample_batch`. Training-only auxiliary
losses (:func:`training_loss`) make the resampler latents name each object and its role
in the scene and ask the residual stream for the relation at demonstrations and queries.

Only the four cardinal relations are ever trained; the diagonal relations and the held-out
objects are never seen. Evaluation uses the paper's prompts only. Learning curves go to
``WORK/curves.jsonl``; ``WORK/state.pt`` (saved at every evaluation) resumes a run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from mfv.data.episodes import Scene, read_scenes
from mfv.data.objects import all_object_names
from mfv.data.synthetic import RELATIONS, generate_split
from mfv.models.openflamingo import (
    CLIP_MEAN, CLIP_STD, OpenFlamingoAdapter, TinyFlamingoConfig, build_tiny_openflamingo, save_tiny_openflamingo)

CARDINAL = list(RELATIONS)
# What an object is in its scene; the patch-role auxiliary loss teaches the resampler
# latents to carry it, so one cross-attention hop answers "which relation does X stand in".
ROLES = ("anchor", *CARDINAL, "distractor")


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
    """Scenes with their images preprocessed into one in-memory tensor, and per-patch labels:
    which object covers each patch centre, and its role in the scene (anchor, the relation
    it stands in to the anchor, or distractor); the last class of each is background."""

    def __init__(self, scenes: list[Scene], image_size: int, split_dir: Path | None = None, patch: int = 8) -> None:
        self.scenes = scenes
        self.patch_labels = None
        self.role_labels = None
        if split_dir is not None:
            import pandas as pd

            names = {n: i for i, n in enumerate(all_object_names())}
            grid = image_size // patch
            centres = (torch.arange(grid) * patch + patch / 2).float()
            labels = torch.full((len(scenes), grid, grid), len(names), dtype=torch.long)
            roles = torch.full((len(scenes), grid, grid), len(ROLES), dtype=torch.long)
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
                    roles[image_id][ys[:, None] & xs[None, :]] = ROLES.index(row.role)
            self.patch_labels = labels.flatten(1)
            self.role_labels = roles.flatten(1)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        images = np.stack([np.asarray(Image.open(s.image_path).convert("RGB").resize((image_size, image_size)))
                           for s in scenes])
        self.images = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255) - mean) / std

    def __len__(self) -> int:
        return len(self.scenes)

    def to(self, device: torch.device) -> "ScenePool":
        """Moves the image and label tensors to ``device`` (training samples index them there)."""
        self.images = self.images.to(device)
        if self.patch_labels is not None:
            self.patch_labels = self.patch_labels.to(device)
            self.role_labels = self.role_labels.to(device)
        return self


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


@dataclass
class TrainingBatch:
    """Texts, the scene of every image per row, and per answer: scored or not, and the
    relation its object stands in to the anchor (-1 where no relation applies)."""

    texts: list[str]
    image_rows: list[list[int]]
    scored: list[list[bool]]
    answer_relations: list[list[int]]
    in_context: list[bool]


def sample_batch(pool: ScenePool, rng: random.Random, batch_size: int, icl_share: float,
                 max_shots: int, inverse_share: float = 0.1, score_first: bool = False) -> TrainingBatch:
    """A training batch mixing three kinds of rows.

    * in context (share ``icl_share``): the paper's format, one hidden relation for the
      whole row, 2..max_shots+1 images; every answer after the first carries loss, and
      with ``score_first`` the first too (it cannot be known, so the model learns the
      zero-shot prior "some neighbour of the anchor" instead of an arbitrary token);
    * grounding: the relation stated, ``Q:{anchor} {relation}. A:{object}``;
    * inverse grounding (share ``inverse_share``): ``Q:{anchor} {object}. A:{relation}``.
    """
    batch = TrainingBatch([], [], [], [], [])
    for _ in range(batch_size):
        draw = rng.random()
        in_context = draw < icl_share
        inverse = not in_context and draw < icl_share + inverse_share
        count = rng.randint(2, max_shots + 1) if in_context else rng.randint(1, max_shots + 1)
        relation = rng.choice(CARDINAL)
        examples, relations = [], []
        for _ in range(count):
            index = rng.randrange(len(pool))
            scene = pool.scenes[index]
            rel = relation if in_context else rng.choice(CARDINAL)
            if inverse:
                examples.append((index, f"{scene.anchor} {scene.neighbours[rel]}", rel))
                relations.append(-1)
            elif in_context:
                examples.append((index, scene.anchor, scene.neighbours[rel]))
                relations.append(CARDINAL.index(rel))
            else:
                examples.append((index, f"{scene.anchor} {rel}", scene.neighbours[rel]))
                relations.append(CARDINAL.index(rel))
        batch.texts.append(build_sequence(examples))
        batch.image_rows.append([e[0] for e in examples])
        # In context, the first answer is unknowable; every later one is scored.
        batch.scored.append([score_first or not (in_context and k == 0) for k in range(count)])
        batch.answer_relations.append(relations)
        batch.in_context.append(in_context)
    return batch


def answer_positions(input_ids: torch.Tensor, tokenizer) -> list[list[int]]:
    """Indices of every answer token (the token after ``A`` ``:``) per row."""
    a_id = tokenizer.convert_tokens_to_ids("A")
    colon = tokenizer.convert_tokens_to_ids(":")
    positions = []
    for row in input_ids.tolist():
        positions.append([i + 2 for i in range(len(row) - 2) if row[i] == a_id and row[i + 1] == colon])
    return positions


def training_heads(config: TinyFlamingoConfig) -> torch.nn.ModuleDict:
    """Linear read-outs used only by the auxiliary losses (never saved with the model)."""
    classes = len(all_object_names()) + 1
    return torch.nn.ModuleDict({
        "patch": torch.nn.Linear(config.vision_width, classes),
        "latent": torch.nn.Linear(config.vision_width, classes),
        "role": torch.nn.Linear(config.vision_width, len(ROLES) + 1),
        "demo_relation": torch.nn.Linear(config.hidden_size, len(CARDINAL)),
        "query_relation": torch.nn.Linear(config.hidden_size, len(CARDINAL)),
    })


def probe_layers(num_layers: int) -> tuple[int, int]:
    """Residual-stream indices (0 = embeddings, i = output of block i-1) where the relation
    probes read: the demonstrations' answers early, the in-context queries one block later."""
    demo = max(1, num_layers // 2 - 1)
    return demo, demo + 1


def training_loss(adapter: OpenFlamingoAdapter, pool: ScenePool, batch: TrainingBatch,
                  heads: torch.nn.ModuleDict | None = None, aux_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Answer cross-entropy plus, with ``heads``, the auxiliary losses.

    Auxiliary (dense, training-only) supervision: ViT patch tokens and resampler latents
    (latent i <-> patch i) name the object covering their patch and its role in the scene;
    the residual stream at each answer names the relation its object stands in (demo
    probe), and at each in-context query (the ``:`` before a scored answer) one block
    later it names the row's hidden relation (query probe) — the read-out that ICL needs.
    """
    device = adapter.device
    tokens = adapter.tokenizer(batch.texts, return_tensors="pt", padding=True).to(device)
    max_images = max(len(r) for r in batch.image_rows)
    pixels = torch.zeros(len(batch.texts), max_images, 1, *pool.images.shape[1:], device=device)
    for b, rows in enumerate(batch.image_rows):
        pixels[b, : len(rows), 0] = pool.images[rows]
    model = adapter.model
    tokens_v, latents = encode_vision_with_grad(model, pixels)
    try:
        out = model.lang_encoder(**adapter._lm_kwargs(tokens["input_ids"], tokens["attention_mask"]),
                                 output_hidden_states=heads is not None)
    finally:
        model.lang_encoder.clear_conditioned_layers()
    logits = out.logits
    rows, cols, probe_rows, probe_cols, probe_labels, query_flags = [], [], [], [], [], []
    positions_per_row = answer_positions(tokens["input_ids"].cpu(), adapter.tokenizer)
    for b, positions in enumerate(positions_per_row):
        for k, position in enumerate(positions):
            if batch.scored[b][k]:
                rows.append(b)
                cols.append(position)
            if batch.answer_relations[b][k] >= 0:
                probe_rows.append(b)
                probe_cols.append(position)
                probe_labels.append(batch.answer_relations[b][k])
                query_flags.append(batch.in_context[b] and k > 0)
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    answer_loss = torch.nn.functional.cross_entropy(logits[rows_t, cols_t - 1], tokens["input_ids"][rows_t, cols_t])
    parts = {"answer": float(answer_loss.detach())}
    if heads is None:
        return answer_loss, parts
    ce = torch.nn.functional.cross_entropy
    flat_rows = [r for rows_of in batch.image_rows for r in rows_of]
    present = torch.zeros(len(batch.texts), max_images, dtype=torch.bool, device=device)
    for b, rows_of in enumerate(batch.image_rows):
        present[b, : len(rows_of)] = True
    patch_tokens = tokens_v.reshape(len(batch.texts), max_images, *tokens_v.shape[1:])[present]
    slots = latents[present]  # (images, latents, d)
    labels = pool.patch_labels[flat_rows]
    roles = pool.role_labels[flat_rows]
    # Background covers most patches: weight it down so objects drive the loss.
    identity_weight = torch.ones(heads["patch"].out_features, device=device)
    identity_weight[-1] = 0.1
    role_weight = torch.ones(heads["role"].out_features, device=device)
    role_weight[-1] = 0.1
    vision = (ce(heads["patch"](patch_tokens).flatten(0, 1), labels.flatten(), weight=identity_weight)
              + ce(heads["latent"](slots).flatten(0, 1), labels.flatten(), weight=identity_weight)
              + ce(heads["role"](slots).flatten(0, 1), roles.flatten(), weight=role_weight))
    demo_layer, query_layer = probe_layers(len(out.hidden_states) - 1)
    p_rows = torch.tensor(probe_rows, device=device)
    p_cols = torch.tensor(probe_cols, device=device)
    p_labels = torch.tensor(probe_labels, device=device)
    demo_probe = ce(heads["demo_relation"](out.hidden_states[demo_layer][p_rows, p_cols]), p_labels)
    loss = answer_loss + aux_weight * (vision + demo_probe)
    parts.update(vision=float(vision.detach()), demo_probe=float(demo_probe.detach()))
    query = torch.tensor(query_flags, device=device)
    if query.any():
        q_hidden = out.hidden_states[query_layer][p_rows[query], p_cols[query] - 1]
        query_probe = ce(heads["query_relation"](q_hidden), p_labels[query])
        loss = loss + aux_weight * query_probe
        parts["query_probe"] = float(query_probe.detach())
    return loss, parts


@torch.no_grad()
def evaluate_icl(adapter: OpenFlamingoAdapter, pool: ScenePool, shots: int, count: int = 200, seed: int = 1234) -> float:
    """Accuracy on the paper's prompts: ``shots`` demonstrations of one relation, then the query."""
    from mfv.models.base import PromptBatch

    rng = random.Random(seed)
    correct = 0
    was_training = adapter.model.training
    adapter.model.eval()
    batch_texts, batch_rows, batch_answers = [], [], []

    def flush() -> int:
        tokens = adapter.tokenizer(batch_texts, return_tensors="pt", padding=True)
        pixels = torch.stack([pool.images[rows] for rows in batch_rows])[:, :, None]
        logits = adapter.forward(PromptBatch(tokens["input_ids"], tokens["attention_mask"], pixels))
        return int((logits.argmax(-1).cpu() == torch.tensor(batch_answers)).sum())

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
        if len(batch_texts) == 100:
            correct += flush()
            batch_texts, batch_rows, batch_answers = [], [], []
    if batch_texts:
        correct += flush()
    adapter.model.train(was_training)
    return correct / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.organism.train")
    parser.add_argument("--out", default="checkpoints/organism")
    parser.add_argument("--work", default="data/organism", help="scene pools, training state, learning curves")
    parser.add_argument("--steps", type=int, default=5000, help="length of the learning-rate schedule")
    parser.add_argument("--icl-from", type=int, default=300, help="step at which in-context rows start")
    parser.add_argument("--icl-share", type=float, default=0.7)
    parser.add_argument("--inverse-share", type=float, default=0.1)
    parser.add_argument("--aux-weight", type=float, default=1.0)
    parser.add_argument("--score-first-from", type=int, default=2000,
                        help="from this step on, the first in-context answer carries loss too")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-shots", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=12000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="end (and export) at this step, keeping the --steps schedule")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (state saved, resumable) after this much wall time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work)
    train_dir = work / f"pool-train-{args.image_size}-{args.pool_size}"
    heldout_dir = work / f"pool-heldout-{args.image_size}"
    if not (train_dir / "train" / "metadata.parquet").is_file():
        generate_split(train_dir, "train", args.pool_size, args.image_size, seed=101)
    if not (heldout_dir / "test" / "metadata.parquet").is_file():
        generate_split(heldout_dir, "test", 1000, args.image_size, seed=202)
    pool = ScenePool(read_scenes(train_dir / "train"), args.image_size, train_dir / "train")
    heldout = ScenePool(read_scenes(heldout_dir / "test"), args.image_size)
    pool.to(device)

    config = organism_config(args.image_size)
    config.num_layers = args.num_layers
    adapter = build_tiny_openflamingo(config, backbone_id="openflamingo-organism")
    model = adapter.model.to(device)
    model.requires_grad_(True)
    model.train()
    torch.manual_seed(config.seed)
    heads = training_heads(config).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    warmup = 300

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    state_path = work / "state.pt"
    step, elapsed = 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("seconds", 0.0)
        print(f"resumed at step {step}")
    rng = random.Random(args.seed * 1_000_003 + step)
    torch.manual_seed(args.seed + step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = (work / "curves.jsonl").open("a")
    started = time.time() - elapsed
    session_start = time.time()
    running: dict[str, float] = {}
    record = None
    while step < args.steps:
        icl_share = args.icl_share if step >= args.icl_from else 0.0
        score_first = args.score_first_from is not None and step >= args.score_first_from
        batch = sample_batch(pool, rng, args.batch_size, icl_share, args.max_shots, args.inverse_share, score_first)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = training_loss(adapter, pool, batch, heads, args.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        parts["loss"] = float(loss.detach())
        for key, value in parts.items():
            running[key] = value if key not in running else 0.98 * running[key] + 0.02 * value
        step += 1
        out_of_time = (args.max_minutes is not None and time.time() - session_start > 60 * args.max_minutes) or (
            args.stop_at is not None and step >= args.stop_at)
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            record = {
                "step": step,
                **{k: round(v, 4) for k, v in running.items()},
                "lr": lr_at(step),
                "seconds": round(time.time() - started, 1),
                "icl_4": evaluate_icl(adapter, heldout, 4, args.eval_count),
                "icl_1": evaluate_icl(adapter, heldout, 1, args.eval_count),
                "zero_shot": evaluate_icl(adapter, heldout, 0, args.eval_count),
            }
            print(json.dumps(record), flush=True)
            curves.write(json.dumps(record) + "\n")
            curves.flush()
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "seconds": time.time() - started}, tmp)
            tmp.replace(state_path)
        if out_of_time:
            print(f"stopped at step {step} (--stop-at / --max-minutes); run again to resume")
            break
    model.eval()
    model.to("cpu")
    adapter.freeze()
    save_tiny_openflamingo(adapter, out)
    (out / "training.json").write_text(json.dumps({
        "args": vars(args), "config": asdict(config), "steps_done": step, "complete": step >= args.steps,
        "seconds": time.time() - started, "device": str(device),
        "torch": torch.__version__, "final": record,
    }, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
