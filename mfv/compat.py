"""Import-time and environment compatibility fixes for the pinned dependency set.

PyPI only ships CUDA builds of torchvision. Against the CPU build of torch, its
``_meta_registrations`` and ``_autograd_registrations`` modules register kernels for
C++ operators (``torchvision::nms``) that the CUDA-less wheel cannot load, so the
import fails. mfv never uses those operators (open_clip only needs transforms and a
few pure-Python ops), so the two modules are replaced by empty stubs *only* when the
plain import fails. Call :func:`ensure_torchvision` before importing open_clip.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from typing import Iterator

_STUBBED_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


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

    Called by ``import mfv`` and, in the project's venv, at interpreter start-up (a ``.pth``
    file written by ``make setup``), so that ``import lightning`` before ``mfv`` works too.
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
