"""mfv: multimodal function vectors in frozen large multimodal models."""

from mfv.compat import install_torchvision_hook

# Lightning, torchmetrics and open_clip all import torchvision; make that import work on
# CPU torch whoever comes first (cheap: nothing is imported here).
install_torchvision_hook()

__version__ = "0.1.0"  # the one source: pyproject.toml, `mfv --version`, CITATION.cff and CHANGELOG.md follow it

# The public API (mfv/api.py), imported on first use so that `import mfv` stays cheap.
_API = {
    "load": "mfv.api", "extract": "mfv.api", "steer": "mfv.api", "predict": "mfv.api", "generate": "mfv.api",
    "save": "mfv.api", "load_vectors": "mfv.api", "SMALL_SYNTHETIC": "mfv.api",
    "SyntheticData": ("mfv.data.datamodule", "SyntheticRelationDataModule"),
    "GQAData": ("mfv.data.gqa", "GQARelationDataModule"),
    "OwnData": ("mfv.data.own", "OwnRelationDataModule"),
    "FunctionVectorSet": "mfv.method.function_vector", "EpisodeSampler": "mfv.data.episodes",
    "Episode": "mfv.data.episodes", "evaluate": "mfv.api", "EvaluationSettings": "mfv.evaluation",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    import importlib

    if name not in _API:
        raise AttributeError(f"module 'mfv' has no attribute {name!r}")
    module, attribute = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    return getattr(importlib.import_module(module), attribute)
