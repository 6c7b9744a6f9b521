"""Checks of a Hugging Face model folder before anything is read from it: the family its
``config.json`` names, refused architectures, and damaged weight files, each one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mfv.errors import ConfigError
from mfv.models.families.refused import REFUSED, refusal
from mfv.models.weights import check_weights_file, weight_files

if TYPE_CHECKING:
    from mfv.models.hf import Family


def local_folder(path: str, cache_dir: str | None = None) -> Path | None:
    """The folder of ``path``: itself when it is one, else its snapshot in the Hugging Face cache
    (``None`` when not cached: the loader then names what to download)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(path, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_folder(family: Family, folder: Path) -> None:
    """Refuses a folder of another family or of a refused architecture (by ``config.json``'s
    ``model_type``) and damaged weight files, each in one line naming the file.

    Raises:
        ConfigError: ``config.json`` unreadable, of a refused architecture or of another family.
        MissingWeightsError: a weight file missing, truncated or damaged.
    """
    from mfv.models import hf_families

    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise ConfigError(f"{config} is not a JSON object ({exc}): download the model again") from exc
        families = hf_families()
        if model_type in REFUSED:
            raise ConfigError(f"{config}: {refusal(model_type, sorted(families))}")
        expected = family.config_type().model_type
        if model_type != expected:
            owner = [f.name for f in families.values() if f.config_type().model_type == model_type]
            hint = f"load it as {owner[0]!r}" if owner else f"supported families: {', '.join(sorted(families))}"
            raise ConfigError(f"{config} has model_type {model_type!r}, but family {family.name!r} was asked for "
                              f"(model_type {expected!r}): {hint}, or give a {family.name} folder")
    for weights in weight_files(folder):
        check_weights_file(weights)
