"""Mesh axis sizes from MaxText's ici_*_parallelism flags, and how the KV cache splits over them.

Pure Python, no JAX: the server's mesh (`sharding.make_mesh`) and the stack's planner
(`components/core/planner.py`) resolve the flags with the same function, so the chips a plan
counts per axis are the devices the bundled server puts on that axis; and the planner sizes the
bundled server's KV cache with the same split the server's sharding rules derive theirs from
(`sharding.ShardingRules.for_model`). Each caller turns
a `ParallelismError` into its own message (settings keys for the server, config keys for the
stack) through the axes the error names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

MESH_AXES = ("fsdp", "autoregressive", "tensor")
FILL_IN = -1  # MaxText's "the remaining devices" for one axis


class ParallelismError(ValueError):
    """Axis sizes that cannot cover the devices; `axes` names the axes at fault."""

    def __init__(self, axes: tuple[str, ...], message: str):
        super().__init__(message)
        self.axes = axes


def resolve_axes(sizes: Mapping[str, int], devices: int) -> dict[str, int]:
    """Axis sizes (in MESH_AXES order) whose product is `devices`, with one -1 axis filled in."""
    sizes = {axis: sizes[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < FILL_IN:
            raise ParallelismError((axis,), f"{size} is not a positive axis size or {FILL_IN}")
    fill = tuple(axis for axis, size in sizes.items() if size == FILL_IN)
    if len(fill) > 1:
        raise ParallelismError(fill, f"only one axis may be {FILL_IN}; {', '.join(fill)} are")
    fixed = math.prod(size for size in sizes.values() if size != FILL_IN)
    if fill:
        if devices % fixed:
            raise ParallelismError(
                fill, f"cannot fill in: {devices} devices are not a multiple of the other axes' product {fixed}"
            )
        sizes[fill[0]] = devices // fixed
    product = math.prod(sizes.values())
    if product != devices:
        raise ParallelismError(
            MESH_AXES,
            f"the axes' product {product} must equal the {devices} devices; set one axis to {FILL_IN} to fill in",
        )
    return sizes


@dataclasses.dataclass(frozen=True)
class CacheSplit:
    """Ways the decode KV cache [L, B, K, S, E] is split over the mesh, per dimension."""

    batch: int  # decode slots B
    kv_heads: int  # K
    seq: int = 1  # S


def kv_cache_split(n_kv_heads: int, axes: Mapping[str, int]) -> CacheSplit:
    """The bundled server's decode KV cache layout over mesh axis sizes `axes`.

    Slots always split over fsdp x autoregressive. The tensor axis splits the KV heads when its
    size divides them; otherwise (SmolLM2's 3 KV heads on 4 or 8 devices) it splits the slots
    too: attention runs data-parallel over the slots while the MLP stays tensor-parallel, so no
    device holds a replica of the cache. Slots are per_device_batch_size x devices, so the batch
    split (at most every device) always divides them.
    """
    tensor, batch = axes["tensor"], axes["fsdp"] * axes["autoregressive"]
    if n_kv_heads % tensor == 0:
        return CacheSplit(batch=batch, kv_heads=tensor)
    return CacheSplit(batch=batch * tensor, kv_heads=1)
