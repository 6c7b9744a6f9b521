"""Loading published weights at full size: skeletons without memory, tensors one at a time.

A 4B-parameter backbone in bf16 is 8 GB; building it the usual way (an fp32 model, an fp32
state dict beside it, then a cast) needs two to three times that. Here:

* :func:`empty_parameters` builds any ``nn.Module`` with its *parameters* on the meta
  device (no memory, no random init) while its *buffers* stay real: non-persistent buffers
  such as rotary ``inv_freq`` are computed by the module itself, in fp32, and never cast.
* :func:`iter_tensors` reads a weights file (``.safetensors``, a torch zip ``.pt``/``.bin``)
  one tensor at a time with plain file reads (no memory map), so at most one source tensor
  is held besides the model.
* :func:`assign` puts each tensor into the skeleton in the target dtype and device;
  :func:`unloaded` lists every parameter still on meta, so nothing is left at a random init
  without an error.

Peak host memory is therefore the model's weights in the target dtype plus the largest
single source tensor (measured in ``benchmarks/full_size.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

# safetensors dtype names -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# torch.save's storage class names -> dtypes (read by name: the classes are deprecated)
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Parameters are moved to meta as they are registered, so initialisers run on meta (no
    time, no memory); buffers (``inv_freq`` and friends) are built normally, in fp32.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        start = 8 + header_size
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        for key, info in entries:
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            buffer = bytearray(end - begin)
            handle.readinto(buffer)
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield key, tensor.reshape(info["shape"])


class _LazyStorage:
    def __init__(self, record: str, dtype: torch.dtype) -> None:
        self.record, self.dtype = record, dtype


class _LazyTensor:
    """A tensor of a torch zip archive, read from its record when materialised."""

    def __init__(self, storage: _LazyStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def read(self, archive: zipfile.ZipFile) -> torch.Tensor:
        data = bytearray(archive.read(self.storage.record))
        flat = torch.frombuffer(data, dtype=self.storage.dtype) if data else torch.empty(0, dtype=self.storage.dtype)
        return flat.as_strided(self.size, self.stride, self.offset)


def _rebuild_lazy(storage: _LazyStorage, offset: int, size: tuple, stride: tuple, *_: Any) -> _LazyTensor:
    return _LazyTensor(storage, offset, size, stride)


class _LazyUnpickler(pickle.Unpickler):
    """Reads a torch zip archive's ``data.pkl`` without reading any tensor data.

    Only the classes a state dict needs are allowed (like ``weights_only=True``).
    """

    _ALLOWED = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set")}

    def __init__(self, file: Any, prefix: str) -> None:
        super().__init__(file)
        self.prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_lazy
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a weights file")

    def persistent_load(self, pid: tuple) -> _LazyStorage:
        _, storage_type, key, _location, _numel = pid
        return _LazyStorage(f"{self.prefix}/data/{key}", storage_type)


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, _LazyTensor]]:
    if isinstance(obj, _LazyTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))


def _iter_torch_zip(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch.save archive (no single data.pkl)")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as handle:
            obj = _LazyUnpickler(handle, prefix).load()
        for key, lazy in _flatten(obj):
            yield key, lazy.read(archive)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` pairs of a weights file, read one tensor at a time.

    Nested dicts (``{"model_state_dict": {...}}``) yield dotted keys. Files that are neither
    safetensors nor a torch zip archive are loaded whole (``torch.load(mmap=True)``).

    Raises:
        ValueError: The file is damaged or holds objects other than tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
    elif zipfile.is_zipfile(path):
        yield from _iter_torch_zip(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from ((key, value) for key, value in state.items() if isinstance(value, torch.Tensor))


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weights files of a Hugging Face model folder (sharded or not), safetensors first."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


def assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype | None,
           device: torch.device | str = "cpu") -> None:
    """Puts ``tensor`` into ``model`` at ``key`` (a parameter or a persistent buffer).

    Floating tensors are converted to ``dtype``; the tensor replaces a meta parameter of the
    same shape (or overwrites a real one).

    Raises:
        ValueError: The shapes differ; the message names the key and both shapes.
    """
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: the file holds shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)}")
    target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    value = tensor.to(device=device, dtype=target_dtype, copy=True)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def unloaded(model: nn.Module) -> list[str]:
    """Names of the parameters still on the meta device (never loaded)."""
    return [name for name, param in model.named_parameters(remove_duplicate=False) if param.is_meta]


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts floating parameters and persistent buffers to ``dtype``, in place.

    Unlike ``model.to(dtype)``, non-persistent buffers keep their dtype: rotary ``inv_freq``
    stays fp32 as transformers computes it (a bf16 copy is off by up to 0.4%).
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if (buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype
                    and name not in module._non_persistent_buffers_set):
                module._buffers[name] = buffer.to(dtype)
    return model


def check_weights_file(path: Path) -> None:
    """Refuses a missing, truncated or damaged safetensors file in one line naming it (its header
    is read, never its tensors; other formats are checked when read).

    Raises:
        MissingWeightsError: the file is missing, or shorter than its header says, or its header
            does not parse.
    """
    from mfv.errors import MissingWeightsError

    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing (listed by the folder's index): download the model again")
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > size:
                raise ValueError(f"header of {header_size} bytes")
            header = json.loads(handle.read(header_size))
        end = 8 + header_size + max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
                                    default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise MissingWeightsError(f"{path} is damaged (unreadable safetensors header: {exc}): download it again") from exc
    if size < end:
        raise MissingWeightsError(f"{path} is truncated ({size} of {end} bytes): download it again")
