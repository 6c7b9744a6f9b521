"""What the commands need besides code, found from any folder: the configs and the model organism.

In a clone (or an editable install) they are the clone's ``configs/`` and
``checkpoints/organism/``; a wheel carries the same files under ``mfv/bundled/`` (copied there
at build time by :class:`mfv.compat.BuildPyWithHook`, so git holds one copy). A config is named
by path or by name: ``--config toy`` is the bundled ``toy.yaml`` wherever the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mfv.compat import BUNDLED_SOURCES as SOURCES
from mfv.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
BUNDLED = PACKAGE / "bundled"


def bundled(name: str) -> Path:
    """The bundled file or folder ``name`` (a key of :data:`SOURCES`): the wheel's copy, else the clone's."""
    installed = BUNDLED / name
    return installed if installed.exists() else PACKAGE.parent / SOURCES[name]


def organism_dir() -> Path:
    """The model organism's folder (config, weights, tokenizer, model card)."""
    return bundled("organism")


def config_names() -> list[str]:
    """The bundled configs' names (``toy``, ``own_data_example``, ...)."""
    return sorted(p.stem for p in bundled("configs").glob("*.yaml"))


def config_path(name: str) -> str:
    """``name`` as a config file: an existing file as given; else a bundled config named
    ``name`` (``toy``, ``toy.yaml``, ``configs/toy.yaml``).

    Raises:
        ConfigError: neither exists (the message lists the bundled names).
    """
    if Path(name).is_file():
        return name
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    candidate = bundled("configs") / f"{stem}.yaml"
    if candidate.is_file() and (Path(name).parent in (Path("."), Path("configs"))):
        return str(candidate)
    from mfv.usage import suggestion

    raise ConfigError(f"--config {name}: no such file, nor a bundled config of that name"
                      f"{suggestion(stem, config_names())} (bundled: {', '.join(config_names())})")


def resolve_configs(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` written as the file it names (:func:`config_path`);
    anything else unchanged, so calling it twice changes nothing."""
    out, argv = [], list(argv)
    for index, token in enumerate(argv):
        name, equals, value = token.partition("=")
        if name == "--config" and equals:
            token = f"--config={_config_value(value)}"
        elif index and argv[index - 1] == "--config":
            token = _config_value(token)
        out.append(token)
    return out


def _config_value(value: str) -> str:
    if value.lstrip().startswith(("[", "{")) or "\n" in value or (":" in value and not Path(value).exists()):
        return value  # an inline YAML/JSON config: its parser reads it
    return config_path(value)
