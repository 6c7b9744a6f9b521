"""``mfv <command> [options]``: every job behind one entry point, one convention.

Every command takes ``--help`` (each option with its default), ``--config FILE`` and
``--print_config``, with dotted overrides (jsonargparse / LightningCLI).

    mfv train --config configs/toy.yaml                     # = python train.py
    mfv evaluate --config configs/toy.yaml --fv F --out D   # = python evaluate.py
    mfv prepare-data --config configs/toy.yaml              # the DataModule's splits, exactly as it reads them
    mfv prepare-gqa --scene_graphs [a.json,b.json] --images DIR --relations [spatial] --out data/gqa
    mfv generate-synthetic --out DIR --split eval --num_images 100
    mfv demo                                                # = make demo (without set-up)
    mfv train-organism --out checkpoints/organism           # the model organism's recipe
    mfv seeds --config configs/toy.yaml --seeds 3            # mean and spread over seeds
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def _prepare_data(args: Sequence[str]) -> None:
    """Generates or checks the data a config's DataModule reads (no model is loaded)."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="mfv prepare-data", description=_prepare_data.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a train.py config")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    for other in ("seed_everything", "model", "trainer", "aie", "checkpoint", "last_checkpoint", "evaluation"):
        parser.add_argument(f"--{other}", type=object | None, default=None, help="(ignored here)")
    config = parser.instantiate_classes(parser.parse_args(list(args)))
    config.data.prepare_data()
    print(f"data ready: {getattr(config.data, 'data_dir', getattr(config.data, 'dataset_dir', ''))}")


def _commands() -> dict[str, Callable[[Sequence[str]], object]]:
    import importlib

    from mfv import demo, seeds
    from mfv.commands import evaluate, train
    from mfv.data import synthetic
    from mfv.organism import train as organism

    return {"train": train.main, "evaluate": evaluate.main, "prepare-data": _prepare_data,
            "prepare-gqa": importlib.import_module("mfv.data.gqa.prepare").main,
            "generate-synthetic": synthetic.main, "demo": demo.main,
            "train-organism": organism.main, "seeds": seeds.main}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        print("commands: " + ", ".join(commands))
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
