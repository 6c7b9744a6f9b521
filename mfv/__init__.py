"""mfv: multimodal function vectors in frozen large multimodal models."""

from mfv.compat import ensure_torchvision

# Lightning, torchmetrics and open_clip all import torchvision; fix it before any of them.
ensure_torchvision()

__version__ = "0.1.0"
