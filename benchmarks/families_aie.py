"""Fast AIE against the reference loop on every registered family's tiny stand-in.

    python benchmarks/families_aie.py --json benchmarks/results/families_aie.json
    python benchmarks/aie.py --families --json benchmarks/results/families_aie.json  # the same

One thread, CPU time, side by side in one run. Per stand-in (two 2-shot corrupted prompts,
every head of every layer): ``speedup`` = reference CPU time / fast CPU time, ``max_abs_diff``
(fast vs reference), and FLOPs (``torch.utils.flop_counter``, matrix products):

* ``reference``: one full forward per site plus the unpatched one;
* ``minimal``: one full forward, then for each site the last position of the layers at and
  above the patched one and its logits (per-layer last-position FLOPs measured on one row);
* ``executed``: what fast AIE ran; ``bound`` = reference / minimal, ``flop_efficiency`` =
  minimal / executed.

Every family runs the one shared minimal path (:mod:`mfv.models.replay`: one forward, then
each row from its patched layer up), through its backbone's layer runner
(:mod:`mfv.models.openflamingo.last_position`, :mod:`mfv.models.hf_last_position`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

RELATIONS = ["above", "below", "left", "right"]


def _flops(fn) -> tuple[object, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


def _timed(fn) -> tuple[object, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


@torch.no_grad()
def measure(name: str, scenes) -> dict:
    from mfv.data.episodes import EpisodeSampler, encode_episodes
    from mfv.method.aie import indirect_effects, mean_head_activations
    from mfv.models import BACKBONES

    adapter = BACKBONES[name].build_stand_in()
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    clean = encode_episodes(adapter, [sampler.episode(i, "clean") for i in range(4)], RELATIONS)
    means = 30 * mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(2)], RELATIONS)
    fast, fast_s = _timed(lambda: indirect_effects(adapter, corrupted, means, "fast"))
    reference, reference_s = _timed(lambda: indirect_effects(adapter, corrupted, means, "reference"))
    _, executed = _flops(lambda: indirect_effects(adapter, corrupted, means, "fast"))
    _, reference_flops = _flops(lambda: indirect_effects(adapter, corrupted, means, "reference"))
    layers, heads = adapter.num_layers, adapter.num_heads
    _, full = _flops(lambda: adapter.forward(corrupted.prompts))
    state = adapter.prefill(corrupted.prompts)
    _, one_row = _flops(lambda: adapter.forward_last(state, torch.tensor([0])))
    language_model = getattr(adapter.model, "lang_encoder", adapter.model)  # OpenFlamingo wraps its LM
    head = 2 * adapter.hidden_size * language_model.get_output_embeddings().weight.shape[0]
    step = (one_row - head) / layers
    prompts = len(corrupted)
    minimal = full + prompts * sum(heads * (layers - layer) * step + heads * head for layer in range(layers))
    return {"stand_in": name, "layers": layers, "heads": heads, "fast_cpu_s": round(fast_s, 3),
            "reference_cpu_s": round(reference_s, 3), "speedup": round(reference_s / fast_s, 2),
            "max_abs_diff": float((fast - reference).abs().max()), "flops": {
                "reference": reference_flops, "minimal": int(minimal), "executed": executed},
            "bound": round(reference_flops / minimal, 2), "flop_efficiency": round(minimal / executed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="runs/bench/families_aie.json")
    run(parser.parse_args().json)


def run(json_path: str) -> None:
    """Measures every distinct stand-in of the registry and writes ``json_path``."""
    from mfv.data.episodes import read_scenes
    from mfv.data.synthetic import generate_split
    from mfv.models import BACKBONES

    torch.set_num_threads(1)
    groups: dict[str, str] = {}
    for name, spec in sorted(BACKBONES.items()):
        groups.setdefault(repr((spec.stand_in, sorted(spec.stand_in_options.items()))), name)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = read_scenes(generate_split(Path(tmp), "eval", 12, image_size=64, workers=1, progress=False))
        rows = [measure(name, scenes) for name in groups.values()]
    for row in rows:
        print(f"{row['stand_in']:<24} speedup {row['speedup']:>6}x  bound {row['bound']:>6}x  "
              f"flop efficiency {row['flop_efficiency']:.3f}  max |diff| {row['max_abs_diff']:.1e}")
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": 1, "clock": "process_time", "families": rows}, indent=2))


if __name__ == "__main__":
    main()
