"""Fine-tuning epochs from the prompt store vs recomputing every prompt, at 4B shapes.

    python benchmarks/prompt_store.py --json benchmarks/results/prompt_store.json

Qwen3-VL-4B-Instruct and OpenFlamingo-4B at full width (hidden size, heads, KV heads,
head_dim, MLP, vocabulary; a Qwen prompt carries the image tokens of the paper's pixel budget,
an OpenFlamingo prompt a 224 px image through the resampler's 64 latents) and reduced depth
(``--layers`` decoder layers, the FV injected after the middle one; vision towers cut in the
same proportion), random weights, bf16 where the CPU multiplies bf16 natively, else fp32.

Both loops train the same FVs on the same zero-shot prompts (forward, cross-entropy on the
first answer token, backward, Adam), each epoch in its own shuffled order, inside the
backbone's image store as fine-tuning runs (OpenFlamingo keeps its resampler latents). The
store's first epoch fills it; the epochs after it are timed side by side with recomputing
epochs in the same process: CPU seconds of this process (``--threads``, default 1) and wall
seconds. Batches are collated before the clock starts (the same work in both loops).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mfv.data.episodes import EncodedBatch, EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.io import atomic_write_text
from mfv.steering import Injection, steered_logits
from mfv.training.prompt_store import PromptStore

RELATIONS = ["above", "below", "left", "right"]
OPENFLAMINGO_4B = dict(image_size=224, patch_size=14, vision_width=1024, vision_head_width=64, perceiver_depth=6,
                       perceiver_latents=64, perceiver_heads=8, perceiver_dim_head=64, xattn_heads=8, xattn_dim_head=64,
                       xattn_ff_mult=4, cross_attn_every_n_layers=2, hidden_size=2560, num_heads=32,
                       intermediate_size=10240, max_position_embeddings=2048)
OPENFLAMINGO_4B_VOCAB = 50280  # RedPajama-INCITE-3B's tokenizer with OpenFlamingo's two tokens
FULL_DEPTH = {"qwen3vl": (36, 24), "openflamingo": (32, 24)}  # (decoder layers, vision layers)


def native_bf16() -> bool:
    """Whether the CPU has a bf16 dot-product unit (AVX512-BF16 or AMX)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def build(family: str, layers: int, vision_layers: int, dtype: torch.dtype):
    """A random backbone of ``family`` at 4B width, built directly in ``dtype``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if family == "qwen3vl":
            from transformers import Qwen3VLConfig

            from mfv.models.families import qwen3vl
            from mfv.models.families.layouts import QWEN3VL_4B_INSTRUCT
            from mfv.models.hf import random_model

            config = copy.deepcopy(QWEN3VL_4B_INSTRUCT)
            config["text_config"]["num_hidden_layers"] = layers
            config["vision_config"]["depth"] = vision_layers
            # The release's deepstack taps (5, 11, 17 of 24) at the same fractions of the cut tower.
            config["vision_config"]["deepstack_visual_indexes"] = [round(i * vision_layers / 24) for i in (5, 11, 17)]
            processor = qwen3vl.stand_in_processor(min_pixels=qwen3vl.PAPER_MAX_PIXELS,
                                                   max_pixels=qwen3vl.PAPER_MAX_PIXELS)
            return random_model(qwen3vl.FAMILY, Qwen3VLConfig(**config, **qwen3vl.token_ids(processor.tokenizer)),
                                processor)
        from mfv.models.openflamingo import random_openflamingo

        adapter = random_openflamingo(num_layers=layers, vision_layers=vision_layers, **OPENFLAMINGO_4B)
        adapter.model.lang_encoder.resize_token_embeddings(OPENFLAMINGO_4B_VOCAB, mean_resizing=False)
        adapter.freeze()
        return adapter
    finally:
        torch.set_default_dtype(default)


def lm_head_rows(adapter) -> int:
    return getattr(adapter.model, "lang_encoder", adapter.model).get_output_embeddings().weight.shape[0]


def epoch_batches(adapter, episodes, batch_size: int, seed: int) -> list[EncodedBatch]:
    order = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(seed)).tolist()
    return [encode_episodes(adapter, [episodes[i] for i in rows], RELATIONS, rows)
            for rows in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]


class Loop:
    """One fine-tuning loop (its own FVs and Adam), from the store or recomputing."""

    def __init__(self, adapter, layer: int, store: PromptStore | None) -> None:
        self.adapter, self.layer, self.store = adapter, layer, store
        self.fvs = torch.nn.Parameter(torch.zeros(len(RELATIONS), adapter.hidden_size))
        self.optimizer = torch.optim.Adam([self.fvs], lr=1e-2)
        self.images: dict = {}

    def epoch(self, batches: list[EncodedBatch]) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            injection = Injection.at(self.layer, self.fvs[batch.relation_ids])
            with self.adapter.reuse_context(self.images):
                logits = (steered_logits(self.adapter, batch.prompts, injection) if self.store is None
                          else self.store.logits(self.adapter, batch, injection, "train"))
            loss = torch.nn.functional.cross_entropy(logits.float(), batch.answer_ids)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def measure(family: str, depth: int, args: argparse.Namespace, episodes, dtype: torch.dtype) -> dict:
    full_layers, full_vision = FULL_DEPTH[family]
    vision_layers = max(1, round(full_vision * depth / full_layers))
    adapter = build(family, depth, vision_layers, dtype)
    layer = depth // 2 - 1  # after the middle layer: the upper half replays
    epochs = [epoch_batches(adapter, episodes, args.batch_size, seed) for seed in range(args.epochs)]
    store = PromptStore(args.store_gb)
    stored, recomputed = Loop(adapter, layer, store), Loop(adapter, layer, None)
    first = {"store": stored.epoch(epochs[0]), "recompute": recomputed.epoch(epochs[0])}
    later: dict[str, list[dict[str, float]]] = {"store": [], "recompute": []}
    for batches in epochs[1:]:  # side by side, alternating
        later["store"].append(stored.epoch(batches))
        later["recompute"].append(recomputed.epoch(batches))
    fv_gap = float((stored.fvs - recomputed.fvs).detach().abs().max())

    def median(name: str, key: str) -> float:
        return round(statistics.median(e[key] for e in later[name]), 3)

    result = {
        "shape": {"decoder_layers": depth, "of_full_depth": full_layers, "vision_layers": vision_layers,
                  "of_full_vision_depth": full_vision, "hidden_size": adapter.hidden_size,
                  "heads": adapter.num_heads, "head_dim": adapter.head_dim,
                  "vocabulary": lm_head_rows(adapter),
                  "injection_after_layer": layer},
        "prompt_tokens": [int(b.prompts.attention_mask.sum(-1).float().mean()) for b in epochs[0]],
        "store_bytes_per_prompt": store.used // max(1, len(store)),
        "prompts_stored": len(store),
        "prompt_passes_store_loop": store.recomputed,
        "first_epoch": {k: {m: round(v, 3) for m, v in e.items()} for k, e in first.items()},
        "later_epochs": later,
        "s_per_epoch_after_first": {name: {"cpu": median(name, "cpu_s"), "wall": median(name, "wall_s")}
                                    for name in later},
        "max_fv_difference": fv_gap,
    }
    result["speedup_cpu"] = round(result["s_per_epoch_after_first"]["recompute"]["cpu"]
                                  / result["s_per_epoch_after_first"]["store"]["cpu"], 1)
    result["speedup_wall"] = round(result["s_per_epoch_after_first"]["recompute"]["wall"]
                                   / result["s_per_epoch_after_first"]["store"]["wall"], 1)
    return result


def extrapolate(family: str, depths: dict[int, dict]) -> dict | None:
    """CPU seconds per epoch of both loops fitted linearly in depth (prompt pass, vision tower and
    replayed layers all scale with it; the LM head and embeddings do not) and read at full depth."""
    if len(depths) < 2:
        return None
    xs = sorted(depths)
    out = {}
    for name in ("store", "recompute"):
        ys = [depths[x]["s_per_epoch_after_first"][name]["cpu"] for x in xs]
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
        out[name] = round(ys[0] + slope * (FULL_DEPTH[family][0] - xs[0]), 2)
    return {"from_depths": xs, "cpu_s_per_epoch_at_full_depth": out, "full_depth": FULL_DEPTH[family][0],
            "speedup_cpu": round(out["recompute"] / out["store"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="runs/bench/prompt_store.json")
    parser.add_argument("--families", nargs="+", default=["qwen3vl", "openflamingo"], choices=list(FULL_DEPTH))
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8],
                        help="decoder layers (full width, reduced depth); two or more also extrapolate to full depth")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="the 4B configs' data.batch_size")
    parser.add_argument("--epochs", type=int, default=3, help="the first fills the store; the others are timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store-gb", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        split = generate_split(tmp, "train", args.prompts, image_size=256, workers=1, progress=False)
        sampler = EpisodeSampler(read_scenes(split), RELATIONS, shots=0)
        episodes = [sampler.draw(i, "zero_shot") for i in range(args.prompts)]
        result = {
            "what": "seconds per fine-tuning epoch after the first: from the prompt store vs recomputing every prompt",
            "dtype": str(dtype).removeprefix("torch."), "native_bf16": native_bf16(), "threads": args.threads,
            "weights": "random", "prompts": args.prompts, "batch_size": args.batch_size, "epochs": args.epochs,
            "store_gb": args.store_gb,
            "families": {},
        }
        for family in args.families:
            depths = {depth: measure(family, depth, args, episodes, dtype) for depth in args.layers}
            for depth, entry in depths.items():
                print(f"{family} at {depth} layers: {entry['speedup_cpu']}x CPU time per epoch after the first "
                      f"({entry['s_per_epoch_after_first']['recompute']['cpu']} s recomputing vs "
                      f"{entry['s_per_epoch_after_first']['store']['cpu']} s from the store), "
                      f"{entry['speedup_wall']}x wall", flush=True)
            full = extrapolate(family, depths)
            if full:
                print(f"{family} extrapolated to {full['full_depth']} layers: {full['speedup_cpu']}x CPU time",
                      flush=True)
            result["families"][family] = {"depths": {str(d): e for d, e in depths.items()}, "full_depth_estimate": full}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
