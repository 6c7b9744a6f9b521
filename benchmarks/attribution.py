"""Attribution patching vs exact AIE: agreement, cost, and the FVs built from each.

    python benchmarks/attribution.py --json runs/bench/attribution.json

One thread, CPU time (``time.process_time``), every ratio measured side by side in one run.
Two shapes: the AIE benchmark's random model (8 layers x 16 heads, hidden 512) and the model
organism (``checkpoints/organism``). Per shape: Spearman rank correlation and top-10 overlap
of the pooled AIE (attribution vs fast exact), and the cost of each algorithm per prompt
(the reference loop on fewer prompts, scaled per prompt). On the organism also the
accuracy, with 95% intervals, of zero-shot + FV built from each method's top-K heads.
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
from mfv.evaluation.scoring import Score
from mfv.steering import Injection, steered_logits
from mfv.method.aie import indirect_effects, mean_head_activations, top_heads
from mfv.method.function_vector import build_function_vector
from mfv.models.openflamingo import load_tiny_openflamingo

from aie import benchmark_model  # the same benchmark shape (run as `python benchmarks/attribution.py`)

RELATIONS = ["above", "below", "left", "right"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(x.flatten())).double()

    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def cpu_seconds(function) -> tuple[object, float]:
    start = time.process_time()
    out = function()
    return out, time.process_time() - start


def measure(adapter, sampler, prompts: int, reference_prompts: int, batch: int = 8) -> dict:
    clean = [encode_episodes(adapter, [sampler.draw(i, "clean") for i in range(s, s + batch)], RELATIONS)
             for s in range(0, 4 * batch, batch)]
    means = mean_head_activations(adapter, clean, 4, progress=False).means
    corrupted = [encode_episodes(adapter, [sampler.draw(i, "corrupted") for i in range(s, min(s + batch, prompts))],
                                 RELATIONS) for s in range(0, prompts, batch)]
    indirect_effects(adapter, corrupted[0], means, "fast")  # warm-up
    exact, fast_s = cpu_seconds(lambda: torch.cat([indirect_effects(adapter, b, means, "fast") for b in corrupted]))
    estimate, attribution_s = cpu_seconds(
        lambda: torch.cat([indirect_effects(adapter, b, means, "attribution") for b in corrupted]))
    one = encode_episodes(adapter, [sampler.draw(i, "corrupted") for i in range(reference_prompts)], RELATIONS)
    reference, reference_s = cpu_seconds(lambda: indirect_effects(adapter, one, means, "reference"))
    per_prompt = {"reference": reference_s / reference_prompts, "fast_exact": fast_s / prompts,
                  "attribution": attribution_s / prompts}
    pooled_exact, pooled_estimate = exact.mean(0), estimate.mean(0)
    top_exact, top_estimate = set(top_heads(pooled_exact, 10)), set(top_heads(pooled_estimate, 10))
    return {
        "layers": adapter.num_layers, "heads": adapter.num_heads, "hidden": adapter.hidden_size, "prompts": prompts,
        "spearman": spearman(pooled_exact, pooled_estimate),
        "top10_overlap": len(top_exact & top_estimate),
        "cpu_seconds_per_prompt": per_prompt,
        "speedup_vs_reference": per_prompt["reference"] / per_prompt["attribution"],
        "speedup_vs_fast_exact": per_prompt["fast_exact"] / per_prompt["attribution"],
        "fast_exact_speedup_vs_reference": per_prompt["reference"] / per_prompt["fast_exact"],
        "reference_check_max_abs_diff": float((reference - exact[:reference_prompts]).abs().max()),
        "_means": means, "_exact": pooled_exact, "_estimate": pooled_estimate,
    }


@torch.no_grad()
def fv_accuracy(adapter, means, aie, k: int, layer: int, sampler, count: int) -> dict:
    heads = top_heads(aie, k)
    vectors = torch.stack([build_function_vector(adapter, means[r], heads) for r in range(len(RELATIONS))])
    outcomes, relations = [], []
    for start in range(0, count, 50):
        batch = encode_episodes(adapter, [sampler.draw(i, "zero_shot", 0) for i in range(start, start + 50)],
                                RELATIONS)
        with torch.no_grad():
            logits = steered_logits(adapter, batch.prompts, Injection.at(layer, vectors[batch.relation_ids]))
        outcomes.append(logits.argmax(-1) == batch.answer_ids)
        relations.append(batch.relation_ids)
    score = Score.from_tensors(RELATIONS, torch.cat(outcomes), torch.cat(relations))
    return {"heads": [list(h) for h in heads], "accuracy": score.accuracy, "ci95": list(score.ci95()), "n": score.n}


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", default="runs/bench/attribution.json")
    parser.add_argument("--organism", default="checkpoints/organism")
    parser.add_argument("--prompts", type=int, default=16, help="corrupted prompts per shape")
    parser.add_argument("--reference-prompts", type=int, default=1, help="prompts for the (slow) reference loop")
    parser.add_argument("--k", type=int, default=18, help="heads per FV (organism; configs/toy.yaml)")
    parser.add_argument("--layer", type=int, default=1, help="injection layer (organism; configs/toy.yaml)")
    parser.add_argument("--test-prompts", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict = {"threads": 1, "clock": "process_time", "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bench = benchmark_model()
        organism = load_tiny_openflamingo(args.organism)
        for name, adapter in (("benchmark", bench), ("organism", organism)):
            size = adapter.tiny_config.image_size
            scenes = read_scenes(generate_split(Path(tmp) / name, "eval", 64, size, seed=5, workers=1, progress=False))
            sampler = EpisodeSampler(scenes, RELATIONS, shots=4, seed=0)
            result["shapes"][name] = measure(adapter, sampler, args.prompts, args.reference_prompts)
        shape = result["shapes"]["organism"]
        test = EpisodeSampler(read_scenes(generate_split(Path(tmp) / "test", "test", args.test_prompts,
                                                         organism.tiny_config.image_size, seed=7, workers=1,
                                                         progress=False)), RELATIONS, shots=4, seed=1)
        result["organism_fv_accuracy"] = {
            method: fv_accuracy(organism, shape["_means"], shape[key], args.k, args.layer, test, args.test_prompts)
            for method, key in (("exact", "_exact"), ("attribution", "_estimate"))}
    for shape in result["shapes"].values():
        for key in [k for k in shape if k.startswith("_")]:
            shape.pop(key)
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
