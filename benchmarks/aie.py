"""Fast exact AIE against the reference loop, and against the minimal exact computation.

    python benchmarks/aie.py --json runs/bench/aie.json
    python benchmarks/aie.py --families --json benchmarks/results/families_aie.json

The second form measures every registered family's stand-in instead
(:mod:`benchmarks.families_aie`).

One thread (``torch.set_num_threads(1)``), CPU time (``time.process_time``) and wall time,
all ratios from one run. Three shapes: the benchmark model (8 layers x 16 heads, hidden 512),
the model organism (``checkpoints/organism``) and OpenFlamingo-4B's language width (hidden
2560, 32 heads x 80, MLP 10240, cross-attention 8 x 64, ff x4) with a few layers and a small
random vision tower (64-px images: CPU time for a ViT-L/14 at 224 px would dominate every
number without changing the LM-side ratios; the 4B vision cost enters the projection below).

Per shape, with FLOPs counted by ``torch.utils.flop_counter`` (matrix products):

* ``reference`` = (1 + layers x heads) full forwards per prompt (the published scripts);
* ``minimal`` = one full forward + for each site, the last position of the layers at and
  above the patched one (cached keys/values, image keys/values shared) + its logits;
* ``executed`` = what fast AIE actually ran;
* ``bound`` = reference / minimal (no exact method beats the reference by more),
  ``flop_efficiency`` = minimal / executed, ``speedup`` = reference CPU time / fast CPU time,
  ``time_efficiency`` = speedup / bound, ``max_abs_diff`` = fast vs reference.

The reference is timed on ``--reference-prompts`` prompts (all sites) for the small shapes
and, at 4B width, on ``--sampled-sites`` single-site forwards scaled to every site. The 4B
projection per prompt (32 layers, 1024 heads, 5 images) extrapolates the measured per-layer
FLOPs linearly in depth (forward) and quadratically (sites x layers above them), and adds
the ViT-L/14 + resampler FLOPs of 5 images at 224 px computed from their sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.hooks import HeadPatch, patch_heads
from mfv.method.aie import indirect_effects, mean_head_activations
from mfv.models.openflamingo import TinyFlamingoConfig, build_tiny_openflamingo, load_tiny_openflamingo
from mfv.models.openflamingo import last_position
from mfv.vocabulary import OBJECT_NAMES

RELATIONS = ["above", "below", "left", "right"]


def flops(function) -> tuple[object, int]:
    with FlopCounterMode(display=False) as counter:
        out = function()
    return out, counter.get_total_flops()


def timed(function) -> tuple[object, float, float]:
    """CPU and wall seconds of ``function`` (on a GPU, the wall time after synchronising)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def site_step_flops(adapter, corrupted) -> tuple[list[int], int]:
    """FLOPs of one row through each layer at the last position, and of one row's logits
    (OpenFlamingo's layer runner of the shared replay, :mod:`mfv.models.replay`)."""
    runner = last_position.FlamingoLayers(adapter)
    replay = runner.prefill(corrupted.prompts.to(adapter.device)).data["minimal"]

    def first(pair):
        return None if pair is None else tuple(t[:1] for t in pair)

    single = dataclasses.replace(
        replay, inputs=[t[:1] for t in replay.inputs], keys=[t[:1] for t in replay.keys],
        values=[t[:1] for t in replay.values], images=[first(i) for i in replay.images],
        calls=[{"attention_mask": c["attention_mask"][:1], "position_embeddings": first(c["position_embeddings"])}
               for c in replay.calls])
    one = single.inputs[0][:, None]
    per_layer = [flops(lambda index=index: runner.layer(single, index, one))[1] for index in range(adapter.num_layers)]
    _, head = flops(lambda: runner.logits(one))
    return per_layer, head


def measure(name: str, adapter, sampler, args, sampled_sites: int | None = None) -> dict:
    prompts = args.prompts if sampled_sites is None else 1
    clean = encode_episodes(adapter, [sampler.draw(i, "clean") for i in range(8)], RELATIONS)
    means = mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = encode_episodes(adapter, [sampler.draw(i, "corrupted") for i in range(prompts)], RELATIONS)
    layers, heads = adapter.num_layers, adapter.num_heads
    with torch.no_grad():
        indirect_effects(adapter, corrupted, means, "fast")  # warm-up
        (fast, fast_cpu, fast_wall) = timed(lambda: indirect_effects(adapter, corrupted, means, "fast"))
        _, executed = flops(lambda: indirect_effects(adapter, corrupted, means, "fast"))
        one = adapter.select_rows(corrupted.prompts, torch.tensor([0]))
        _, forward_flops = flops(lambda: adapter.forward(one))
        step, head = site_step_flops(adapter, corrupted)
        minimal_per_prompt = forward_flops + heads * sum(sum(step[l:]) for l in range(layers)) + layers * heads * head
        result = {"layers": layers, "heads": heads, "hidden": adapter.hidden_size, "prompts": prompts,
                  "sequence_length": int(corrupted.prompts.input_ids.shape[1]),
                  "images_per_prompt": int(corrupted.prompts.pixel_values.shape[1])}
        if sampled_sites is None:
            reference_prompts = min(args.reference_prompts, prompts)
            subset = encode_episodes(adapter, [sampler.draw(i, "corrupted") for i in range(reference_prompts)],
                                     RELATIONS)
            reference, ref_cpu, ref_wall = timed(lambda: indirect_effects(adapter, subset, means, "reference"))
            result["max_abs_diff"] = float((fast[:reference_prompts] - reference).abs().max())
            ref_cpu_per_prompt, ref_wall_per_prompt = ref_cpu / reference_prompts, ref_wall / reference_prompts
            result["reference_timing"] = f"{reference_prompts} prompt(s), every site"
        else:
            # A few single-site forwards (the reference's unit of work), scaled to every site.
            answers = corrupted.answer_ids
            values = means[corrupted.relation_ids.cpu()]
            sites = torch.randperm(layers * heads, generator=torch.Generator().manual_seed(0))[:sampled_sites]
            checks, ref_cpu, ref_wall = [], 0.0, 0.0
            for site in sites.tolist():
                layer, h = divmod(site, heads)
                patch = HeadPatch(torch.tensor([0]), torch.tensor([layer]), torch.tensor([h]), values[0:1, layer, h])
                with patch_heads(adapter, patch):
                    logits, c, w = timed(lambda: adapter.forward(one))
                ref_cpu, ref_wall = ref_cpu + c, ref_wall + w
                base = adapter.forward(one).float().softmax(-1)[0, answers[0]]
                checks.append(abs(float(logits.float().softmax(-1)[0, answers[0]] - base) - float(fast[0, layer, h])))
            scale = (1 + layers * heads) / sampled_sites
            ref_cpu_per_prompt, ref_wall_per_prompt = ref_cpu * scale, ref_wall * scale
            result["max_abs_diff"] = max(checks)
            result["reference_timing"] = f"{sampled_sites} sampled single-site forwards x (1 + {layers * heads}) / {sampled_sites}"
    reference_flops = (1 + layers * heads) * forward_flops
    bound = reference_flops / minimal_per_prompt
    speedup = ref_cpu_per_prompt / (fast_cpu / prompts)
    result.update({
        "flops_per_prompt": {"reference": reference_flops, "minimal": minimal_per_prompt,
                             "executed": executed / prompts, "full_forward": forward_flops},
        "cpu_seconds_per_prompt": {"reference": ref_cpu_per_prompt, "fast": fast_cpu / prompts},
        "wall_seconds_per_prompt": {"reference": ref_wall_per_prompt, "fast": fast_wall / prompts},
        "speedup": speedup, "wall_speedup": ref_wall_per_prompt / (fast_wall / prompts), "bound": bound,
        "flop_efficiency": minimal_per_prompt / (executed / prompts), "time_efficiency": speedup / bound,
        "_step": step, "_head": head, "_forward": forward_flops,
    })
    print(f"{name}: speedup {speedup:.1f}x of bound {bound:.1f}x (time efficiency {speedup / bound:.2f}), "
          f"flop efficiency {result['flop_efficiency']:.2f}, max abs diff {result['max_abs_diff']:.1e}", flush=True)
    return result


def vit_l14_flops(images: int = 5, size: int = 224, patch: int = 14, width: int = 1024, layers: int = 24,
                  resampler_layers: int = 6, latents: int = 64) -> float:
    """Matrix-product FLOPs of CLIP ViT-L/14 plus OpenFlamingo's perceiver on ``images`` images."""
    tokens = (size // patch) ** 2 + 1
    per_layer = 2 * tokens * (4 * width * width + 2 * width * 4 * width) + 2 * 2 * tokens * tokens * width
    embed = 2 * (tokens - 1) * 3 * patch * patch * width
    keys = tokens + latents
    perceiver = resampler_layers * (2 * latents * width * 512 + 2 * keys * width * 1024 + 2 * 2 * latents * keys * 512
                                    + 2 * 512 * latents * width + 2 * 2 * latents * width * 4 * width)
    return images * (layers * per_layer + embed + perceiver)


def project_4b(small: dict, large: dict) -> dict:
    """Per-prompt FLOPs at 32 layers x 32 heads from two measured depths (linear forward,
    per-layer step constant), plus the real 224-px ViT-L/14 vision tower."""
    l1, l2 = small["layers"], large["layers"]
    f1, f2 = small["_forward"], large["_forward"]
    per_layer = (f2 - f1) / (l2 - l1)
    base = f1 - per_layer * l1  # embeddings, small vision tower, logits
    vision = vit_l14_flops()
    forward = base + per_layer * 32 + vision
    step = sum(large["_step"]) / large["layers"]  # one row, one layer, last position (mean over layer kinds)
    heads = 32
    minimal = forward + heads * step * sum(32 - l for l in range(32)) + 32 * heads * large["_head"]
    reference = (1 + 32 * heads) * forward
    return {"layers": 32, "heads": heads, "sites": 32 * heads, "images": 5, "image_size": 224,
            "tflops_per_prompt": {"reference": reference / 1e12, "minimal": minimal / 1e12,
                                  "fast_executed": minimal / large["flop_efficiency"] / 1e12,
                                  "full_forward": forward / 1e12, "vision": vision / 1e12},
            "bound": reference / minimal,
            "method": (f"forward FLOPs measured at {l1} and {l2} layers, linear in depth; per-row per-layer last-position "
                       f"FLOPs measured at {l2} layers; ViT-L/14 + resampler FLOPs for 5 x 224-px images computed from "
                       f"their sizes; executed = minimal / measured flop efficiency at {l2} layers")}


def benchmark_model():
    """The benchmark shape: a random OpenFlamingo with 8 layers x 16 heads, hidden 512."""
    return build_tiny_openflamingo(TinyFlamingoConfig(
        words=list(OBJECT_NAMES), image_size=64, patch_size=8, vision_width=128, vision_layers=2,
        vision_head_width=32, perceiver_depth=2, perceiver_latents=16, perceiver_heads=4, perceiver_dim_head=32,
        xattn_heads=4, xattn_dim_head=32, cross_attn_every_n_layers=2, hidden_size=512, num_layers=8,
        num_heads=16, intermediate_size=2048))


def four_b_width(layers: int) -> TinyFlamingoConfig:
    return TinyFlamingoConfig(
        words=list(OBJECT_NAMES), image_size=64, patch_size=16, vision_width=256, vision_layers=1,
        vision_head_width=64, perceiver_depth=1, perceiver_latents=64, perceiver_heads=8, perceiver_dim_head=64,
        xattn_heads=8, xattn_dim_head=64, xattn_ff_mult=4, cross_attn_every_n_layers=2, hidden_size=2560,
        num_layers=layers, num_heads=32, intermediate_size=10240)


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", default="runs/bench/aie.json")
    parser.add_argument("--organism", default="checkpoints/organism")
    parser.add_argument("--prompts", type=int, default=8, help="corrupted prompts for fast AIE")
    parser.add_argument("--reference-prompts", type=int, default=1, help="prompts for the reference loop")
    parser.add_argument("--sampled-sites", type=int, default=4, help="reference forwards sampled at 4B width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", action="store_true",
                        help="instead: every registered family's stand-in (benchmarks/families_aie.py)")
    args = parser.parse_args()
    if args.families:
        import runpy

        runpy.run_path(str(Path(__file__).with_name("families_aie.py")))["run"](args.json)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        def sampler_for(adapter, name):
            size = adapter.tiny_config.image_size
            split = generate_split(Path(tmp) / name, "eval", 24, size, seed=3, workers=1, progress=False)
            return EpisodeSampler(read_scenes(split), RELATIONS, shots=4, seed=0)

        bench = benchmark_model()
        bench.model.to(args.device)
        shapes["benchmark"] = measure("benchmark", bench, sampler_for(bench, "bench"), args)
        organism = load_tiny_openflamingo(args.organism)
        organism.model.to(args.device)
        shapes["organism"] = measure("organism", organism, sampler_for(organism, "organism"), args)
        wide = {}
        for layers in (2, 4):
            adapter = build_tiny_openflamingo(four_b_width(layers))
            adapter.model.to(args.device)
            wide[layers] = measure(f"4B width, {layers} layers", adapter, sampler_for(adapter, f"w{layers}"), args,
                                   sampled_sites=args.sampled_sites)
            del adapter
        shapes["openflamingo4b_width"] = wide[4]
        projection = project_4b(wide[2], wide[4])
    for shape in shapes.values():
        for key in [k for k in shape if k.startswith("_")]:
            shape.pop(key)
    result = {"threads": 1, "clock": "process_time (CPU) and perf_counter (wall)", "device": args.device,
              "shapes": shapes, "openflamingo4b_projection_per_prompt": projection,
              "seconds": time.perf_counter() - started}
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
