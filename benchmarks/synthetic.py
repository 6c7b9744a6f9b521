"""Synthetic-scene generation speed: images/s with 1 process and with all cores, side by side.

    python benchmarks/synthetic.py --json runs/bench/synthetic.json [--num-images 400] [--full]

``--full`` generates the whole paper set (8000 images at 800 px) and reports its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from mfv.data.synthetic import PAPER_SIZES, generate_split


def timed(out: Path, split: str, n: int, size: int, workers: int) -> float:
    start = time.perf_counter()
    generate_split(out, split, n, image_size=size, workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="runs/bench/synthetic.json")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=800)
    parser.add_argument("--full", action="store_true", help="also time the full paper set")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        serial = timed(Path(tmp) / "a", "eval", args.num_images, args.image_size, 1)
        parallel = timed(Path(tmp) / "b", "eval", args.num_images, args.image_size, cores)
        result = {
            "image_size": args.image_size,
            "num_images": args.num_images,
            "workers": cores,
            "images_per_second_1_process": args.num_images / serial,
            "images_per_second_parallel": args.num_images / parallel,
            "parallel_speedup": serial / parallel,
        }
        if args.full:
            total = sum(timed(Path(tmp) / "full", s, n, 800, cores) for s, n in PAPER_SIZES.items())
            result["full_paper_set_seconds"] = total
            result["full_paper_set_images"] = sum(PAPER_SIZES.values())
    for key, value in result.items():
        print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
