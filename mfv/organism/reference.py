"""A small fixed episode set that pins a trained organism's behaviour.

    python -m mfv.organism.reference --model checkpoints/organism   # writes reference.json there

The set is generated from fixed seeds (200 held-out scenes at the model's image size), so a
test can rebuild it anywhere and check that the committed weights still give the recorded
accuracies (0-, 1- and 4-shot, the paper's prompts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mfv.data.episodes import read_scenes
from mfv.data.synthetic import generate_split
from mfv.models.openflamingo import OpenFlamingoAdapter, load_tiny_openflamingo
from mfv.organism.train import ScenePool, evaluate_icl

REFERENCE_FILE = "reference.json"
SCENES, SEED, EPISODES, SHOTS = 200, 303, 200, (0, 1, 4)


def fixed_episode_accuracies(adapter: OpenFlamingoAdapter, work_dir: str | Path | None = None) -> dict[str, float]:
    """Accuracies of ``adapter`` on the fixed episode set, keyed ``icl_0``, ``icl_1``, ``icl_4``."""
    image_size = adapter.tiny_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        split = generate_split(root, "test", SCENES, image_size, seed=SEED, progress=False)
        pool = ScenePool(read_scenes(split), image_size)
        return {f"icl_{shots}": evaluate_icl(adapter, pool, shots, EPISODES) for shots in SHOTS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.organism.reference")
    parser.add_argument("--model", default="checkpoints/organism")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    adapter = load_tiny_openflamingo(args.model)
    record = {"scenes": SCENES, "seed": SEED, "episodes": EPISODES, "accuracy": fixed_episode_accuracies(adapter)}
    (Path(args.model) / REFERENCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
