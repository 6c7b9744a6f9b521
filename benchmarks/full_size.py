"""Full-size rehearsal: a published release's file layout, loaded as a user's download is, through the paper pipeline.

    python benchmarks/full_size.py --work /tmp/of4b --json benchmarks/results/full_size_cpu.json
    python benchmarks/full_size.py --family qwen3vl --work /tmp/qwen4b --json benchmarks/results/full_size_qwen3vl_cpu.json
    python benchmarks/full_size.py --family qwen2.5vl --work /tmp/qwen3b --json benchmarks/results/full_size_qwen25vl_cpu.json
    python benchmarks/full_size.py --work /tmp/of4b --device cuda --json runs/bench/full_size_gpu.json

Random weights at the published shapes, in the published file layouts, written once under
``--work`` (reused when present):

- ``openflamingo`` (OpenFlamingo-4B-instruct, about 12 GB):
  :mod:`mfv.models.openflamingo.layout`, ``checkpoint.pt`` through open_flamingo's factory and
  save rule, the RedPajama-INCITE-3B folder with its 50432-row config and 50277-token
  tokenizer, open_clip's CLIP file;
- ``qwen3vl`` (Qwen3-VL-4B-Instruct, about 9 GB): ``save_pretrained`` of a random model with
  the release's config (:func:`mfv.models.families.layouts.write_qwen3vl_layout`) and of a processor
  at the paper's pixel budget (its tokenizer is word-level: the real one cannot be downloaded
  here; the LM keeps the release's 151936 rows);
- ``qwen2.5vl`` (Qwen2.5-VL-3B-Instruct, about 7.5 GB): the same with the 3B release's config
  (:func:`mfv.models.families.layouts.write_qwen25vl_layout`).

A fresh process then loads them with ``mfv.load`` as a user would and runs,
on a few synthetic prompts: mean head activations, fast AIE over all heads, the reference
loop on a few heads (extrapolated to all), extraction, FV fine-tuning steps at batch 1 and at
the batched recipe's batch, and two evaluation conditions (zero-shot, zero-shot + FV).

Per stage the JSON has wall and CPU seconds, matmul FLOPs (``torch.utils.flop_counter``),
the FLOP rate, its fraction of the host's measured matmul peak in the compute dtype and the
process's peak RSS so far. The peak is measured in the same run, on the rehearsal's threads
(4096^2 matmuls in bf16 and fp32, at the start and at the end: the higher counts, as the
host may be shared); ``host`` names the CPU, its bf16 support (:mod:`mfv.hardware`: flags and
measured rates) and the load average before and after. Random weights answer nothing
correctly: accuracies here are not results, only times, FLOPs and memory are.

``--profile DIR`` instead profiles the prompt pass and fast AIE (:mod:`full_size_profile`);
``--layers N`` keeps the language model's first N layers (full width).
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
from pathlib import Path

import torch

RELATIONS = ["above", "below", "left", "right"]
RELEASES = {"openflamingo": "openflamingo-4b-instruct", "qwen3vl": "Qwen3-VL-4B-Instruct",
            "qwen2.5vl": "Qwen2.5-VL-3B-Instruct"}
PEAK_SIZE = 4096  # side of the square matmuls that measure the host's peak


def host_peaks(device: str) -> dict[str, float]:
    """The host's matmul peak per dtype on the current torch threads, TFLOP per second of wall
    time and (``*_per_cpu_s``) per CPU-second of this process, which other processes do not lower."""
    from mfv.hardware import matmul_rates

    peaks = {}
    for name in ("bfloat16", "float32"):
        wall, cpu = matmul_rates(getattr(torch, name), PEAK_SIZE, 0.0, device)
        peaks.update({name: round(wall / 1e12, 3), f"{name}_per_cpu_s": round(cpu / 1e12, 3)})
    return peaks


def host_record(device: str) -> dict:
    """What the JSON says of the host before the run: CPU, bf16 support, load, the first peak."""
    from mfv.hardware import bf16_support, cpu_model

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16": bf16_support().to_dict(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "peak_size": PEAK_SIZE, "peak_tflop_per_s_at_start": host_peaks(device)}


def finish_host_record(host: dict, device: str, stages: dict, dtype: str) -> None:
    """Adds the end peak and load, the peak used (the higher), and each stage's fraction of it."""
    host["peak_tflop_per_s_at_end"] = host_peaks(device)
    host["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    host["peak_tflop_per_s"] = {name: max(host["peak_tflop_per_s_at_start"][name], host["peak_tflop_per_s_at_end"][name])
                                for name in host["peak_tflop_per_s_at_end"]}
    peak, per_cpu_s = host["peak_tflop_per_s"][dtype], host["peak_tflop_per_s"].get(f"{dtype}_per_cpu_s")
    for row in stages.values():
        if "tflop_per_s" in row:
            row["fraction_of_peak"] = round(row["tflop_per_s"] / peak, 3)
            if per_cpu_s and row["cpu_s"] > 0:  # the same, per CPU-second: what the load took away, put back
                row["fraction_of_peak_per_cpu_s"] = round(row["flops"] / row["cpu_s"] / 1e12 / per_cpu_s, 3)


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

    def run(self, name: str, fn, flops_fn=None, flops_scale: float = 1.0, count: bool = True, **extra):
        """Times ``fn()`` (no FLOP counter active: its per-op overhead would slow the timed
        run), then counts the matmul FLOPs of ``flops_fn()`` (default: ``fn``, run again,
        untimed) times ``flops_scale``."""
        from torch.utils.flop_counter import FlopCounterMode

        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self._sync()
        row = dict(extra, wall_s=round(time.perf_counter() - wall, 3), cpu_s=round(time.process_time() - cpu, 3),
                   peak_rss_gb=round(peak_rss_bytes() / 1e9, 2))
        if count:
            counter = FlopCounterMode(display=False)
            with counter:
                (flops_fn or fn)()
            row["flops"] = int(counter.get_total_flops() * flops_scale)
            row["tflop_per_s"] = round(row["flops"] / row["wall_s"] / 1e12, 3)
        self.rows[name] = row
        print(f"{name:<22} {row['wall_s']:8.1f} s  " + "  ".join(
            f"{k}={v}" for k, v in row.items() if k != "wall_s"), flush=True)
        return result

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def build(family: str, work: Path) -> None:
    start = time.perf_counter()
    if family != "openflamingo":
        from mfv.models.families import layouts

        {"qwen3vl": layouts.write_qwen3vl_layout, "qwen2.5vl": layouts.write_qwen25vl_layout}[family](work / "release")
    else:
        from mfv.models.openflamingo.layout import write_release_layout

        write_release_layout(work / "release")
    (work / "release" / "COMPLETE").write_text(f"{time.perf_counter() - start:.0f} s\n")


def load_release(family: str, release: Path, device: str, dtype: str = "bfloat16", layers: int | None = None):
    """The user's path: ``mfv.load`` on the downloaded files; with ``layers``, the language
    model keeps its first ``layers`` layers (the others are dropped)."""
    import mfv

    if family != "openflamingo":
        model = mfv.load(family, model_path=str(release), dtype=dtype, device=device)
    else:
        model = mfv.load("openflamingo", release=RELEASES[family], checkpoint_path=str(release / "checkpoint.pt"),
                         language_model_path=str(release / "language_model"),
                         clip_weights_path=str(release / "open_clip_pytorch_model.bin"), dtype=dtype, device=device)
    if layers is not None:
        blocks = model.blocks if family == "openflamingo" else model.layers
        del blocks[layers:]
        config = model.model.lang_encoder.config if family == "openflamingo" else model.text_config
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return model


def samplers(work: Path, batch: int):
    """The synthetic eval (4-shot) and train (zero-shot) samplers of the rehearsal."""
    from mfv.data.episodes import EpisodeSampler, read_scenes
    from mfv.data.synthetic import generate_split

    data = work / "data"
    scenes = {split: read_scenes(generate_split(data, split, size, image_size=224, workers=1, progress=False))
              for split, size in (("eval", 16), ("train", 2 * batch))}
    return (EpisodeSampler(scenes["eval"], RELATIONS, shots=4, seed=0),
            EpisodeSampler(scenes["train"], RELATIONS, shots=0, seed=0))


def rehearse(family: str, work: Path, device: str, prompts: int, aie_prompts: int, reference_heads: int,
             batch: int, layer: int, k: int, dtype: str = "bfloat16", layers: int | None = None,
             stop_after: str | None = None) -> dict:
    from mfv.data.episodes import encode_episodes
    from mfv.hooks import HeadPatch, patch_heads
    from mfv.method.aie import indirect_effects, mean_head_activations, top_heads
    from mfv.method.function_vector import build_function_vector
    from mfv.steering import Injection, steered_logits

    host = host_record(device)
    stages = Stages(device)
    eval_sampler, train_sampler = samplers(work, batch)
    model = stages.run("load", lambda: load_release(family, work / "release", device, dtype, layers), count=False)
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    stages.rows["load"].update(parameters=sum(p.numel() for p in model.model.parameters()), weight_bytes=weights,
                               peak_over_weights=round(peak_rss_bytes() / weights, 3))

    clean = encode_episodes(model, [eval_sampler.draw(i, "clean") for i in range(prompts)], RELATIONS)
    means = stages.run("means", lambda: mean_head_activations(model, [clean], len(RELATIONS), progress=False).means,
                       prompts=prompts, batch=prompts)
    corrupted = [encode_episodes(model, [eval_sampler.draw(i, "corrupted")], RELATIONS) for i in range(aie_prompts)]
    heads_total = model.num_layers * model.num_heads
    aie = stages.run("aie_fast", lambda: torch.stack([indirect_effects(model, one, means, "fast")[0]
                                                      for one in corrupted]).mean(0),
                     flops_fn=lambda: indirect_effects(model, corrupted[0], means, "fast"), flops_scale=aie_prompts,
                     prompts=aie_prompts, heads=heads_total)
    stages.rows["aie_fast"]["wall_s_per_prompt"] = round(stages.rows["aie_fast"]["wall_s"] / aie_prompts, 3)
    if stop_after == "aie_fast":  # the prompt pass and fast AIE only: the stages #36 sets a FLOP-rate goal for
        return summary(family, device, model, host, stages.rows)

    # The reference loop: one full forward per head (a patch hook on it); a few heads timed,
    # extrapolated to all heads plus the unpatched forward.
    last = model.num_layers - 1

    @torch.no_grad()
    def reference(heads: int) -> None:
        for head in range(heads):
            patch = HeadPatch(torch.tensor([0]), torch.tensor([last]), torch.tensor([head]), means[0, last, head][None])
            with patch_heads(model, patch):
                model.forward(corrupted[0].prompts)

    stages.run("aie_reference_sample", lambda: reference(reference_heads), flops_fn=lambda: reference(1),
               flops_scale=reference_heads, heads=reference_heads)
    row = stages.rows["aie_reference_sample"]
    per_forward = row["wall_s"] / reference_heads
    row["wall_s_per_forward"] = round(per_forward, 3)
    row["extrapolated_wall_s_per_prompt"] = round(per_forward * (heads_total + 1), 1)
    row["extrapolated_flops_per_prompt"] = int(row["flops"] / reference_heads * (heads_total + 1))

    def extraction():
        heads = top_heads(aie, k)
        return torch.stack([build_function_vector(model, means[r], heads) for r in range(len(RELATIONS))])

    vectors = stages.run("extraction", extraction, k=k, layer=layer)

    train = [train_sampler.draw(i, "zero_shot") for i in range(2 * batch)]
    store: dict = {}
    with torch.no_grad(), model.reuse_context(store):  # as a fit: every image encoded once, before timing
        model.forward(encode_episodes(model, train, RELATIONS).prompts)

    def fine_tune(batch_size: int, steps: int) -> None:
        """The training step of FunctionVectorModule: reuse context, steered last position, CE, Adam."""
        fvs = torch.nn.Parameter(vectors.clone().float())
        optimizer = torch.optim.Adam([fvs], lr=1e-3)
        for step in range(steps):
            episodes = train[step * batch_size:(step + 1) * batch_size]
            encoded = encode_episodes(model, episodes, RELATIONS)
            with model.reuse_context(store):
                logits = steered_logits(model, encoded.prompts, Injection.at(layer, fvs[encoded.relation_ids]))
            loss = torch.nn.functional.cross_entropy(logits.float(), encoded.answer_ids.to(logits.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    samples = 2 * batch
    for size in (1, batch):
        name = f"finetune_batch_{size}"
        stages.run(name, lambda: fine_tune(size, samples // size), flops_fn=lambda: fine_tune(size, 1),
                   flops_scale=samples // size, samples=samples, batch=size)
        stages.rows[name]["samples_per_s"] = round(samples / stages.rows[name]["wall_s"], 3)
    ratio = stages.rows[f"finetune_batch_{batch}"]["samples_per_s"] / stages.rows["finetune_batch_1"]["samples_per_s"]

    test = encode_episodes(model, [train_sampler.draw(i, "zero_shot") for i in range(batch)], RELATIONS)

    @torch.no_grad()
    def evaluate(steered: bool) -> None:
        injection = Injection.at(layer, vectors[test.relation_ids]) if steered else None
        return steered_logits(model, test.prompts, injection)

    stages.run("evaluate_zero_shot", lambda: evaluate(False), prompts=batch, batch=batch)
    stages.run("evaluate_zero_shot_fv", lambda: evaluate(True), prompts=batch, batch=batch)

    return summary(family, device, model, host, stages.rows, finetune_speedup_per_sample=round(ratio, 2),
                   aie_fast_vs_reference_extrapolated=round(
                       stages.rows["aie_reference_sample"]["extrapolated_wall_s_per_prompt"]
                       / stages.rows["aie_fast"]["wall_s_per_prompt"], 1))


def summary(family: str, device: str, model, host: dict, rows: dict, **ratios) -> dict:
    """The rehearsal's JSON: the run, the host (its end peak measured now) and the stages."""
    compute = str(model.dtype).removeprefix("torch.")
    finish_host_record(host, device, rows, compute)
    return {"family": family, "release": RELEASES[family], "device": device, "dtype": compute,
            "torch_threads": torch.get_num_threads(), "layers": model.num_layers, "host": host, **ratios,
            "stages": rows}


def markdown_table(result: dict) -> str:
    """The README's table of a rehearsal JSON."""
    lines = ["| stage | wall s | CPU s | TFLOP | TFLOP/s | of peak | peak RSS GB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["stages"].items():
        notes = []
        if name == "load":
            notes.append(f"{row['parameters'] / 1e9:.2f} B parameters, {row['weight_bytes'] / 1e9:.2f} GB; "
                         f"peak / weights {row['peak_over_weights']}x")
        if name == "aie_fast":
            notes.append(f"{row['wall_s_per_prompt']} s per prompt over {row['heads']} heads")
        if name == "aie_reference_sample":
            notes.append(f"{row['wall_s_per_forward']} s per forward; {row['extrapolated_wall_s_per_prompt']} s "
                         f"per prompt extrapolated ({row['extrapolated_flops_per_prompt'] / 1e12:.0f} TFLOP)")
        if "samples_per_s" in row:
            notes.append(f"{row['samples_per_s']} samples/s")
        if "prompts" in row and name.startswith(("means", "evaluate")):
            notes.append(f"{row['prompts']} prompts")
        flops = f"{row['flops'] / 1e12:.2f}" if "flops" in row else ""
        rate = row.get("tflop_per_s", "")
        share = f"{row['fraction_of_peak']:.0%}" if "fraction_of_peak" in row else ""
        if "fraction_of_peak_per_cpu_s" in row:
            share += f" ({row['fraction_of_peak_per_cpu_s']:.0%} per CPU-s)"
        lines.append(f"| {name} | {row['wall_s']} | {row['cpu_s']} | {flops} | {rate} | {share} | {row['peak_rss_gb']} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines + [host_line(result)])


def host_line(result: dict) -> str:
    """One line under the table: the CPU, its bf16 support, the measured peak and the load."""
    host = result.get("host")
    if host is None:
        return f"\n(measured before #36: no peak measured in the run; the script assumed {result.get('machine_bf16_peak_tflop_per_s')} TFLOP/s)"
    bf16 = host["bf16"]
    peak = host["peak_tflop_per_s"]
    return (f"\nHost: {host['cpu']}, {result['torch_threads']} threads; bf16 flags {', '.join(bf16['flags']) or 'none'}, "
            f"{'native' if bf16['native'] else 'not native'} ({bf16['ratio']}x fp32 measured); measured peak "
            f"{peak['bfloat16']} TFLOP/s bf16, {peak['float32']} fp32 ({host['peak_size']}^2 matmuls, the higher of "
            f"start and end; per CPU-second {peak.get('bfloat16_per_cpu_s')} and {peak.get('float32_per_cpu_s')}); "
            f"load average {host['load_average_before'][0]} before, {host['load_average_after'][0]} after.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(RELEASES), default="openflamingo")
    parser.add_argument("--work", help="folder for the release files (9-12 GB) and data")
    parser.add_argument("--json", default="runs/bench/full_size.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4, help="clean 4-shot prompts for the means")
    parser.add_argument("--aie-prompts", type=int, default=2)
    parser.add_argument("--reference-heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="the batched recipe's batch (configs/finetune_batched.yaml)")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", help="load dtype (float32, bfloat16, auto)")
    parser.add_argument("--layers", type=int, help="keep the language model's first N layers (profiling)")
    parser.add_argument("--stop-after", choices=["aie_fast"], help="stop after this stage (JSON of the stages so far)")
    parser.add_argument("--profile", help="profile means and fast AIE into this folder instead of rehearsing")
    parser.add_argument("--table", help="print the markdown table of a rehearsal JSON and exit")
    parser.add_argument("--stage", choices=["all", "build", "run"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        return print(markdown_table(json.loads(Path(args.table).read_text())))
    if not args.work:
        parser.error("--work is required")
    work = Path(args.work)
    if args.stage == "build":
        return build(args.family, work)
    if args.stage == "all":
        if not (work / "release" / "COMPLETE").is_file():
            print(f"writing the published layout under {work}/release (random weights, once)", flush=True)
            subprocess.run([sys.executable, __file__, "--family", args.family, "--work", str(work), "--stage", "build"],
                           check=True)
        # A fresh process: its peak memory is the loader's, not the builder's.
        command = [sys.executable, __file__, *sys.argv[1:], "--stage", "run"]
        subprocess.run(command, check=True)
        return
    if args.profile:
        from full_size_profile import profile

        return profile(args.family, work, args.device, args.dtype, args.layers, args.prompts, Path(args.profile))
    result = rehearse(args.family, work, args.device, args.prompts, args.aie_prompts, args.reference_heads, args.batch,
                      args.layer, args.k, args.dtype, args.layers, args.stop_after)
    result["build_s"] = (work / "release" / "COMPLETE").read_text().strip()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(result, handle, indent=2)
    os.replace(handle.name, out)
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))


if __name__ == "__main__":
    main()
