"""What a command says about its own options: short help, one-line errors, suggestions.

Imports nothing heavy: ``mfv train --help`` prints :data:`SHORT_HELP` without importing torch
or Lightning (under 1 s; the full option tree, ``--help full``, builds the real parser). Once
:func:`strict_parsers` is installed, every jsonargparse parser of the process refuses
abbreviated options (a prefix of ``--trainer.max_epochs`` is an unknown option) and reports an
unknown option in one line with the closest real ones, instead of its whole usage.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Iterable

FULL_HELP = ("--help-all",)  # also ``--help full``
USAGE_WIDTH = 100  # a parse error shows the usage's first line, cut to this many characters
_COMMON = """
  --config NAME|FILE     a config: a bundled name (toy, own_data_example, ...) or a YAML file;
                         several are merged in order
  --threads N            torch CPU threads (default: the cores this process may use; or MFV_THREADS=N)
  --help full            every option (the whole tree, with types and defaults)"""
_TRAIN_OPTIONS = """
  --model.backbone NAME  openflamingo-tiny (the organism), qwen3vl, llava, ... (`mfv models`)
  --model.backbone_options JSON   the backbone's own options, e.g. '{"model_path": "..."}'
  --model.relations [a,b]  the relations to learn FVs for (the data's names)
  --model.layer L        injection layer          --model.lr LR    learning rate
  --data.init_args.data_dir DIR   where the data is (generated there if synthetic)
  --aie.k K              heads per function vector  --aie.cache_dir DIR  AIE cache
  --trainer.max_epochs N   --trainer.accelerator cpu|gpu   --trainer.devices N
  --seed_everything N    the run's seed"""
SHORT_HELP: dict[str, str] = {
    "train": "usage: mfv train --config NAME|FILE [--SECTION.OPTION VALUE ...]   (= python train.py)\n\n"
             "AIE head selection, FV extraction and fine-tuning, test, export (runs/<name>/version_N)."
             + _COMMON + _TRAIN_OPTIONS + "\n  --ckpt_path FILE       resume a run from its last.ckpt",
    "evaluate": "usage: mfv evaluate --config NAME|FILE --out DIR [--fv FILE] [--limit N]   (= python evaluate.py)\n\n"
                "Every evaluation condition; metrics.json, report.md and figures into --out."
                + _COMMON + _TRAIN_OPTIONS
                + "\n  --fv FILE              fine-tuned FVs from train (function_vectors_finetuned.safetensors)"
                  "\n  --out DIR              output folder   --limit N   prompts per condition"
                  "\n  --evaluation.max_k K   --evaluation.shots [1,4]   --evaluation.sweep_limit N",
    "prepare-data": "usage: mfv prepare-data --config NAME|FILE [--data.init_args.X VALUE ...]\n\n"
                    "Generates (synthetic) or reads and checks the data a config's train run would read, with "
                    "model.relations,\nand prints its counts per split and relation. No model is loaded."
                    + _COMMON,
    "prepare-gqa": "usage: mfv prepare-gqa --scene_graphs FILES --images DIR --relations [spatial] --out DIR\n\n"
                   "Builds relation splits from GQA scene graphs (streamed) and their images.\n"
                   "  --seed N               split seed (default 0)\n"
                   "  --split NAME           image_disjoint (default) or per_relation\n"
                   "  --config FILE          these options from a YAML file\n"
                   "  --help full            every option (filters: --settings.*)",
    "generate-synthetic": "usage: mfv generate-synthetic --out DIR --split eval|train|test|novel|composite "
                          "--num_images N\n\n"
                          "One synthetic split by hand (mfv prepare-data generates what a config reads).\n"
                          "  --image_size PX        (default 800)   --seed N   (default 0)\n"
                          "  --objects DIR          RGBA PNGs named by object (default: the built-in set)\n"
                          "  --config FILE          these options from a YAML file\n"
                          "  --help full            every option",
    "demo": "usage: mfv demo [--out DIR] [--limit N] [--configs [NAME,...]]\n\n"
            "Train, then evaluate every condition, on the bundled model organism (config toy); any folder.\n"
            "  --out DIR              output folder (default runs/demo)\n"
            "  --limit N              prompts per evaluation condition (default: all; 20 is a quick look)\n"
            "  --configs [A,B]        configs merged in order (default: toy)\n"
            "  --threads N            torch CPU threads (default: the cores this process may use)\n"
            "  --help full            every option",
    "train-organism": "usage: mfv train-organism --out DIR [--trainer.max_epochs N] [--threads N]\n\n"
                      "Trains the model organism from scratch (its recipe; the bundled one is never overwritten).\n"
                      "  --out DIR              a new or empty folder (default checkpoints/organism)\n"
                      "  --config FILE          options from a YAML file   --seed_everything N\n"
                      "  --help full            every option (model sizes, data, schedule)",
    "seeds": "usage: mfv seeds --config NAME|FILE [--seeds N] [--out DIR] [--limit N] [overrides]\n\n"
             "Extraction, fine-tuning and evaluation over seeds 0..N-1; mean and spread (seeds.json, seeds.md).\n"
             "Every other option is a train / evaluate override (mfv train --help)."
             + _COMMON.replace("several are merged in order", "one file"),
    "models": "usage: mfv models\n\nThe backbone names --model.backbone takes, with what each is.",
}


def wants_help(argv: list[str]) -> str | None:
    """``"short"``, ``"full"`` or ``None``: what help ``argv`` (a command's options) asks for."""
    for index, token in enumerate(argv):
        if token in FULL_HELP or (token in ("-h", "--help") and argv[index + 1:index + 2] == ["full"]):
            return "full"
        if token in ("-h", "--help"):
            return "short"
    return None


def full_help_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--help full`` (or :data:`FULL_HELP`) as the parser's own ``--help``."""
    out = []
    for index, token in enumerate(argv):
        if token == "full" and index and argv[index - 1] in ("-h", "--help"):
            continue
        out.append("--help" if token in FULL_HELP else token)
    return out


def closest(name: str, candidates: Iterable[str], count: int = 3) -> list[str]:
    """The ``count`` candidates closest to ``name`` (difflib), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=count, cutoff=0.6)
    if not found and "." in name:  # a typo in the section: compare the option's last part too
        tail = name.rsplit(".", 1)[1]
        found = [c for c in candidates if c.rsplit(".", 1)[-1] == tail][:count]
    return found


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean --a or --b?"`` (empty when nothing is close)."""
    found = closest(name, candidates)
    return f"; did you mean {' or '.join(found)}?" if found else ""


_WRAPPER = re.compile(r"Does not validate against any of the Union subtypes.*?Errors:\s*-\s*(.*?)\s+- Expected a",
                      re.S)
_KEY_PREFIX = re.compile(r"^(?:Parser key \"[^\"]+\":\s*)+")


def plain_message(exc: BaseException | str) -> str:
    """The message a user can act on: an mfv error's own (jsonargparse wraps one raised while a
    class is built), else the first reason inside a "Does not validate against any of the Union
    subtypes ... Namespace(...)" wrapper; a linked option named as the user sets it."""
    from mfv.errors import MfvError

    if isinstance(exc, BaseException):
        cause, seen = exc, set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, MfvError):
                exc = cause
                break
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
    text = str(exc)
    match = _WRAPPER.search(text)
    if match:
        text = match.group(1)
    prefix = _KEY_PREFIX.match(text)
    if prefix:  # 'Parser key "aie.selection": Expected ...' -> 'aie.selection: Expected ...'
        key = re.findall(r'Parser key "([^"]+)"', prefix.group(0))[-1]
        rest = text[prefix.end():]
        text = rest if match or key in rest else f"{key}: {rest}"
    # train.py links model.relations to the data's: the user sets (and sees) model.relations.
    return text.replace("data.init_args.relations", "model.relations")


def _option_names(parser) -> list[str]:
    names = [s for s in getattr(parser, "_option_string_actions", {}) if s.startswith("--")]
    return [n for n in names if not n.endswith((".help", "+"))]


def _short_error(parser, message: str) -> None:
    """A parse error as one line naming the option, after the usage's first line; exit status 2."""
    prog = parser.prog.replace(" [options]", "")
    unknown = re.match(r"[Uu]nrecognized arguments:\s*(\S+)", message)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        line = f"unknown option {option}{suggestion(option, _option_names(parser))}"
    else:
        line = plain_message(message)
    # The usage's first line only: Lightning's commands' whole usage runs to 99 lines.
    first = parser.format_usage().splitlines()[0].rstrip()
    print(first if len(first) <= USAGE_WIDTH else first[:USAGE_WIDTH - 4] + " ...", file=sys.stderr)
    print(f"error: {' '.join(line.split())} (run: {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def strict_parsers() -> None:
    """Every jsonargparse parser built after this call: no abbreviated options, and a parse
    error (that exits) is one line naming the option, with the closest real ones for an
    unknown option (idempotent)."""
    import jsonargparse

    parser_class = jsonargparse.ArgumentParser
    if getattr(parser_class, "_mfv_strict", False):
        return
    original_init, original_error = parser_class.__init__, parser_class.error

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        original_init(self, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return original_error(self, message, ex)
        _short_error(self, message)

    parser_class.__init__, parser_class.error, parser_class._mfv_strict = __init__, error, True
