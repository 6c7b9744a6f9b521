"""What the commands need besides code, found from any folder: the configs and the model organism.

In a clone (or an editable install) they are the clone's ``configs/`` and
``checkpoints/organism/``; a wheel carries the same files under ``mfv/bundled/`` (copied there
at build time by :class:`mfv.compat.BuildPyWithHook`, so git holds one copy). A config is named
by path or by name: ``--config toy`` is the bundled ``toy.yaml`` wherever the command runs.

Paths written inside a config file that name its *inputs* resolve against that file's folder,
as the same path on the command line resolves against the working folder:

- the data module's ``input_paths`` (the own-data folder, the prepared GQA folder, the
  synthetic set's object folder) and ``model.fv_path``: always;
- ``model.backbone_options`` values (a weights folder, or a hub id): where the path exists
  next to the config, so a hub id stays a hub id.

Outputs (generated data, caches, logs) stay where the command runs: a bundled config never
writes into the installed package.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

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
    """``argv`` with each ``--config NAME`` written as the file it names (:func:`config_path`),
    followed by the file's input paths resolved against its folder (:func:`config_inputs`), so
    that later options still override them; anything else unchanged, so calling it twice
    changes nothing."""
    out, argv = [], list(argv)
    index = 0
    while index < len(argv):
        token = argv[index]
        name, equals, value = token.partition("=")
        if name == "--config" and equals:
            file = _config_value(value)
            out.append(f"--config={file}")
        elif name == "--config" and index + 1 < len(argv):
            index += 1
            file = _config_value(argv[index])
            out += ["--config", file]
        else:
            out.append(token)
            index += 1
            continue
        index += 1
        overrides = config_inputs(file) if Path(file).is_file() else []
        if argv[index:index + len(overrides)] == overrides:
            index += len(overrides)  # already resolved by an earlier call
        out += overrides
    return out


def _config_value(value: str) -> str:
    if value.lstrip().startswith(("[", "{")) or "\n" in value or (":" in value and not Path(value).exists()):
        return value  # an inline YAML/JSON config: its parser reads it
    return config_path(value)


def config_inputs(file: str | Path) -> list[str]:
    """Options that set ``file``'s relative input paths to the paths they name next to it
    (module docstring): ``["--data.init_args.data_dir=/abs/my_data", ...]``; none for absolute
    paths, for a file that is not a mapping, or for a data class that cannot be imported (the
    config's parser reports those)."""
    import yaml

    folder = Path(file).resolve().parent
    try:
        config = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # the parser reports an unreadable config, naming it
    if not isinstance(config, dict):
        return []
    out = []
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    if _relative(model.get("fv_path")):
        out.append(f"--model.fv_path={folder / model['fv_path']}")
    options = model.get("backbone_options")
    if isinstance(options, dict):
        resolved = {k: str(folder / v) if _relative(v) and (folder / v).exists() else v for k, v in options.items()}
        if resolved != options:
            out.append(f"--model.backbone_options={json.dumps(resolved)}")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    arguments = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
    for key in _input_paths(data.get("class_path")):
        if _relative(arguments.get(key)):
            out.append(f"--data.init_args.{key}={folder / arguments[key]}")
    return out


def _relative(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not Path(value).expanduser().is_absolute()


def _input_paths(class_path: Any) -> tuple[str, ...]:
    """The data class's ``input_paths`` (its arguments that name existing files or folders)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return ()
    module, _, name = class_path.rpartition(".")
    try:
        return tuple(getattr(getattr(importlib.import_module(module), name), "input_paths", ()))
    except (ImportError, AttributeError):
        return ()
