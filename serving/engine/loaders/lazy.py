"""Checkpoint arrays that are read only when they are placed on the devices, one at a time.

A loader returns its params as `LazyTensor` leaves: a shape, the dtype to materialise in, and a
`fill(out)` that writes the values into an array of that shape (converting to `out`'s dtype as it
copies). Nothing is read until `sharding.put` (or anything calling `np.asarray`) asks for one leaf,
so the host holds the whole model only on the devices, plus the one leaf being placed: peak host
memory stays near the weights in the serving dtype, never a float32 copy of the whole model.

Layers are stacked on a leading axis (`stack`), filled layer by layer into one array; per-layer
weights (`layer_of`) read each layer's part on its own. int8 weights are quantized per leaf as they
are read (`quantized`), so the float leaf lives only for that step.

Each leaf is read into a page-aligned buffer of its own (`host_array`): JAX's CPU backend takes such a
buffer as the device array without copying it (a NumPy allocation, 16-byte aligned, costs a second
copy of every weight at load). On Linux the buffer's pages are mapped in one call (MAP_POPULATE)
rather than faulted in one by one while the tensor is copied: on the 2-core benchmark machine that
took the warm-cache load of a 2.5 GB checkpoint from 1.6 to 2.1 GB/s.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable, Sequence

import numpy as np

from serving.engine import model, quant
from serving.engine.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """An array of `shape` read on demand, materialised as `dtype`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]  # writes the values into `out` (of `shape`, any float dtype)
    parts: tuple[LazyTensor, ...] = ()  # `stack`'s per-layer tensors, each readable on its own

    def read(self, dtype=None) -> np.ndarray:
        out = host_array(self.shape, self.dtype if dtype is None else dtype)
        self.fill(out)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.read(dtype)

    def cast(self, dtype) -> LazyTensor:
        return dataclasses.replace(self, dtype=np.dtype(dtype))


# Anonymous private memory, its pages mapped when it is created (MAP_POPULATE exists on Linux only).
HOST_ARRAY_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def host_array(shape: Sequence[int], dtype) -> np.ndarray:
    """A zeroed array in memory of its own: page-aligned, so the CPU backend uses it in place."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buffer = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=HOST_ARRAY_FLAGS)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def from_view(view: Callable[[], np.ndarray], shape: Sequence[int], dtype) -> LazyTensor:
    """A tensor whose values are `view()` (e.g. a transposed view of a memory map), copied out on
    read: the view, and the mapping under it, live only while one tensor is copied."""

    def fill(out: np.ndarray) -> None:
        out[...] = view()

    return LazyTensor(tuple(shape), np.dtype(dtype), fill)


def stack(parts: Sequence[LazyTensor]) -> LazyTensor:
    """`parts` (one per layer) stacked on a new leading axis, filled part by part."""
    first = parts[0]
    for i, part in enumerate(parts):
        if part.shape != first.shape:
            raise ValueError(f"layer {i} has shape {part.shape}, layer 0 has {first.shape}")

    def fill(out: np.ndarray) -> None:
        for i, part in enumerate(parts):
            part.fill(out[i])

    return LazyTensor((len(parts),) + first.shape, first.dtype, fill, tuple(parts))


def layer_of(stacked: LazyTensor | np.ndarray, layer: int) -> LazyTensor | np.ndarray:
    """Layer `layer` of a tensor stacked on L (for per-layer weights, ModelConfig.scan_layers off):
    `stack`'s own part, read on its own, so the stacked whole is never materialised; an in-memory
    array's row is a view."""
    if isinstance(stacked, LazyTensor):
        if not stacked.parts:
            raise ValueError(f"a lazy tensor of shape {stacked.shape} was not stacked from layers")
        return stacked.parts[layer]
    return stacked[layer]


def assemble_params(cfg: ModelConfig, read: Callable[[str, int | None, tuple[int, ...]], LazyTensor]) -> dict:
    """The params tree of `model.param_infos(cfg)` from `read(key, layer, shape)`: one checkpoint
    tensor per key and layer (layer None outside the layers) in the declared shape; layers stacked."""
    infos = model.param_infos(dataclasses.replace(cfg, quantize_weights=False))
    params = {key: read(key, None, info.shape) for key, info in infos.items() if key != "layers"}
    params["layers"] = {
        key: stack([read(key, i, info.shape[1:]) for i in range(cfg.n_layers)]) for key, info in infos["layers"].items()
    }
    return params


# Values quantized per step of `_quantize`: float32 temporaries stay this small (64 MiB).
QUANTIZE_CHUNK_ELEMENTS = 16 * 2**20


def _scale_shape(shape: tuple[int, ...], contract: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if i in contract else n for i, n in enumerate(shape))


def _quantize(tensor: LazyTensor, contract: Sequence[int]) -> quant.QuantArray:
    """int8 of `tensor`, read in its own dtype and quantized a slab of leading rows at a time when
    the leading axis (layers, or vocabulary rows) is not contracted: the same result as one
    `quant.quantize` of the whole, without a float32 copy of the whole."""
    source = tensor.read()
    if 0 in contract:
        return quant.quantize(source.astype(np.float32), contract)
    result = quant.QuantArray(
        values=np.empty(tensor.shape, np.int8), scale=np.empty(_scale_shape(tensor.shape, contract), np.float32)
    )
    rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, source[0].size))
    for start in range(0, tensor.shape[0], rows):
        part = quant.quantize(source[start : start + rows].astype(np.float32), contract)
        result.values[start : start + rows], result.scale[start : start + rows] = part.values, part.scale
    return result


def quantized(tensor: LazyTensor, contract: Sequence[int]) -> quant.QuantArray:
    """int8 values and scales of `tensor`, both lazy: the tensor is read and quantized when the
    first is read, and the result is dropped once both have been read."""
    memo: dict[str, object] = {}

    def part(name: str, shape: tuple[int, ...], dtype) -> LazyTensor:
        def fill(out: np.ndarray) -> None:
            if "result" not in memo:
                memo["result"], memo["read"] = _quantize(tensor, contract), set()
            out[...] = getattr(memo["result"], name)
            memo["read"].add(name)
            if len(memo["read"]) == 2:
                memo.clear()

        return LazyTensor(shape, np.dtype(dtype), fill)

    scale = part("scale", _scale_shape(tensor.shape, contract), np.float32)
    return quant.QuantArray(values=part("values", tensor.shape, np.int8), scale=scale)
