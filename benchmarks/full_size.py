"""Full-size rehearsal: the published OpenFlamingo-4B layout, loaded as a user's download is, through the paper pipeline.

    python benchmarks/full_size.py --work /tmp/of4b --json benchmarks/results/full_size_cpu.json
    python benchmarks/full_size.py --work /tmp/of4b --device cuda --json runs/bench/full_size_gpu.json

Random weights at the published shapes, in the published file layouts
(:mod:`mfv.models.openflamingo.layout`: ``checkpoint.pt`` through open_flamingo's factory and
save rule, the RedPajama-INCITE-3B folder with its 50432-row config and 50277-token tokenizer,
open_clip's CLIP file), written once under ``--work`` (about 12 GB; reused when present).
A fresh process then loads them with ``mfv.load("openflamingo", release=...)`` and runs,
on a few synthetic prompts: mean head activations, fast AIE over all heads, the reference
loop on a few heads (extrapolated to all), extraction, FV fine-tuning steps at batch 1 and at
the batched recipe's batch, and two evaluation conditions (zero-shot, zero-shot + FV).

Per stage the JSON has wall and CPU seconds, matmul FLOPs (``torch.utils.flop_counter``),
the FLOP rate and the process's peak RSS so far. Random weights answer nothing correctly:
accuracies here are not results, only times, FLOPs and memory are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RELATIONS = ["above", "below", "left", "right"]
RELEASE = "openflamingo-4b-instruct"
CPU_BF16_PEAK = 2.3e12  # this project's CI machine: bf16 matmul with AMX on 2 threads (DEVELOPERS.md)


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM), file-backed pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stages:
    """Times, FLOPs and peak memory of each stage, in order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str, count_flops: bool = True, **extra):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False) if count_flops else None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        row = dict(extra)
        if counter is not None:
            with counter:
                yield row
        else:
            yield row
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        row["wall_s"] = round(time.perf_counter() - wall, 3)
        row["cpu_s"] = round(time.process_time() - cpu, 3)
        if counter is not None:
            flops = counter.get_total_flops()
            row["flops"] = flops
            row["tflop_per_s"] = round(flops / row["wall_s"] / 1e12, 3)
        row["peak_rss_gb"] = round(peak_rss_bytes() / 1e9, 2)
        self.rows[name] = row
        print(f"{name:<22} {row['wall_s']:8.1f} s  " + "  ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("wall_s",)), flush=True)


def build(work: Path) -> None:
    from mfv.models.openflamingo.layout import write_release_layout

    start = time.perf_counter()
    write_release_layout(work / "release")
    (work / "release" / "COMPLETE").write_text(f"{time.perf_counter() - start:.0f} s\n")


def rehearse(work: Path, device: str, prompts: int, aie_prompts: int, reference_heads: int, batch: int,
             layer: int, k: int) -> dict:
    import mfv
    from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
    from mfv.data.synthetic import generate_split
    from mfv.hooks import HeadPatch, add_to_residual, patch_heads
    from mfv.method.aie import indirect_effects, mean_head_activations, top_heads
    from mfv.method.function_vector import build_function_vector

    stages = Stages(device)
    release = work / "release"
    with stages.stage("load", count_flops=False) as row:
        model = mfv.load("openflamingo", release=RELEASE, checkpoint_path=str(release / "checkpoint.pt"),
                         language_model_path=str(release / "language_model"),
                         clip_weights_path=str(release / "open_clip_pytorch_model.bin"), dtype="bfloat16",
                         device=device)
        weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
        row["parameters"] = sum(p.numel() for p in model.model.parameters())
        row["weight_bytes"] = weights
    stages.rows["load"]["peak_over_weights"] = round(peak_rss_bytes() / weights, 3)

    data = work / "data"
    if not (data / "eval").is_dir() or not (data / "train").is_dir():
        generate_split(data / "eval", "eval", 16, image_size=224, workers=1, progress=False)
        generate_split(data / "train", "train", 2 * batch, image_size=224, workers=1, progress=False)
    eval_sampler = EpisodeSampler(read_scenes(data / "eval"), RELATIONS, shots=4, seed=0)
    train_sampler = EpisodeSampler(read_scenes(data / "train"), RELATIONS, shots=0, seed=0)

    clean = encode_episodes(model, [eval_sampler.episode(i, "clean") for i in range(prompts)], RELATIONS)
    with stages.stage("means", prompts=prompts):
        means = mean_head_activations(model, [clean], len(RELATIONS), progress=False).means
    corrupted = [encode_episodes(model, [eval_sampler.episode(i, "corrupted")], RELATIONS) for i in range(aie_prompts)]
    heads_total = model.num_layers * model.num_heads
    with stages.stage("aie_fast", prompts=aie_prompts, heads=heads_total):
        aie = torch.stack([indirect_effects(model, one, means, "fast")[0] for one in corrupted]).mean(0)
    stages.rows["aie_fast"]["wall_s_per_prompt"] = round(stages.rows["aie_fast"]["wall_s"] / aie_prompts, 3)
    # The reference loop: one full forward per head (a patch hook on it); a few heads timed,
    # extrapolated to all heads plus the unpatched forward.
    last = model.num_layers - 1
    with stages.stage("aie_reference_sample", heads=reference_heads), torch.no_grad():
        start = time.perf_counter()
        for head in range(reference_heads):
            patch = HeadPatch(torch.tensor([0]), torch.tensor([last]), torch.tensor([head]), means[0, last, head][None])
            with patch_heads(model, patch):
                model.forward(corrupted[0].prompts)
        per_forward = (time.perf_counter() - start) / reference_heads
    row = stages.rows["aie_reference_sample"]
    row["wall_s_per_forward"] = round(per_forward, 3)
    row["extrapolated_wall_s_per_prompt"] = round(per_forward * (heads_total + 1), 1)
    row["extrapolated_flops_per_prompt"] = row["flops"] / reference_heads * (heads_total + 1)

    with stages.stage("extraction", k=k, layer=layer):
        heads = top_heads(aie, k)
        vectors = torch.stack([build_function_vector(model, means[r], heads) for r in range(len(RELATIONS))])

    train = [train_sampler.episode(i, "zero_shot") for i in range(2 * batch)]
    store: dict = {}
    with torch.no_grad(), model.reuse_context(store):  # as a fit: every image encoded once, before timing
        model.forward(encode_episodes(model, train, RELATIONS).prompts)

    def fine_tune(batch_size: int, steps: int) -> None:
        fvs = torch.nn.Parameter(vectors.clone().float())
        optimizer = torch.optim.Adam([fvs], lr=1e-3)
        for step in range(steps):
            episodes = train[step * batch_size:(step + 1) * batch_size]
            encoded = encode_episodes(model, episodes, RELATIONS)
            with model.reuse_context(store):
                logits = model.steered_logits(encoded.prompts, fvs[encoded.relation_ids], layer)
            loss = torch.nn.functional.cross_entropy(logits.float(), encoded.answer_ids.to(logits.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    samples = 2 * batch
    with stages.stage("finetune_batch_1", samples=samples, batch=1):
        fine_tune(1, samples)
    with stages.stage(f"finetune_batch_{batch}", samples=samples, batch=batch):
        fine_tune(batch, 2)
    for name in ("finetune_batch_1", f"finetune_batch_{batch}"):
        stages.rows[name]["samples_per_s"] = round(samples / stages.rows[name]["wall_s"], 3)
    ratio = stages.rows[f"finetune_batch_{batch}"]["samples_per_s"] / stages.rows["finetune_batch_1"]["samples_per_s"]

    test = encode_episodes(model, [train_sampler.episode(i, "zero_shot") for i in range(batch)], RELATIONS)
    with stages.stage("evaluate_zero_shot", prompts=batch), torch.no_grad():
        model.forward(test.prompts)
    with stages.stage("evaluate_zero_shot_fv", prompts=batch), torch.no_grad():
        with add_to_residual(model, layer, vectors[test.relation_ids]):
            model.forward(test.prompts)

    return {
        "release": RELEASE, "device": device, "dtype": "bfloat16", "torch_threads": torch.get_num_threads(),
        "machine_bf16_peak_tflop_per_s": CPU_BF16_PEAK / 1e12 if device == "cpu" else None,
        "finetune_speedup_per_sample": round(ratio, 2),
        "aie_fast_vs_reference_extrapolated": round(
            stages.rows["aie_reference_sample"]["extrapolated_wall_s_per_prompt"]
            / stages.rows["aie_fast"]["wall_s_per_prompt"], 1),
        "stages": stages.rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder for the release files (~12 GB) and data")
    parser.add_argument("--json", default="runs/bench/full_size.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4, help="clean 4-shot prompts for the means")
    parser.add_argument("--aie-prompts", type=int, default=2)
    parser.add_argument("--reference-heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="the batched recipe's batch (configs/finetune_batched.yaml)")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--stage", choices=["all", "build", "run"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.stage == "build":
        return build(work)
    if args.stage == "all":
        if not (work / "release" / "COMPLETE").is_file():
            print(f"writing the published layout under {work}/release (random weights, once)", flush=True)
            subprocess.run([sys.executable, __file__, "--work", str(work), "--stage", "build"], check=True)
        # A fresh process: its peak memory is the loader's, not the builder's.
        command = [sys.executable, __file__, *sys.argv[1:], "--stage", "run"]
        subprocess.run(command, check=True)
        return
    result = rehearse(work, args.device, args.prompts, args.aie_prompts, args.reference_heads, args.batch,
                      args.layer, args.k)
    result["build_s"] = (work / "release" / "COMPLETE").read_text().strip()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(result, handle, indent=2)
    os.replace(handle.name, out)
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))


if __name__ == "__main__":
    main()
