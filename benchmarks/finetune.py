"""Batched FV fine-tuning vs the published batch-size-1 loop, and backward memory.

    python benchmarks/finetune.py --json runs/bench/finetune.json

Both loops train the same FVs on the same zero-shot prompts (forward, cross-entropy on
the first answer token, backward, Adam step). Memory: bytes autograd saves for backward
when the FV enters after layer L (the graph starts there) vs after layer 0 and vs a
graph through the whole backbone (vision tower and all layers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.hooks import add_to_residual
from mfv.models.openflamingo import random_openflamingo

RELATIONS = ["above", "below", "left", "right"]
TOY = dict(image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_head_width=32,
           hidden_size=128, num_layers=6, num_heads=8, intermediate_size=256)


def step(adapter, fvs, optimizer, batch, layer):
    with add_to_residual(adapter, layer, fvs[batch.relation_ids]):
        logits = adapter.forward(batch.prompts)
    loss = torch.nn.functional.cross_entropy(logits, batch.answer_ids)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def saved_bytes(adapter, batch, layer, full_graph=False) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    fv = torch.zeros(adapter.hidden_size, requires_grad=True)
    adapter.model.requires_grad_(full_graph)
    # open_flamingo runs the vision tower under no_grad; a full graph needs it lifted.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if full_graph:
            vision = adapter.model.vision_encoder(batch.prompts.pixel_values.flatten(0, 2))[1]
        with add_to_residual(adapter, layer, fv):
            logits = adapter.forward(batch.prompts)
        loss = logits.sum() + (vision.sum() if full_graph else 0)
    loss.backward()
    adapter.model.requires_grad_(False)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="runs/bench/finetune.json")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=3)
    args = parser.parse_args()
    adapter = random_openflamingo(**TOY)
    with tempfile.TemporaryDirectory() as tmp:
        split = generate_split(tmp, "train", args.samples, image_size=64, workers=1, progress=False)
        sampler = EpisodeSampler(read_scenes(split), RELATIONS, shots=0)
        episodes = [sampler.draw(i, "zero_shot") for i in range(args.samples)]
        singles = [encode_episodes(adapter, [e], RELATIONS) for e in episodes]
        batches = [encode_episodes(adapter, episodes[i : i + args.batch_size], RELATIONS)
                   for i in range(0, args.samples, args.batch_size)]

    def run(data) -> float:
        fvs = torch.nn.Parameter(torch.zeros(len(RELATIONS), adapter.hidden_size))
        optimizer = torch.optim.Adam([fvs], lr=1e-2)
        step(adapter, fvs, optimizer, data[0], args.layer)  # warm-up
        start = time.perf_counter()
        for batch in data:
            step(adapter, fvs, optimizer, batch, args.layer)
        return args.samples / (time.perf_counter() - start)

    single_rate = run(singles)
    batched_rate = run(batches)
    probe = batches[0]
    memory = {
        "fv_after_layer_L": saved_bytes(adapter, probe, args.layer),
        "fv_after_layer_0": saved_bytes(adapter, probe, 0),
        "whole_backbone_graph": saved_bytes(adapter, probe, args.layer, full_graph=True),
    }
    result = {
        "samples": args.samples,
        "batch_size": args.batch_size,
        "layer": args.layer,
        "num_layers": adapter.num_layers,
        "samples_per_second_batch_size_1": single_rate,
        "samples_per_second_batched": batched_rate,
        "speedup": batched_rate / single_rate,
        "saved_for_backward_bytes": memory,
        "memory_saved_vs_whole_graph": 1 - memory["fv_after_layer_L"] / memory["whole_backbone_graph"],
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
