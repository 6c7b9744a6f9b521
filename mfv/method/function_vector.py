"""Function vectors: construction from heads, and safetensors files with provenance.

FV(relation) = sum over selected heads (l, h) of W_O^l[:, slice(h)] @ mean_activation(l, h).
No bias term (the published scripts add the projection bias once per head, a quirk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mfv.errors import IncompatibleVectorError
from mfv.io import atomic_write
from mfv.hooks import head_output_contributions
from mfv.models.base import BackboneAdapter

FORMAT_VERSION = "1"


def build_function_vector(
    adapter: BackboneAdapter, means: torch.Tensor, heads: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Sums the selected heads' mean outputs projected through ``W_O``.

    Args:
        means: ``(layers, heads, head_dim)`` mean activations of one relation.
        heads: ``(layer, head)`` pairs.

    Returns:
        ``(hidden_size,)`` fp32 vector.
    """
    vector = torch.zeros(adapter.hidden_size, dtype=torch.float32)
    for layer in sorted({l for l, _ in heads}):
        chosen = [h for l, h in heads if l == layer]
        with torch.no_grad():
            contributions = head_output_contributions(adapter, layer, means[layer].to(adapter.device))
        vector += contributions[chosen].sum(0).float().cpu()
    return vector


def non_finite(vectors: dict[str, torch.Tensor]) -> list[str]:
    """The relations whose vector holds a NaN or an inf."""
    return [r for r, v in vectors.items() if not bool(torch.isfinite(v).all())]


@dataclass
class FunctionVectorSet:
    """One FV per relation, with where it goes and where it came from.

    Attributes:
        vectors: relation -> ``(hidden_size,)``.
        layer: Residual layer after which the FV is added.
        heads: relation -> the heads summed (empty for learned-from-scratch FVs).
        backbone_id: The backbone it belongs to.
        shape: The backbone's shape signature.
        metadata: Provenance (k, prompts used, data fingerprint, training...).
    """

    vectors: dict[str, torch.Tensor]
    layer: int
    heads: dict[str, list[tuple[int, int]]]
    backbone_id: str
    shape: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def relations(self) -> list[str]:
        return list(self.vectors)

    @property
    def distributed(self) -> bool:
        """One vector per layer (``(layers, hidden)`` each) rather than one after :attr:`layer`."""
        return self.metadata.get("injection") == "distributed"

    def stacked(self, relations: Sequence[str] | None = None) -> torch.Tensor:
        """``(len(relations), hidden)`` in the given order (default: stored order)."""
        return torch.stack([self.vectors[r] for r in (relations or self.relations)])

    def save(self, path: str | Path) -> Path:
        """Writes a ``.safetensors`` file: one tensor per relation, provenance in metadata.

        Raises:
            IncompatibleVectorError: a vector holds a NaN or inf (nothing is written).
        """
        from safetensors.torch import save_file

        path = Path(path)
        bad = non_finite(self.vectors)
        if bad:
            raise IncompatibleVectorError(
                f"{path}: not written: the FVs of {bad} hold NaN or inf (a diverged fit, e.g. too high a model.lr); "
                f"an FV file only ever holds finite vectors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"fv.{r}": v.detach().float().contiguous().cpu() for r, v in self.vectors.items()}
        meta = {
            "format": FORMAT_VERSION,
            "backbone_id": self.backbone_id,
            "shape": json.dumps(self.shape),
            "layer": str(self.layer),
            "heads": json.dumps({r: [list(h) for h in hs] for r, hs in self.heads.items()}),
            "relations": json.dumps(self.relations),
            "metadata": json.dumps(self.metadata),
        }
        # Atomic, and readable by colleagues as the umask allows (safetensors writes 0600).
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, adapter: BackboneAdapter | None = None) -> "FunctionVectorSet":
        """Reads a file written by :meth:`save`; checks it fits ``adapter`` when given.

        Raises:
            FileNotFoundError: no such file.
            IncompatibleVectorError: saved for another backbone, shape or an out-of-range layer;
                damaged; or holding a NaN or inf.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"function-vector file {path} not found")
        field_name = "file"
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                if "backbone_id" not in meta:
                    raise IncompatibleVectorError(f"{path}: not an mfv function-vector file (no backbone_id metadata)")
                values = {}
                for field_name, parse in (("relations", json.loads), ("layer", int), ("heads", json.loads),
                                          ("shape", json.loads), ("metadata", json.loads)):
                    values[field_name] = parse(meta.get(field_name, "{}" if field_name == "metadata" else ""))
                field_name = "tensors"
                vectors = {r: handle.get_tensor(f"fv.{r}") for r in values["relations"]}
        except IncompatibleVectorError:
            raise
        except Exception as exc:  # truncated file, bad JSON, missing tensor: say which field
            raise IncompatibleVectorError(
                f"{path}: unreadable function-vector file (field {field_name!r}: {type(exc).__name__}: {exc}); "
                f"re-export it with train.py") from exc
        hidden = values["shape"].get("hidden_size") if isinstance(values["shape"], dict) else None
        layers = values["shape"].get("num_layers") if isinstance(values["shape"], dict) else None
        distributed = isinstance(values["metadata"], dict) and values["metadata"].get("injection") == "distributed"
        for relation, vector in vectors.items():
            if distributed and tuple(vector.shape) != (layers, hidden):
                raise IncompatibleVectorError(
                    f"{path}: distributed tensor fv.{relation} has shape {tuple(vector.shape)}, expected "
                    f"(num_layers, hidden_size) = ({layers}, {hidden}); the file was edited or is damaged")
            if not distributed and (vector.dim() != 1 or (hidden is not None and vector.numel() != hidden)):
                raise IncompatibleVectorError(
                    f"{path}: tensor fv.{relation} has shape {tuple(vector.shape)} but field 'shape' says hidden_size "
                    f"{hidden}; the file was edited or is damaged")
        bad = non_finite(vectors)
        if bad:
            raise IncompatibleVectorError(f"{path}: the vectors of {bad} hold NaN or inf; the file is damaged or "
                                          f"came from a diverged fit: re-export it with train.py (lower model.lr)")
        heads = values["heads"]
        if not isinstance(heads, dict) or not all(isinstance(h, list) and all(len(p) == 2 for p in h)
                                                  for h in heads.values()):
            raise IncompatibleVectorError(f"{path}: field 'heads' must map relations to [layer, head] pairs")
        fvs = cls(
            vectors=vectors,
            layer=values["layer"],
            heads={r: [tuple(h) for h in hs] for r, hs in heads.items()},
            backbone_id=meta["backbone_id"],
            shape=values["shape"],
            metadata=values["metadata"],
        )
        if adapter is not None:
            fvs.check_compatible(adapter, path)
        return fvs

    def check_compatible(self, adapter: BackboneAdapter, source: str | Path = "function vectors") -> None:
        """Raises :class:`IncompatibleVectorError` unless these FVs fit ``adapter`` (same
        ``backbone_id`` and shape)."""
        if self.backbone_id != adapter.backbone_id:
            raise IncompatibleVectorError(
                f"{source}: field 'backbone_id' is {self.backbone_id!r} but the loaded backbone is "
                f"{adapter.backbone_id!r}; extract FVs for this backbone"
            )
        expected = adapter.shape_signature()
        if self.shape != expected:
            differing = {k: (self.shape.get(k), v) for k, v in expected.items() if self.shape.get(k) != v}
            raise IncompatibleVectorError(
                f"{source}: saved for backbone {self.backbone_id!r} with shape {self.shape}, but the loaded backbone "
                f"{adapter.backbone_id!r} differs in {differing} (saved, loaded); extract FVs for this backbone"
            )
        if not 0 <= self.layer < adapter.num_layers:
            raise IncompatibleVectorError(
                f"{source}: field 'layer' = {self.layer} is beyond the backbone's layers 0..{adapter.num_layers - 1}"
            )
        for relation, heads in self.heads.items():
            bad = [h for h in heads if not (0 <= h[0] < adapter.num_layers and 0 <= h[1] < adapter.num_heads)]
            if bad:
                raise IncompatibleVectorError(f"{source}: field 'heads' of {relation!r} has {bad}, outside the "
                                              f"backbone's {adapter.num_layers} layers x {adapter.num_heads} heads")
