"""OpenFlamingo: the adapter, published releases and tiny models, one module per job."""

from mfv.models.openflamingo.adapter import (
    CLIP_MEAN,
    CLIP_STD,
    END_OF_CHUNK,
    IMAGE_TOKEN,
    LANGUAGE_FAMILIES,
    OpenFlamingoAdapter,
    assemble_flamingo,
)
from mfv.models.openflamingo.releases import RELEASES, load_openflamingo, remap_checkpoint_key
from mfv.models.openflamingo.tiny import (
    TinyFlamingoConfig,
    build_tiny_openflamingo,
    load_tiny_openflamingo,
    random_openflamingo,
    save_tiny_openflamingo,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "END_OF_CHUNK", "IMAGE_TOKEN", "LANGUAGE_FAMILIES", "OpenFlamingoAdapter",
    "RELEASES", "TinyFlamingoConfig", "assemble_flamingo", "build_tiny_openflamingo", "load_openflamingo",
    "load_tiny_openflamingo", "random_openflamingo", "remap_checkpoint_key", "save_tiny_openflamingo",
]
