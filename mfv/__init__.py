"""mfv: multimodal function vectors in frozen large multimodal models."""

__version__ = "0.1.0"
