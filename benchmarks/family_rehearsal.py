"""Family rehearsal (#32.2): a Hugging Face family's release layout through ``mfv.load``, checked for exactness.

    python benchmarks/family_rehearsal.py --family llava-onevision --work /tmp/ov --json benchmarks/results/family_llava-onevision_cpu.json
    python benchmarks/family_rehearsal.py --family llava --work /tmp/llava --layers 4 --json ...
    python benchmarks/family_rehearsal.py --family openflamingo --work /tmp/of4b --json benchmarks/results/family_openflamingo_cpu.json

``openflamingo`` is the OpenFlamingo-4B-instruct layout of :mod:`full_size` (``checkpoint.pt``,
the RedPajama-INCITE-3B folder, open_clip's CLIP file; the same ``--work`` folder serves both).

Writes once into ``release/`` under the --work folder the family's release layout: ``save_pretrained`` of a random
model with the release's ``config.json`` fields (``RELEASE`` of its file in
:mod:`mfv.models.families`), bf16 safetensors shards, and the stand-in processor made for that
config (:func:`mfv.models.families.release.write_release_layout`; the tokenizer is the byte-level
BPE stand-in, as the real one cannot be downloaded here: the vocabulary rows stay the release's).
With ``--layers N`` the language model keeps N decoder layers at full width (a release that does
not fit the machine); the JSON says so.

A fresh process then loads it with ``mfv.load(family, model_path=..., dtype="bfloat16")`` (its
peak RSS is the loader's) and, on ONE 4-shot prompt in the paper's format (images at the
release's default processing), measures:

- ``seconds_per_prompt``: fast AIE over every head (:func:`mfv.method.aie.indirect_effects`);
- ``null_patch``: max |AIE| when every head is patched with its own activation (must be <= 1e-7);
- ``max_diff_aie``: fast AIE against the reference (one full forward per head under a patch hook)
  on a few heads;
- ``max_diff_steered_logits``: a function vector injected at a middle layer, the backbone's
  minimal path against a full forward under the residual hook.

After the timed fast AIE, a Hugging Face family's image features of the one prompt are computed once and reused
(:func:`reused_image_features`): every later check runs the language model on the same images,
and a release's vision tower (Gemma 3's 896-px SigLIP: about 27 TFLOP per 5-image prompt)
would otherwise dominate the six further passes. Clean forward and fast AIE are timed without it.

Random weights answer nothing correctly: only times, memory and the exactness checks count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.full_size import RELATIONS, load_release, peak_rss_bytes, samplers  # noqa: E402

REFERENCE_HEADS = 2  # the reference costs one full forward per head


OPENFLAMINGO = "openflamingo"


def release_config(family_name: str, layers: int | None) -> dict[str, Any]:
    """The release's config, with the language model cut to its first ``layers`` decoder layers."""
    from mfv.models import hf_families

    release = hf_families()[family_name].stand_in.release
    if layers is None:
        return release
    text = dict(release["text_config"], num_hidden_layers=layers)
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:layers]
    return {**release, "text_config": text}


def build(family_name: str, work: Path, layers: int | None) -> None:
    """Writes the release layout under ``work/release`` (once: ``COMPLETE`` marks it done)."""
    if family_name == OPENFLAMINGO:
        from benchmarks.full_size import build as build_openflamingo

        return build_openflamingo(OPENFLAMINGO, work)
    from mfv.models import hf_families
    from mfv.models.families.release import write_release_layout

    start = time.perf_counter()
    write_release_layout(hf_families()[family_name], work / "release", release_config(family_name, layers))
    (work / "release" / "COMPLETE").write_text(f"{time.perf_counter() - start:.0f} s, layers {layers or 'all'}\n")


@contextmanager
def reused_image_features(model) -> Iterator[bool]:
    """The inner model's ``get_image_features`` computed once per distinct input (the same
    pixel tensor, shapes and options) while the context lasts; restored after. Yields whether
    it applies: OpenFlamingo has no such method (its CLIP tower costs about a tenth of a Gemma 3
    prompt's) and runs unchanged."""
    inner = getattr(model.model, "model", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        yield False
        return
    compute = inner.get_image_features
    memo: dict[tuple, Any] = {}

    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", value.data_ptr(), tuple(value.shape), value.dtype)
        return repr(value)

    def features(*args: Any, **kwargs: Any) -> Any:
        index = (tuple(map(key, args)), tuple(sorted((k, key(v)) for k, v in kwargs.items())))
        if index not in memo:
            memo[index] = compute(*args, **kwargs)
        return memo[index]

    inner.get_image_features = features
    try:
        yield True
    finally:
        del inner.get_image_features  # the class's method again


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _timed(fn, name: str = ""):
    """``fn()`` and its wall seconds (printed with ``name``: the runs are long)."""
    start = time.perf_counter()
    out = fn()
    seconds = round(time.perf_counter() - start, 2)
    if name:
        print(f"{name}: {seconds} s", flush=True)
    return out, seconds


@torch.no_grad()
def head_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and every head's last-position output ``(B, layers, heads, head_dim)`` (fp32) of one forward."""
    from mfv.hooks import record_heads

    with record_heads(model) as recording:
        logits = model.forward(batch.prompts)
    return logits, recording.stacked().float()


@torch.no_grad()
def null_patch_and_reference(model, corrupted, means: torch.Tensor, aie: torch.Tensor
                              ) -> tuple[dict[str, Any], torch.Tensor]:
    """The null patch (each head patched with its own activation: every prompt its own "relation",
    as tests/test_aie.py) and the reference on the heads of largest |AIE| (one forward each); with
    the unpatched logits."""
    from mfv.hooks import HeadPatch, patch_heads
    from mfv.method.aie import answer_probability, indirect_effects

    logits, own = head_outputs(model, corrupted)
    alone = dataclasses.replace(corrupted, relation_ids=torch.arange(len(corrupted)))
    null, null_s = _timed(lambda: indirect_effects(model, alone, own, "fast"), "null patch")
    base = answer_probability(logits, corrupted.answer_ids)
    relation = int(corrupted.relation_ids[0])
    heads = [divmod(int(i), model.num_heads) for i in aie.abs().flatten().topk(REFERENCE_HEADS).indices]
    diffs = []
    for layer, head in heads:
        patch = HeadPatch(torch.tensor([0]), torch.tensor([layer]), torch.tensor([head]), means[relation, layer, head][None])
        with patch_heads(model, patch):
            patched = answer_probability(model.forward(corrupted.prompts), corrupted.answer_ids)
        diffs.append(abs(float(patched[0] - base[0]) - float(aie[layer, head])))
    return {"null_patch": float(null.abs().max()), "null_patch_s": null_s,
            "reference_heads": [list(h) for h in heads], "reference_aie": [float(aie[h]) for h in heads],
            "max_diff_aie": max(diffs), "answer_probability": float(base[0])}, logits


@torch.no_grad()
def steered_difference(model, corrupted, means: torch.Tensor, aie: torch.Tensor, plain: torch.Tensor
                        ) -> dict[str, Any]:
    """An FV (top-10 heads of this prompt's AIE) at the middle layer: minimal path vs full forward
    (and how far it moves the ``plain``, unsteered, logits)."""
    from mfv.method.aie import top_heads
    from mfv.method.function_vector import build_function_vector
    from mfv.steering import Injection, minimal_logits, prompt_pass, steered_logits

    layer = model.num_layers // 2
    vector = build_function_vector(model, means[int(corrupted.relation_ids[0])], top_heads(aie, 10))
    injection = Injection.at(layer, vector)
    minimal = minimal_logits(model, prompt_pass(model, corrupted.prompts), injection)
    if minimal is None:
        raise RuntimeError("the family has no minimal steering path")
    full = steered_logits(model, corrupted.prompts, injection)
    return {"steer_layer": layer, "max_diff_steered_logits": float((minimal.float() - full.float()).abs().max()),
            "steering_effect": float((full.float() - plain.float()).abs().max()),
            "max_abs_logit": float(full.float().abs().max())}


def rehearse(family_name: str, work: Path, layers: int | None) -> dict[str, Any]:
    """Loads the release in this process and runs the checks on one 4-shot prompt."""
    from mfv.data.episodes import encode_episodes
    from mfv.hardware import cpu_model
    from mfv.method.aie import indirect_effects
    from mfv.models import hf_families

    load_before = uptime()
    model, load_s = _timed(lambda: load_release(family_name, work / "release", "cpu", "bfloat16"), "load")
    load_rss = peak_rss_bytes()
    eval_sampler, _ = samplers(work, 1)
    clean = encode_episodes(model, [eval_sampler.episode(0, "clean")], RELATIONS)
    corrupted = encode_episodes(model, [eval_sampler.episode(0, "corrupted")], RELATIONS)
    # One prompt's head outputs stand for the relation means (one prompt has one relation).
    (_, own), means_s = _timed(lambda: head_outputs(model, clean), "clean forward")
    means = own.expand(len(RELATIONS), *own.shape[1:])
    aie, aie_s = _timed(lambda: indirect_effects(model, corrupted, means, "fast")[0], "fast AIE")
    if family_name == OPENFLAMINGO:
        from benchmarks.full_size import RELEASES

        release_name, text = RELEASES[OPENFLAMINGO], {"num_hidden_layers": model.num_layers}
    else:
        release_name, text = hf_families()[family_name].default_path, hf_families()[family_name].stand_in.release["text_config"]
    result = {
        "family": family_name, "release": release_name,
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "layers_run": model.num_layers, "release_layers": text["num_hidden_layers"],
        "depth": "full" if layers is None else (f"reduced: full width, {layers} of {text['num_hidden_layers']} "
                                                "decoder layers (the full depth does not fit this machine's memory or CPU time beside others)"),
        "heads": model.num_layers * model.num_heads, "dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": ("word-level stand-in of the release's 50277 tokens (the real one cannot be downloaded)" if family_name == OPENFLAMINGO
                      else "byte-level BPE stand-in (release vocabulary rows kept); the real one cannot be downloaded"),
        "sequence_length": int(corrupted.prompts.input_ids.shape[1]), "shots": 4, "images_per_prompt": 5,
        "load_s": load_s, "load_peak_rss_gb": round(load_rss / 1e9, 2), "means_s": means_s,
        "seconds_per_prompt": aie_s,
    }
    with reused_image_features(model) as reused:
        checks, plain = null_patch_and_reference(model, corrupted, means, aie)
        result.update(checks)
        result.update(steered_difference(model, corrupted, means, aie, plain))
    result["image_features"] = ("computed in clean forward and fast AIE; reused by the later checks" if reused
                                else "computed in every pass")
    result.update(peak_rss_gb=round(peak_rss_bytes() / 1e9, 2), torch_threads=torch.get_num_threads(),
                  host_cpu=cpu_model(), uptime_before=load_before, uptime_after=uptime())
    return result


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per rehearsal JSON: depth, prompt, time and the exactness checks."""
    rows = ["| family | release | layers run | tokens | s per prompt (fast AIE) | null patch | fast vs reference AIE "
            "| steered logits max diff (max logit) | peak RSS GB | host |", "|" + "---|" * 10]
    for r in results:
        rows.append(f"| {r['family']} | {r['release']} | {r['layers_run']} of {r['release_layers']} | "
                    f"{r['sequence_length']} | {r['seconds_per_prompt']} | {r['null_patch']:.1g} | {r['max_diff_aie']:.1e} "
                    f"| {r['max_diff_steered_logits']:.3g} ({format(r['max_abs_logit'], '.3g') if 'max_abs_logit' in r else '-'}) "
                    f"| {r['peak_rss_gb']} "
                    f"| {r['host_cpu']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", help="a Hugging Face family (mfv.models.hf_families) or openflamingo")
    parser.add_argument("--work", help="folder for the release files and data")
    parser.add_argument("--json", help="where the result goes")
    parser.add_argument("--layers", type=int, help="keep N decoder layers at full width (a release too big here)")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of these results and exit")
    parser.add_argument("--stage", choices=["all", "build", "run"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        return print(markdown_table([json.loads(Path(f).read_text()) for f in args.table]))
    missing = [f"--{name}" for name in ("family", "work", "json") if getattr(args, name) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --table JSON ...)")
    from mfv.models import hf_families

    if args.family not in (*hf_families(), OPENFLAMINGO):
        parser.error(f"--family {args.family!r}: one of {sorted([*hf_families(), OPENFLAMINGO])}")
    if args.family == OPENFLAMINGO and args.layers is not None:
        parser.error("--layers: the OpenFlamingo-4B layout is rehearsed at its full depth")
    work = Path(args.work)
    if args.stage == "build":
        return build(args.family, work, args.layers)
    if args.stage == "all":
        if not (work / "release" / "COMPLETE").is_file():
            print(f"writing the release layout under {work}/release (random weights, once)", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", "build"], check=True)
        # A fresh process: its peak memory is the loader's, not the builder's.
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", "run"], check=True)
        return
    from mfv.io import atomic_write_text

    result = rehearse(args.family, work, args.layers)
    result["build"] = (work / "release" / "COMPLETE").read_text().strip()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
