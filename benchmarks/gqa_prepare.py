"""GQA preparation at full scale: a synthetic train scene-graph file of GQA's size and schema.

    python benchmarks/gqa_prepare.py --json runs/bench/gqa_prepare.json [--images 75000]

Writes ~75k image entries (objects with name, x, y, w, h, attributes, relations), runs
``python -m mfv.data.gqa prepare`` on it in a child process and reports wall time and the
child's peak resident memory, next to the streaming reader's throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["cat", "dog", "man", "woman", "car", "table", "chair", "cup", "plate", "tree", "sign", "window", "door",
         "shirt", "hat", "bag", "bike", "horse", "boat", "lamp", "bottle", "phone", "book", "clock", "bowl"]
PREDICATES = ["to the left of", "to the right of", "above", "below", "next to", "behind", "in front of", "wearing",
              "holding", "on", "near", "has"]


def write_scene_graphs(path: Path, count: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with path.open("w") as handle:
        handle.write("{")
        for i in range(count):
            width, height = rng.randint(300, 640), rng.randint(300, 640)
            ids = [str(10_000_000 + i * 40 + k) for k in range(rng.randint(8, 24))]
            objects = {}
            for object_id in ids:
                w, h = rng.randint(10, width // 2), rng.randint(10, height // 2)
                relations = [{"name": rng.choice(PREDICATES), "object": rng.choice(ids)} for _ in range(rng.randint(0, 8))]
                objects[object_id] = {"name": rng.choice(NAMES), "x": rng.randint(0, width - w), "y": rng.randint(0, height - h),
                                      "w": w, "h": h, "attributes": rng.sample(["red", "large", "wooden", "white", "small"], 2),
                                      "relations": [r for r in relations if r["object"] != object_id]}
            entry = {"width": width, "height": height, "location": "", "weather": "", "objects": objects}
            handle.write(("," if i else "") + json.dumps(str(2_000_000 + i)) + ":" + json.dumps(entry))
        handle.write("}")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="runs/bench/gqa_prepare.json")
    parser.add_argument("--images", type=int, default=75000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sg = tmp / "train_sceneGraphs.json"
        size = write_scene_graphs(sg, args.images)
        images = tmp / "images"
        images.mkdir()
        blank = tmp / "blank.jpg"
        from PIL import Image

        Image.new("RGB", (8, 8)).save(blank)
        for i in range(args.images):
            (images / f"{2_000_000 + i}.jpg").symlink_to(blank)
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-m", "mfv.data.gqa", "prepare", "--scene_graphs", json.dumps([str(sg)]),
                                "--images", str(images), "--relations", '["spatial"]', "--out", str(tmp / "out"),
                                "--progress", "false"],
                               capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if child.returncode:
            raise SystemExit(child.stderr[-2000:])
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        summary = json.loads((tmp / "out" / "summary.json").read_text())
    result = {
        "images": args.images,
        "scene_graph_mb": size / 2**20,
        "prepare_seconds": seconds,
        "peak_memory_mb": peak_kb / 1024,
        "json_mb_per_second": size / 2**20 / seconds,
        "tasks": summary["tasks"],
        "images_with_tasks": summary["images_with_tasks"],
        "removed_images": summary["removed_images"],
        "limits": {"seconds": 600, "memory_mb": 8192},
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
