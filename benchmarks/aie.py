"""Reference vs fast AIE on the same prompts and model, side by side.

    python benchmarks/aie.py --json runs/bench/aie.json [--layers 8 --heads 16 --hidden 512 --shots 4]

Prints and writes ``{"speedup", "max_abs_diff", "heads_per_second", ...}``. The
reference runs one full forward per (prompt, layer, head) as the published scripts do;
the fast algorithm caches the prefix and recomputes only the last position. With
``--paper-projection`` it also projects the paper's workload
(1000 prompts x 4 relations x 1024 heads) from the measured per-head costs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.objects import all_object_names
from mfv.data.synthetic import generate_split
from mfv.method.aie import indirect_effects, mean_head_activations
from mfv.models.openflamingo import TinyFlamingoConfig, build_tiny_openflamingo

RELATIONS = ["above", "below", "left", "right"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="runs/bench/aie.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2, help="corrupted prompts (the reference is slow)")
    parser.add_argument("--rows-per-pass", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    config = TinyFlamingoConfig(
        words=all_object_names(), image_size=args.image_size, patch_size=8, vision_width=128, vision_layers=2,
        vision_head_width=32, perceiver_depth=2, perceiver_latents=16, perceiver_heads=4, perceiver_dim_head=32,
        xattn_heads=4, xattn_dim_head=32, cross_attn_every_n_layers=2, hidden_size=args.hidden,
        num_layers=args.layers, num_heads=args.heads, intermediate_size=4 * args.hidden,
    )
    adapter = build_tiny_openflamingo(config)
    adapter.model.to(args.device, getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        split = generate_split(tmp, "eval", 32, image_size=args.image_size, workers=1, progress=False)
        sampler = EpisodeSampler(read_scenes(split), RELATIONS, shots=args.shots, seed=0)
        clean = encode_episodes(adapter, [sampler.episode(i, "clean") for i in range(8)], RELATIONS)
        corrupted = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(args.prompts)], RELATIONS)
    means = mean_head_activations(adapter, [clean], 4, progress=False).means

    def timed(algorithm: str) -> tuple[torch.Tensor, float]:
        indirect_effects(adapter, corrupted, means, algorithm, rows_per_pass=args.rows_per_pass)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        effects = indirect_effects(adapter, corrupted, means, algorithm, rows_per_pass=args.rows_per_pass)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return effects, time.perf_counter() - start

    fast, fast_seconds = timed("fast")
    reference, reference_seconds = timed("reference")
    sites = args.prompts * args.layers * args.heads
    result = {
        "model": {"layers": args.layers, "heads": args.heads, "hidden": args.hidden, "shots": args.shots,
                  "sequence_length": int(corrupted.prompts.input_ids.shape[1]), "images_per_prompt": args.shots + 1},
        "device": args.device,
        "prompts": args.prompts,
        "patched_heads": sites,
        "reference_seconds": reference_seconds,
        "fast_seconds": fast_seconds,
        "speedup": reference_seconds / fast_seconds,
        "max_abs_diff": float((fast - reference).abs().max()),
        "heads_per_second": sites / fast_seconds,
        "reference_heads_per_second": sites / reference_seconds,
    }
    paper_sites = 1000 * 4 * 1024
    result["paper_workload_projection_hours"] = {
        "fast": paper_sites / result["heads_per_second"] / 3600,
        "reference": paper_sites / result["reference_heads_per_second"] / 3600,
        "note": "1000 prompts x 4 relations x 1024 heads at this model size and device",
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
