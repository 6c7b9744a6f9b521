"""``python evaluate.py --config configs/X.yaml [--fv PATH] --out DIR [--limit N]``.

Reads the same YAML as ``train.py`` (model, data, aie sections) and writes into DIR:

* ``metrics.json`` — schema below; ``summary`` maps stable condition names to mean
  accuracy (mean over relations);
* ``report.md`` — tables in the shape of the paper's;
* ``layer_sweep.png``, ``k_sweep.png``, ``aie_heatmap.png``, ``conditions.png``;
* ``tensorboard/`` — one scalar per condition.

``metrics.json`` schema (version 1)::

    {"schema_version": 1,
     "summary": {condition: accuracy, ...},
     "conditions": {condition: {"split": str, "accuracy": float, "n": int,
                                "per_relation": {relation: {"correct", "total", "accuracy"}}}},
     "sweeps": {"layer": {"x": [layers], "accuracy": [...]}, "k": {"x": [ks], "accuracy": [...]}},
     "analogy_weights": {diagonal relation: {trained relation: mean weight}},
     "extraction": {...}, "settings": {...}}

Condition names: ``zero_shot``, ``zero_shot_fv``, ``zero_shot_finetuned_fv`` (with
``--fv``), ``icl_N`` (N in ``--shots``), ``icl_shuffled_N``, ``icl_shuffled_N_fv``,
``novel_*`` (same on held-out objects), ``analogy_icl_{0,1,4}``, ``analogy_fv_<relation>``,
``analogy_composite_fv`` (normalised weights), ``analogy_composite_fv_uniform``,
``analogy_composite_fv_raw``, ``analogy_composite_finetuned_fv`` (with ``--fv``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from mfv import plots
from mfv.errors import ConfigError, MfvError
from mfv.evaluation import (
    Score,
    analogy_episodes,
    analogy_problems,
    composite_weights,
    episode_batches,
    function_vectors_from_means,
    score,
    score_composite,
)
from mfv.method.aie import top_heads
from mfv.method.extraction import ExtractionSettings, extract_function_vectors
from mfv.method.function_vector import FunctionVectorSet
from mfv.models import load_backbone
from mfv.training.callbacks import data_fingerprint

SCHEMA_VERSION = 1


def load_config(path: str) -> dict[str, Any]:
    """Reads a train.py YAML config; errors name the file and the field."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} not found")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML ({exc})") from exc
    for section in ("model", "data"):
        if not isinstance(config.get(section), dict):
            raise ConfigError(f"{config_path}: missing section '{section}'")
    if "backbone" not in config["model"]:
        raise ConfigError(f"{config_path}: missing field 'model.backbone'")
    return config


def build_datamodule(config: dict[str, Any]):
    data = config["data"]
    class_path = data.get("class_path", "mfv.data.datamodule.SyntheticRelationDataModule")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"data.class_path {class_path!r} cannot be imported") from exc
    kwargs = dict(data.get("init_args", {}))
    kwargs.setdefault("relations", config["model"].get("relations", ["above", "below", "left", "right"]))
    return cls(**kwargs)


def _icl_episodes(sampler, count: int, mode: str, shots: int):
    return [sampler.episode(i, mode, shots) for i in range(min(count, len(sampler)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    model_cfg = config["model"]
    adapter = load_backbone(model_cfg["backbone"], **(model_cfg.get("backbone_options") or {}))
    adapter.freeze()
    if args.device:
        adapter.model.to(args.device)
    datamodule = build_datamodule(config)
    datamodule.prepare_data()
    datamodule.attach(adapter)
    relations = list(datamodule.relations)
    layer = model_cfg.get("layer")
    layer = adapter.num_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < adapter.num_layers:
        raise ConfigError(f"model.layer = {layer} is out of range; valid layers: 0..{adapter.num_layers - 1}")
    aie_cfg = config.get("aie", {}) or {}
    settings = ExtractionSettings(
        relations=relations,
        shots=datamodule.shots,
        num_mean_prompts=aie_cfg.get("num_mean_prompts", 200),
        num_aie_prompts=aie_cfg.get("num_aie_prompts", 100),
        k=aie_cfg.get("k", 10),
        layer=layer,
        selection=aie_cfg.get("selection", "pooled"),
        algorithm=aie_cfg.get("algorithm", "fast"),
        batch_size=aie_cfg.get("batch_size", 8),
        seed=datamodule.seed,
    )
    extraction = extract_function_vectors(
        adapter, datamodule.sampler("eval"), settings, aie_cfg.get("cache_dir", "runs/aie_cache"),
        data_fingerprint(datamodule.split_dir("eval")),
    )
    extracted = extraction.fvs.stacked(relations)
    finetuned = None
    layer_finetuned = layer
    if args.fv:
        fv_set = FunctionVectorSet.load(args.fv, adapter)
        finetuned = fv_set.stacked(relations)
        layer_finetuned = fv_set.layer
    batch_size = args.batch_size or datamodule.batch_size
    limit = args.limit or 10**9
    conditions: dict[str, tuple[str, Score]] = {}

    def evaluate_split(split: str, prefix: str) -> None:
        sampler = datamodule.sampler(split)
        zero = episode_batches(adapter, _icl_episodes(sampler, limit, "zero_shot", 0), relations, batch_size)
        conditions[f"{prefix}zero_shot"] = (split, score(adapter, zero, relations))
        conditions[f"{prefix}zero_shot_fv"] = (split, score(adapter, zero, relations, extracted, layer))
        if finetuned is not None:
            conditions[f"{prefix}zero_shot_finetuned_fv"] = (
                split, score(adapter, zero, relations, finetuned, layer_finetuned))
        for shots in args.shots:
            if shots >= len(sampler.demo_pool):
                continue
            icl = episode_batches(adapter, _icl_episodes(sampler, limit, "clean", shots), relations, batch_size)
            conditions[f"{prefix}icl_{shots}"] = (split, score(adapter, icl, relations))
        shuffled = episode_batches(
            adapter, _icl_episodes(sampler, limit, "shuffled", datamodule.shots), relations, batch_size)
        conditions[f"{prefix}icl_shuffled_{datamodule.shots}"] = (split, score(adapter, shuffled, relations))
        conditions[f"{prefix}icl_shuffled_{datamodule.shots}_fv"] = (
            split, score(adapter, shuffled, relations, extracted, layer))

    print("conditions on the test split ...", file=sys.stderr)
    evaluate_split("test", "")
    if datamodule.has_split("novel"):
        print("conditions on the novel-objects split ...", file=sys.stderr)
        evaluate_split("novel", "novel_")

    # ----- sweeps on the test split (zero-shot + extracted-means FV) ---------------
    saved = torch.load(extraction.cache_dir / "aie.pt", weights_only=True)
    means, pooled = saved["means"], saved["pooled"]
    test_zero = episode_batches(
        adapter, _icl_episodes(datamodule.sampler("test"), min(limit, args.sweep_limit), "zero_shot", 0),
        relations, batch_size)
    layer_accuracy = [score(adapter, test_zero, relations, extracted, l).accuracy for l in range(adapter.num_layers)]
    max_k = min(args.max_k, pooled.numel())
    ks = list(range(1, max_k + 1))
    k_accuracy = []
    for k in ks:
        vectors = function_vectors_from_means(adapter, means, top_heads(pooled, k))
        k_accuracy.append(score(adapter, test_zero, relations, vectors, layer).accuracy)

    # ----- analogies on the composite split -----------------------------------------
    weight_summary: dict[str, dict[str, float]] = {}
    if datamodule.has_split("composite"):
        evaluate_analogies(adapter, datamodule, relations, extracted, finetuned, layer,
                           layer_finetuned, limit, batch_size, conditions,
                           weight_summary)

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "summary": {name: s.accuracy for name, (_, s) in conditions.items()},
        "conditions": {name: {"split": split, **s.as_dict()} for name, (split, s) in conditions.items()},
        "sweeps": {"layer": {"x": list(range(adapter.num_layers)), "accuracy": layer_accuracy},
                   "k": {"x": ks, "accuracy": k_accuracy}},
        "analogy_weights": weight_summary,
        "extraction": extraction.summary(),
        "settings": {"config": args.config, "fv": args.fv, "limit": args.limit, "layer": layer,
                     "backbone": adapter.backbone_id, "shots": args.shots},
    }
    write_outputs(Path(args.out), metrics, extraction.aie_pooled, next(iter(extraction.fvs.heads.values())))
    return metrics


def evaluate_analogies(adapter, datamodule, relations, extracted, finetuned, layer, layer_finetuned, limit,
                       batch_size, conditions, weight_summary) -> None:
    """One-shot analogies on the untrained diagonal relations (composite split)."""
    composite_sampler = datamodule.sampler("composite")
    diagonal = composite_sampler.relations
    problems = analogy_problems(composite_sampler, min(limit, len(composite_sampler)))
    for shots in (0, 1, 4):
        episodes = analogy_episodes(problems, shots, composite_sampler)
        conditions[f"analogy_icl_{shots}"] = (
            "composite", score(adapter, episode_batches(adapter, episodes, diagonal, batch_size), diagonal))
    zero_episodes = analogy_episodes(problems, 0, composite_sampler)
    zero_batches = episode_batches(adapter, zero_episodes, diagonal, batch_size)
    for r, relation in enumerate(relations):
        conditions[f"analogy_fv_{relation}"] = (
            "composite", score(adapter, zero_batches, diagonal, extracted[r], layer))
    for mode, name in (("normalized", "analogy_composite_fv"), ("uniform", "analogy_composite_fv_uniform"),
                       ("raw", "analogy_composite_fv_raw")):
        weights = composite_weights(adapter, problems, extracted, layer, mode, batch_size)
        conditions[name] = ("composite", score_composite(adapter, problems, diagonal, extracted, weights, layer, batch_size))
        if mode == "normalized":
            for d in diagonal:
                rows = [i for i, p in enumerate(problems) if p.relation == d]
                if rows:
                    weight_summary[d] = dict(zip(relations, weights[rows].mean(0).tolist()))
    if finetuned is not None:
        weights = composite_weights(adapter, problems, finetuned, layer_finetuned, "normalized", batch_size)
        conditions["analogy_composite_finetuned_fv"] = (
            "composite", score_composite(adapter, problems, diagonal, finetuned, weights, layer_finetuned, batch_size))

def write_outputs(out: Path, metrics: dict, aie: torch.Tensor, heads) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report_markdown(metrics))
    sweeps = metrics["sweeps"]
    plots.save(plots.line_plot(sweeps["layer"]["x"], {"zero-shot + FV": sweeps["layer"]["accuracy"]},
                               "injection layer", "accuracy", "Accuracy vs injection layer"), out / "layer_sweep.png")
    plots.save(plots.line_plot(sweeps["k"]["x"], {"zero-shot + FV": sweeps["k"]["accuracy"]},
                               "heads K", "accuracy", "Accuracy vs number of heads"), out / "k_sweep.png")
    plots.save(plots.aie_heatmap(aie, "AIE pooled over relations", heads), out / "aie_heatmap.png")
    plots.save(plots.bar_chart(metrics["summary"], "accuracy", "Accuracy by condition"), out / "conditions.png")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    for name, value in metrics["summary"].items():
        writer.add_scalar(f"eval/{name}", value, 0)
    for x, y in zip(sweeps["layer"]["x"], sweeps["layer"]["accuracy"]):
        writer.add_scalar("sweep/layer", y, x)
    for x, y in zip(sweeps["k"]["x"], sweeps["k"]["accuracy"]):
        writer.add_scalar("sweep/k", y, x)
    writer.close()


def _table(rows: list[tuple[str, dict]], relations: Sequence[str]) -> str:
    header = "| condition | " + " | ".join(relations) + " | mean | n |\n|---|" + "---|" * (len(relations) + 2) + "\n"
    lines = []
    for name, condition in rows:
        per = condition["per_relation"]
        cells = [f"{per[r]['accuracy']:.3f}" if r in per else "–" for r in relations]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{condition['accuracy']:.3f}** | {condition['n']} |")
    return header + "\n".join(lines) + "\n"


def report_markdown(metrics: dict) -> str:
    conditions = metrics["conditions"]

    def group(predicate) -> list[tuple[str, dict]]:
        return [(n, c) for n, c in conditions.items() if predicate(n)]

    def relations_of(rows) -> list[str]:
        seen: list[str] = []
        for _, c in rows:
            seen += [r for r in c["per_relation"] if r not in seen]
        return seen

    main_rows = group(lambda n: not n.startswith(("novel_", "analogy_")))
    novel_rows = group(lambda n: n.startswith("novel_"))
    analogy_rows = group(lambda n: n.startswith("analogy_"))
    extraction = metrics["extraction"]
    parts = [
        f"# mfv evaluation — {metrics['settings']['backbone']}\n",
        f"Injection layer {metrics['settings']['layer']}; heads ({len(next(iter(extraction['heads'].values())))}): "
        f"{next(iter(extraction['heads'].values()))}; top-10 heads carry "
        f"{extraction['top10_positive_aie_share']:.0%} of the positive AIE.\n",
        "## Test split (trained objects)\n", _table(main_rows, relations_of(main_rows)),
        "\n## Novel objects\n", _table(novel_rows, relations_of(novel_rows)),
        "\n## Analogies (untrained diagonal relations)\n", _table(analogy_rows, relations_of(analogy_rows)),
    ]
    if metrics.get("analogy_weights"):
        trained = list(next(iter(metrics["analogy_weights"].values())))
        parts.append("\nMean composite weights (normalised):\n\n| diagonal | " + " | ".join(trained) + " |\n|---|"
                     + "---|" * len(trained) + "\n")
        for d, w in metrics["analogy_weights"].items():
            parts.append(f"| {d} | " + " | ".join(f"{w[t]:.2f}" for t in trained) + " |\n")
    best_layer = max(range(len(metrics["sweeps"]["layer"]["accuracy"])),
                     key=lambda i: metrics["sweeps"]["layer"]["accuracy"][i])
    k_acc = metrics["sweeps"]["k"]["accuracy"]
    best_k = metrics["sweeps"]["k"]["x"][max(range(len(k_acc)), key=lambda i: k_acc[i])] if k_acc else None
    parts.append(f"\nBest injection layer: {best_layer}; best K: {best_k}. Plots: layer_sweep.png, k_sweep.png, "
                 f"aie_heatmap.png, conditions.png.\n")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate function vectors (see module doc).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--fv", default=None, help="fine-tuned FV file (safetensors) from train.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None, help="prompts per condition (quick runs)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 8, 10], help="ICL shot counts")
    parser.add_argument("--max-k", type=int, default=50, help="K sweep goes 1..max-k")
    parser.add_argument("--sweep-limit", type=int, default=200, help="prompts per sweep point")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        metrics = run(args)
    except (MfvError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(report_markdown(metrics))
    print(f"wrote {args.out}/metrics.json, report.md and plots")
    return metrics
