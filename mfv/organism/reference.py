"""A small fixed episode set that pins a trained organism's behaviour, scored through the
production path (``EpisodeSampler`` -> ``encode_episodes`` -> ``adapter.forward`` -> ``Score``).

    python -m mfv.organism.reference --model checkpoints/organism   # writes reference.json there

Scenes come from fixed seeds at the model's image size (trained objects and held-out
objects), so a test can rebuild the set anywhere and check that the committed weights still
give the recorded accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import RELATIONS, generate_split
from mfv.evaluation.scoring import Score
from mfv.io import atomic_write_text
from mfv.models.base import BackboneAdapter
from mfv.models.openflamingo import load_tiny_openflamingo

REFERENCE_FILE = "reference.json"
SCENES, EPISODES = 200, 200
SETS = {"": ("test", 303), "novel_": ("novel", 313)}
SHOTS = (0, 1, 4)


@torch.no_grad()
def fixed_episode_accuracies(adapter: BackboneAdapter, work_dir: str | Path | None = None,
                             batch_size: int = 50) -> dict[str, float]:
    """Accuracies (mean over relations) keyed ``icl_0``, ``icl_1``, ``icl_4`` and ``novel_icl_*``."""
    relations = list(RELATIONS)
    image_size = adapter.tiny_config.image_size
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        for prefix, (split, seed) in SETS.items():
            folder = generate_split(root / split, split, SCENES, image_size, seed=seed, workers=1, progress=False)
            sampler = EpisodeSampler(read_scenes(folder), relations, shots=4, seed=seed)
            for shots in SHOTS:
                mode = "clean" if shots else "zero_shot"
                outcomes, relation_ids = [], []
                for start in range(0, EPISODES, batch_size):
                    episodes = [sampler.draw(i, mode, shots) for i in range(start, start + batch_size)]
                    batch = encode_episodes(adapter, episodes, relations)
                    outcomes.append(adapter.forward(batch.prompts).argmax(-1).cpu() == batch.answer_ids)
                    relation_ids.append(batch.relation_ids)
                score = Score.from_tensors(relations, torch.cat(outcomes), torch.cat(relation_ids))
                results[f"{prefix}icl_{shots}"] = score.accuracy
    return results


def write_reference(directory: str | Path) -> dict:
    """Measures the fixed set on the model in ``directory`` and records it there."""
    torch.manual_seed(0)
    adapter = load_tiny_openflamingo(directory)
    record = {"scenes": SCENES, "episodes": EPISODES, "sets": {k or "trained": v for k, v in SETS.items()},
              "accuracy": fixed_episode_accuracies(adapter)}
    atomic_write_text(Path(directory) / REFERENCE_FILE, json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.organism.reference",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="checkpoints/organism", help="folder of a saved tiny model")
    print(json.dumps(write_reference(parser.parse_args(argv).model)))


if __name__ == "__main__":
    main()
