"""Import-time and environment compatibility fixes for the pinned dependency set.

PyPI only ships CUDA builds of torchvision. Against the CPU build of torch, its
``_meta_registrations`` and ``_autograd_registrations`` modules register kernels for
C++ operators (``torchvision::nms``) that the CUDA-less wheel cannot load, so the
import fails. mfv never uses those operators (open_clip only needs transforms and a
few pure-Python ops), so the two modules are replaced by empty stubs *only* when the
plain import fails. Call :func:`ensure_torchvision` before importing open_clip.

The package installs the hook itself: ``import mfv`` installs it, and the wheel carries
``mfv_compat.pth`` (written by :class:`BuildPyWithHook`, named in ``pyproject.toml``), so
that in an environment where mfv is installed any import order works, ``import lightning``
before ``import mfv`` included. ``open_flamingo`` pins ``torch==2.0.1``; mfv declares its
real needs and it is installed with ``pip install --no-deps open-flamingo==2.0.1``
(:func:`require_open_flamingo` says so where it is missing).
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OPEN_FLAMINGO_INSTALL = "pip install --no-deps open-flamingo==2.0.1"
HOOK_PTH = "mfv_compat.pth"
# Run by Python's site module at start-up (one line starting with "import" is executed).
HOOK_LINE = "import mfv.compat as _mfv_compat; _mfv_compat.install_torchvision_hook()\n"

_STUBBED_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
# What a wheel carries besides code (mfv/bundled/<name>) -> where the clone keeps it (git's one
# copy). Here, not in mfv.resources: setuptools loads this module alone, without its package.
BUNDLED_SOURCES: dict[str, str] = {"configs": "configs", "organism": "checkpoints/organism",
                                   "constraints.txt": "constraints.txt"}


def _needs_stubs() -> bool:
    """Whether torchvision's C++ registrations would fail: a CUDA torchvision over CPU torch."""
    from importlib import metadata

    import torch

    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return False
    return torch.version.cuda is None and "+cpu" not in vision


class _TorchvisionHook:
    """A meta-path finder that, on the first ``import torchvision`` from anywhere (lightning,
    torchmetrics, open_clip, a notebook), stubs the two registration modules if they would
    fail, then steps aside so the normal import runs. Installing it costs nothing."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if _needs_stubs():
            for stub in _STUBBED_MODULES:
                sys.modules.setdefault(stub, types.ModuleType(stub))
        return None  # the regular finders import torchvision itself


def install_torchvision_hook() -> None:
    """Makes any later ``import torchvision`` work on CPU torch, whoever imports it first.

    Called by ``import mfv`` and at interpreter start-up by ``mfv_compat.pth``, which the
    package installs into site-packages, so that ``import lightning`` before ``mfv`` works too.
    """
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work on CPU-only torch; a no-op where it already does."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError:
        # A half-imported package leaves entries behind; drop them before retrying.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    for name in _STUBBED_MODULES:
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401


@contextmanager
def offline_hub() -> Iterator[None]:
    """No network for Hugging Face loaders inside the block (mfv never downloads weights).

    ``HF_HUB_OFFLINE`` is read by huggingface_hub at import time, so both the environment
    variable (for libraries that read it late, e.g. open_clip) and the imported constant are
    set, and restored afterwards. Without this, a loader retries the network for minutes
    before reporting a file that is simply not on disk.
    """
    import huggingface_hub.constants as hub_constants

    previous_env, previous_constant = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous_constant
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def install_startup_hook(site_packages: str | os.PathLike | None = None) -> Path:
    """Writes :data:`HOOK_PTH` into ``site_packages`` (default: this interpreter's first).

    A wheel install (``pip install .``) ships the file; an editable install (``pip install
    -e .``, as ``make setup`` does) cannot, so ``make setup`` calls this.
    """
    import site

    path = Path(site_packages or site.getsitepackages()[0]) / HOOK_PTH
    path.write_text(HOOK_LINE)
    return path


def require_open_flamingo() -> None:
    """Raises ``ImportError`` with the install command when ``open_flamingo`` is missing
    (it is not a dependency of the package: it pins ``torch==2.0.1``)."""
    import importlib.util

    if importlib.util.find_spec("open_flamingo") is None:
        raise ImportError("open_flamingo is not installed; it pins torch==2.0.1, so install it without its "
                          f"dependencies (mfv declares the ones it needs): {OPEN_FLAMINGO_INSTALL}")


def _build_py_with_hook() -> type:
    """setuptools' ``build_py`` that also writes :data:`HOOK_PTH` at the root of the build,
    so wheels (``pip install .``) carry it into site-packages. Only imported at build time."""
    from setuptools.command.build_py import build_py

    class BuildPyWithHook(build_py):
        def run(self) -> None:
            super().run()
            Path(self.build_lib).mkdir(parents=True, exist_ok=True)
            (Path(self.build_lib) / HOOK_PTH).write_text(HOOK_LINE)
            self._bundled = _copy_bundled(Path.cwd(), Path(self.build_lib) / "mfv" / "bundled")

        def get_outputs(self, include_bytecode: bool = True) -> list[str]:
            bundled = [str(p) for p in getattr(self, "_bundled", [])]
            return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / HOOK_PTH), *bundled]

    BuildPyWithHook.__module__ = __name__
    return BuildPyWithHook


def _copy_bundled(root: Path, target: Path) -> list[Path]:
    """Copies the clone's configs, model organism and constraints (:data:`BUNDLED_SOURCES`)
    into ``target`` (the wheel's ``mfv/bundled``); a source tree without them (an sdist built
    without them) copies nothing. Returns the files written."""
    import shutil

    written: list[Path] = []
    for name, source in BUNDLED_SOURCES.items():
        source_path, destination = root / source, target / name
        files = [source_path] if source_path.is_file() else sorted(p for p in source_path.rglob("*") if p.is_file())
        for file in files:
            out = destination if file == source_path else destination / file.relative_to(source_path)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out)
            written.append(out)
    return written


def __getattr__(name: str):
    # ``[tool.setuptools.cmdclass]`` names ``mfv.compat.BuildPyWithHook``; built on demand so that
    # importing mfv never imports setuptools.
    if name == "BuildPyWithHook":
        return _build_py_with_hook()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
