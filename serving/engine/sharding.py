"""Device mesh, logical-axis sharding rules, and host <-> device placement.

Mesh axes are ("fsdp", "autoregressive", "tensor"), sized by MaxText's ici_*_parallelism flags
(-1 fills in the remaining devices). `ShardingRules` is the only place that maps the model's
logical axes to mesh axes:

  batch (decode slots)  -> fsdp x autoregressive
  embed (d_model of weights) -> fsdp
  vocab, mlp            -> tensor
  q_heads, kv_heads     -> tensor when n_kv_heads is a multiple of the tensor degree, else None
  cache_batch (slots of the KV cache and of decode attention) -> fsdp x autoregressive, and
                           tensor too when the KV heads are not split over it
  act_embed (d_model of activations) -> None: weights are gathered over fsdp, the residual
                           stream stays whole per batch shard

The KV cache's layout is derived from `parallelism.kv_cache_split`, the rule the stack's planner
sizes the cache with, so the two cannot drift apart.

Activations are pinned too (`activation_sharder`, used by every jitted step): the residual stream
[B, T, D] is sharded on the batch only, MLP hidden / heads / logits over the tensor axis as their
weights are. Without the pins, on meshes where fsdp > 1 and the batch is sharded (fsdp x
autoregressive), XLA propagated the weights' d_model-over-fsdp layout into the residual stream on
one side of a matmul and the batch-over-(fsdp, autoregressive) layout on the other, and resharded
between them by replicating the tensor ("Involuntary full rematerialization").

Attention with fewer KV heads than the tensor degree (SmolLM2: 9 q / 3 kv heads at TP=4 or 8):
the attention weights (wq, wk, wv, wo) are replicated over the tensor axis, and the KV cache is
split over the slots along it instead of the heads: each device attends for its share of the
slots, then the attention output [B, H*E] is gathered for the output projection, while the MLP
hidden dim and the vocab (embedding and logits) stay sharded over tensor. Padding heads to a
multiple of TP would cost 4/3x (TP=4) or 8/3x (TP=8) more KV cache and attention FLOPs on zero
heads; replicating the cache would cost TPx its memory. Models whose KV heads divide the tensor
degree (e.g. Llama3 405B: 8 kv heads, TP=8) shard heads and cache over it as usual.

Every host -> device input goes through `put` (jax.make_array_from_callback, so each process
supplies only its addressable shards under multi-controller JAX), and every output the host reads
is fully replicated and read through `to_host` (addressable data of this process).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from serving.engine import model
from serving.engine.config import ModelConfig
from serving.engine.model import ArrayInfo, is_info
from serving.engine.parallelism import MESH_AXES, ParallelismError, kv_cache_split, resolve_axes
from serving.engine.settings import EngineSettings

SETTING_KEYS = {
    "fsdp": "ici_fsdp_parallelism",
    "autoregressive": "ici_autoregressive_parallelism",
    "tensor": "ici_tensor_parallelism",
}


class MeshError(ValueError):
    """The parallelism flags do not fit the devices; the message names the keys."""


def mesh_shape(settings: EngineSettings, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes from the ici_*_parallelism settings, with one -1 filled in."""
    sizes = {
        "fsdp": settings.ici_fsdp_parallelism,
        "autoregressive": settings.ici_autoregressive_parallelism,
        "tensor": settings.ici_tensor_parallelism,
    }
    try:
        return resolve_axes(sizes, n_devices)
    except ParallelismError as error:
        described = ", ".join(f"{SETTING_KEYS[a]}={s}" for a, s in sizes.items())
        keys = ", ".join(SETTING_KEYS[a] for a in error.axes)
        raise MeshError(f"{described}: {keys}: {error}") from None


def make_mesh(settings: EngineSettings, devices: Sequence[jax.Device]) -> Mesh:
    sizes = mesh_shape(settings, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


MeshAxes = str | tuple[str, ...] | None
BATCH_AXES = ("fsdp", "autoregressive")  # decode slots


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or axes, or None = replicated)."""

    batch: MeshAxes = BATCH_AXES
    cache_batch: MeshAxes = BATCH_AXES
    prefill_batch: MeshAxes = None
    embed: MeshAxes = "fsdp"
    vocab: MeshAxes = "tensor"
    mlp: MeshAxes = "tensor"
    q_heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    cache_seq: MeshAxes = None
    layers: MeshAxes = None
    norm: MeshAxes = None
    act_embed: MeshAxes = None

    @classmethod
    def for_model(cls, cfg: ModelConfig, mesh: Mesh) -> ShardingRules:
        """Default rules, with the KV cache laid out as `parallelism.kv_cache_split` says."""
        split = kv_cache_split(cfg.n_kv_heads, dict(mesh.shape))
        if split.kv_heads == mesh.shape["tensor"]:
            return cls()
        # the tensor axis splits the cache's slots: attention heads (weights too) stay whole
        return cls(q_heads=None, kv_heads=None, cache_batch=BATCH_AXES + ("tensor",))

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for logical axes; a mesh axis used twice is an error."""
        physical = [None if a is None else getattr(self, a) for a in axes]
        used = [m for p in physical if p is not None for m in ((p,) if isinstance(p, str) else p)]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {tuple(axes)} map to a mesh axis twice: {physical}")
        return PartitionSpec(*physical)


def axis_size(mesh: Mesh, physical: MeshAxes) -> int:
    """Devices that a logical axis mapped to `physical` is split over."""
    if physical is None:
        return 1
    names = (physical,) if isinstance(physical, str) else physical
    return math.prod(mesh.shape[n] for n in names)


def named_sharding(mesh: Mesh, rules: ShardingRules, info: ArrayInfo) -> NamedSharding:
    spec = rules.spec(info.axes)
    for dim, logical, physical in zip(info.shape, info.axes, spec, strict=False):
        if dim % axis_size(mesh, physical):
            raise ValueError(
                f"dimension {logical}={dim} of an array {info.shape} does not divide over mesh "
                f"axes {physical} of size {axis_size(mesh, physical)}"
            )
    return NamedSharding(mesh, spec)


def activation_sharder(mesh: Mesh, rules: ShardingRules, batch_axis: str = "batch") -> model.Shard:
    """`model.Shard` for one jitted step: activation logical axes -> with_sharding_constraint.

    The activations' "act_batch" axis is the step's batch: "batch" (decode slots) or
    "prefill_batch" (one prompt).
    """

    def shard(x: jax.Array, axes: tuple) -> jax.Array:
        logical = tuple(batch_axis if a == "act_batch" else a for a in axes)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(logical)))

    return shard


def shardings(mesh: Mesh, rules: ShardingRules, infos):
    """The NamedSharding tree for a tree of ArrayInfo."""
    return jax.tree.map(lambda i: named_sharding(mesh, rules, i), infos, is_leaf=is_info)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(host_tree, sharding_tree):
    """Host numpy arrays -> global jax.Arrays with the given shardings (multi-controller safe).

    Each process materialises only its addressable shards from its own copy of the host values.
    """

    def place(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, host_tree, sharding_tree)


def to_host(array: jax.Array) -> np.ndarray:
    """A fully replicated jax.Array as numpy, read from this process's own copy."""
    if not array.sharding.is_fully_replicated:
        raise ValueError(f"to_host needs a replicated array, got {array.sharding}")
    return np.asarray(array.addressable_data(0))
