"""``mfv <command> [options]``: every job behind one entry point, one convention.

Every command takes ``--help`` (its main options; ``--help full``: each option with its
default and help), ``--config FILE`` and dotted overrides (jsonargparse / LightningCLI); ``mfv --version`` prints the version.

    mfv train --config configs/toy.yaml                     # = python train.py
    mfv evaluate --config configs/toy.yaml --fv F --out D   # = python evaluate.py
    mfv prepare-data --config configs/toy.yaml              # the DataModule's splits, exactly as it reads them
    mfv prepare-gqa --scene_graphs [a.json,b.json] --images DIR --relations [spatial] --out data/gqa
    mfv generate-synthetic --out DIR --split eval --num_images 100
    mfv demo                                                # = make demo (without set-up)
    mfv train-organism --out checkpoints/organism           # the model organism's recipe
    mfv seeds --config configs/toy.yaml --seeds 3            # mean and spread over seeds
    mfv models                                              # backbone names, stand-ins included

A config is a file or a bundled config's name (``--config toy``), from any folder. ``--help`` is
short; ``--help full`` lists every option. ``--threads N`` (or ``MFV_THREADS``) sets torch's
CPU threads (default: the cores this process may use).

A list option takes ``[a,b]`` or, for one element, the bare value: ``--relations agentic``
is ``--relations [agentic]`` and ``--scene_graphs train.json`` is ``--scene_graphs
[train.json]``; several bare values after the option are one list (``--scene_graphs *.json``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from mfv.arguments import bracket_lists


# --------------------------------------------------------------------------- commands


def _prepare_data(args: Sequence[str]) -> None:
    """Generates or reads and checks the data a config's train run reads, with the run's
    ``model.relations`` (no model is loaded), and prints its prompts per split and relation."""
    import argparse

    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    from mfv.preflight import exit_on_bad_input
    from mfv.resources import resolve_configs
    from mfv.training.module import FunctionVectorModule

    parser = ArgumentParser(prog="mfv prepare-data", description=_prepare_data.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a train.py config")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    # As train.py: the model's relations are the data's; the model itself is not built.
    parser.add_class_arguments(FunctionVectorModule, "model", instantiate=False, sub_configs=True)
    parser.link_arguments("model.relations", "data.init_args.relations")
    # The config's other sections are read and ignored (not listed in --help).
    for other in ("seed_everything", "trainer", "aie", "checkpoint", "last_checkpoint", "evaluation"):
        parser.add_argument(f"--{other}", type=object | None, default=None, help=argparse.SUPPRESS)
    # Bad data (an unreadable image, a bad examples file) is one line naming it, not a traceback.
    with exit_on_bad_input(ValueError):
        args = resolve_configs(bracket_lists(args, model=FunctionVectorModule))
        config = parser.instantiate_classes(parser.parse_args(args))
        config.data.prepare_data()
        counts = split_counts(config.data)
    print(f"data ready: {getattr(config.data, 'data_dir', getattr(config.data, 'dataset_dir', ''))}")
    print(counts_table(counts))


def split_counts(datamodule) -> dict[str, dict[str, int]]:
    """split -> relation -> prompts, for every split ``datamodule`` has, read as train would
    (each split's sampler is built: a split without one of the relations fails here)."""
    from collections import Counter

    from mfv.data.datamodule import SPLITS

    counts = {}
    for split in SPLITS:
        if datamodule.has_split(split):
            queries = Counter(scene.relation for scene in datamodule.sampler(split).queries)
            counts[split] = {relation: queries.get(relation, 0) for relation in datamodule.relations}
    return counts


def counts_table(counts: dict[str, dict[str, int]]) -> str:
    """``counts`` as an aligned table: one row per split, one column per relation, and the total."""
    relations = list(next(iter(counts.values()), {}))
    header = ["split", *relations, "total"]
    rows = [[split, *map(str, row.values()), str(sum(row.values()))] for split, row in counts.items()]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows))


def _prepare_gqa(args: Sequence[str]) -> object:
    import importlib

    prepare = importlib.import_module("mfv.data.gqa.prepare")  # the package exports a function of that name
    return prepare.main(bracket_lists(args, prepare.prepare))


def _lightning(command: Callable[[Sequence[str]], object]) -> Callable[[Sequence[str]], object]:
    """train / evaluate with bare values of their list options accepted."""

    def run(args: Sequence[str]) -> object:
        from mfv.evaluation.protocol import EvaluationSettings
        from mfv.method.extraction import AIESettings
        from mfv.training.module import FunctionVectorModule

        return command(bracket_lists(args, model=FunctionVectorModule, aie=AIESettings, evaluation=EvaluationSettings))

    return run


COMMANDS = ("train", "evaluate", "prepare-data", "prepare-gqa", "generate-synthetic", "demo", "train-organism", "seeds")


def _commands() -> dict[str, Callable[[Sequence[str]], object]]:
    from mfv import demo, seeds
    from mfv.commands import evaluate, train
    from mfv.data import synthetic
    from mfv.organism import train as organism

    return {"train": _lightning(train.main), "evaluate": _lightning(evaluate.main), "prepare-data": _prepare_data,
            "prepare-gqa": _prepare_gqa, "generate-synthetic": synthetic.main, "demo": demo.main,
            "train-organism": organism.main, "seeds": seeds.main}


# Commands whose jsonargparse parser takes its name from ``sys.argv[0]`` and which never
# start processes of their own. The others keep ``sys.argv`` as it is: Lightning's DDP launcher
# starts every further rank by re-running ``sys.argv`` (train, evaluate, train-organism, and
# seeds and demo through them); they name themselves (``prog``) instead.
_NAMED_BY_ARGV = ("prepare-gqa", "generate-synthetic")


@contextmanager
def _program(name: str) -> Iterator[None]:
    """Usage lines and "run: ... --help" tips name the sub-command (argparse takes the program
    from ``sys.argv[0]``)."""
    saved = sys.argv
    sys.argv = [name]
    try:
        yield
    finally:
        sys.argv = saved


def _models() -> None:
    """``mfv models``: the backbone names ``--model.backbone`` takes (the registry's)."""
    from mfv.models import BACKBONES

    width = max(map(len, BACKBONES))
    for name, spec in BACKBONES.items():
        print(f"  {name:<{width}}  {spec.description}")
    print("A '-random' name is a tiny random stand-in of its family, built from sizes (no weights, no download): "
          "mfv train --config toy --model.backbone qwen3vl-random")


def _refuse_unknown_command(name: str) -> None:
    from mfv.usage import suggestion

    print(f"error: unknown command {name!r}{suggestion(name, (*COMMANDS, 'models'))} "
          f"(commands: {', '.join(COMMANDS)}, models; run: mfv --help)", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    from mfv import __version__
    from mfv.threads import take_threads_option
    from mfv.usage import SHORT_HELP, full_help_argv, wants_help

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"mfv {__version__}")
        return
    argv = take_threads_option(argv)  # --threads N: MFV_THREADS, read here and by started ranks
    if argv and not argv[0].startswith("-") and argv[0] not in (*COMMANDS, "models"):
        _refuse_unknown_command(argv[0])
    if not argv or argv[0] not in (*COMMANDS, "models"):
        print(__doc__)
        print("commands: " + ", ".join(COMMANDS) + "; mfv models: the backbones (families and '-random' stand-ins)")
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    name, rest = argv[0], argv[1:]
    help_wanted = wants_help(rest)
    if help_wanted == "short" or (name == "models" and help_wanted):
        print(SHORT_HELP[name])  # no torch, no Lightning: instant
        raise SystemExit(0)  # as argparse's --help
    if name == "models":
        return _models()
    _run(name, full_help_argv(rest) if help_wanted else rest, announce=help_wanted is None)


# Commands whose run summary (threads included) comes from train.py's build_cli.
_SUMMARISED_BY_TRAIN = ("train", "evaluate", "demo", "seeds")


def _run(name: str, args: list[str], announce: bool) -> None:
    """Runs command ``name`` with strict parsing, torch's threads set and (``announce``) named."""
    from mfv.console import quiet
    from mfv.usage import strict_parsers

    quiet()
    strict_parsers()
    if announce and name not in _SUMMARISED_BY_TRAIN:
        from mfv.preflight import exit_on_bad_input
        from mfv.threads import set_threads, summary

        with exit_on_bad_input():
            set_threads()
        print(summary())
    command = _commands()[name]
    from pathlib import Path

    from mfv.io import exit_on_full_disk

    # Not returned: the console script exits with main()'s value. A full disk anywhere: one line, exit 2.
    with exit_on_full_disk(Path.cwd(), "output folder"):
        if name in _NAMED_BY_ARGV:
            with _program(f"mfv {name}"):
                command(args)
        else:
            command(args)


if __name__ == "__main__":
    main()
