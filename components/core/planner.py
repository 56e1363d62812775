"""Pre-flight planning: does the model shard onto the slice, and does it fit in HBM?

Pure arithmetic on the catalog rows and the parsed config; a plan that cannot shard or fit raises
`ConfigError` before any resource exists.

Parallelism (fsdp x autoregressive x tensor == chips of one slice, one axis may be -1 and is
filled in, `serving.engine.parallelism.resolve_axes`, the same function as the bundled server's
mesh; tensor must divide the attention heads). Axes the user sets are used as given and checked
strictly. With none set, the preset's recipe is fitted to the slice (`preset_axes`): as written
when it fits, else tensor kept (reduced to divide the chips and the heads) and autoregressive
taking the rest. The server gets the values the plan used.

Memory per chip, for the runtime that will hold it (`cfg.runtime.memory_per_chip`; each runtime's
module in components/core/runtimes/ documents its formulas):

  needed/chip = weights/chip + KV cache/chip <= usable/chip = 32 GiB x (1 - hbmReservePercent/100);
  the reserve covers XLA scratch, activations and compiled programs. In disaggregated mode each
  slice holds all weights and the generate slice the full-length KV cache, so the check above is
  the binding one for both slices.

The decode-step lower bound (needed bytes / HBM bandwidth) is reported as a sanity number: each
generated token reads every weight and the whole live KV cache once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from components.core import tpu
from components.core.autoscaling import Autoscaling
from components.core.config import StackConfig
from components.core.config_table import AXIS_KEYS
from components.core.errors import ConfigError
from components.core.hpa import scale_down_stabilization_seconds
from components.core.node_pools import tpu_node_pools
from serving.engine.parallelism import FILL_IN, ParallelismError, resolve_axes

GIB = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parallelism:
    fsdp: int
    autoregressive: int
    tensor: int

    @property
    def product(self) -> int:
        return self.fsdp * self.autoregressive * self.tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What the planner decided; everything the summary output and the manifests need."""

    model: str
    topology: str
    slices: int  # per LeaderWorkerSet replica: one per slice role
    chips_per_slice: int
    hosts_per_slice: int
    machine_type: str
    node_pools: tuple[str, ...]
    parallelism: Parallelism
    axis_flags: Mapping[str, int]  # ici_<axis>_parallelism values the server gets (-1 = it fills in)
    global_batch: int
    weights_gib_per_chip: float
    kv_cache_gib_per_chip: float
    usable_gib_per_chip: float
    hbm_gib_per_chip: int
    decode_step_ms_lower_bound: float
    replicas: Mapping | None  # chips and hosts at min and max replicas; None for one fixed replica

    @property
    def needed_gib_per_chip(self) -> float:
        return self.weights_gib_per_chip + self.kv_cache_gib_per_chip

    def summary(self) -> dict:
        return {
            "model": self.model,
            "topology": self.topology,
            "slices": self.slices,
            "chipsPerSlice": self.chips_per_slice,
            "hostsPerSlice": self.hosts_per_slice,
            "machineType": self.machine_type,
            "nodePools": list(self.node_pools),
            "parallelism": dataclasses.asdict(self.parallelism),
            "globalBatch": self.global_batch,
            "hbmGiBPerChip": {
                "weights": round(self.weights_gib_per_chip, 2),
                "kvCache": round(self.kv_cache_gib_per_chip, 2),
                "needed": round(self.needed_gib_per_chip, 2),
                "usable": round(self.usable_gib_per_chip, 2),
                "physical": self.hbm_gib_per_chip,
            },
            "decodeStepMsLowerBound": round(self.decode_step_ms_lower_bound, 2),
            **({"replicas": self.replicas} if self.replicas is not None else {}),
        }


# ---------------------------------------------------------------------------------------------
# Parallelism.


def preset_axes(recipe: Mapping[str, int], chips: int, heads: int) -> dict[str, int]:
    """The preset's recipe fitted to `chips`: as written when it covers them with a tensor axis
    that divides the attention heads; else fsdp as written, tensor as written (or, for a recipe
    that fills tensor in, as wide as possible) reduced to a divisor of the remaining chips and of
    the heads, and autoregressive taking the rest."""
    try:
        as_written = resolve_axes(recipe, chips)
        if heads % as_written["tensor"] == 0:
            return dict(recipe)
    except ParallelismError:
        pass
    fsdp = math.gcd(max(recipe["fsdp"], 1), chips)
    widest = chips if recipe["tensor"] == FILL_IN else recipe["tensor"]
    tensor = math.gcd(widest, chips // fsdp, heads)
    return {"fsdp": fsdp, "autoregressive": chips // (fsdp * tensor), "tensor": tensor}


def server_axes(cfg: StackConfig) -> dict[str, int]:
    """The ici_* values the server gets: the user's axes as given, or the fitted preset recipe."""
    recipe = {
        "fsdp": cfg.model.fsdp_parallelism,
        "autoregressive": cfg.model.autoregressive_parallelism,
        "tensor": cfg.model.tensor_parallelism,
    }
    if not cfg.server.parallelism:
        return preset_axes(recipe, cfg.tpu_slice.chips, cfg.model.heads)
    return {**recipe, **cfg.server.parallelism}


def resolve_parallelism(cfg: StackConfig, axes: Mapping[str, int]) -> Parallelism:
    """Fill in a -1 axis and check fsdp x autoregressive x tensor == chips of the slice."""
    chips = cfg.tpu_slice.chips
    try:
        resolved = resolve_axes(axes, chips)
    except ParallelismError as error:
        described = " x ".join(f"{axis} {size}" for axis, size in axes.items())
        raise ConfigError(
            (*(AXIS_KEYS[axis] for axis in error.axes), "topology"),
            f"{described} does not fit: topology {cfg.tpu_slice.topology} has {chips} chips ({error})",
            "make the product of the parallelism axes the chip count, e.g. tensorParallelism=-1 to fill in, "
            "or set none of them to use the preset's recipe",
        ) from None
    parallelism = Parallelism(**resolved)
    _check_heads_shard(cfg, parallelism)
    return parallelism


def _check_heads_shard(cfg: StackConfig, parallelism: Parallelism) -> None:
    heads = cfg.model.heads
    if heads % parallelism.tensor:
        raise ConfigError(
            ("tensorParallelism", "topology"),
            f"tensor parallelism {parallelism.tensor} does not divide the {heads} attention heads of {cfg.model.name}",
            "use a tensor axis that divides the heads and put the rest of the chips on autoregressiveParallelism",
        )


# ---------------------------------------------------------------------------------------------
# Checks.


def _check_lengths(cfg: StackConfig) -> None:
    target, prefill = cfg.server.max_target_length, cfg.server.max_prefill_length
    if target <= prefill:
        raise ConfigError(
            ("maxTargetLength", "maxPrefillLength"),
            f"max target length {target} must exceed max prefill length {prefill}",
            f"pulumi config set maxTargetLength {prefill * 2}",
        )


def _check_fit(cfg: StackConfig, parallelism: Parallelism, weights: float, kv: float, usable: float) -> None:
    needed = weights + kv
    if needed <= usable:
        return
    hbm = cfg.tpu_slice.hbm_gib_per_chip
    # Name the keys that can fix it: the weights alone decide whether batch or length can help.
    keys = (
        ("model", "topology", "quantization")
        if weights > usable
        else ("topology", "perDeviceBatchSize", "maxTargetLength")
    )
    raise ConfigError(
        keys,
        f"{cfg.model.name} ({cfg.server.quantization}) does not fit topology {cfg.tpu_slice.topology}: "
        f"needs {needed:.1f} GiB HBM per chip "
        f"(weights {weights:.1f} + KV cache {kv:.1f}) but {usable:.1f} of {hbm} GiB are usable",
        _fit_suggestion(cfg, parallelism, weights, usable),
    )


def _fit_suggestion(cfg: StackConfig, parallelism: Parallelism, weights: float, usable: float) -> str:
    hints = list(cfg.runtime.fit_hints(cfg, parallelism))
    if weights > usable:
        hints.append("a bigger topology")
    else:
        hints.append("a smaller perDeviceBatchSize or maxTargetLength")
        if not cfg.server.quantize_kv_cache:
            hints.append("quantizeKvCache=true")
        hints.append("a bigger topology")
    return "try " + ", or ".join(hints)


def plan_deployment(cfg: StackConfig) -> Plan:
    """The plan for a config, or ConfigError if it cannot shard or fit."""
    _check_lengths(cfg)
    axes = server_axes(cfg)
    parallelism = resolve_parallelism(cfg, axes)
    cfg.runtime.check_parallelism(cfg, parallelism)
    memory = cfg.runtime.memory_per_chip(cfg, parallelism)
    weights, kv = memory.weights_bytes / GIB, memory.kv_cache_bytes / GIB
    usable = cfg.tpu_slice.hbm_gib_per_chip * (1 - cfg.server.hbm_reserve_percent / 100)
    _check_fit(cfg, parallelism, weights, kv, usable)
    step_ms = (weights + kv) * GIB / (cfg.tpu_slice.hbm_bandwidth_gbps * 1e9) * 1e3
    return Plan(
        model=cfg.model.name,
        topology=cfg.tpu_slice.topology,
        slices=len(cfg.slice_roles),
        chips_per_slice=cfg.tpu_slice.chips,
        hosts_per_slice=cfg.tpu_slice.hosts,
        machine_type=cfg.tpu_slice.machine_type,
        node_pools=tuple(spec.name for spec in tpu_node_pools(cfg)),
        parallelism=parallelism,
        axis_flags=axes,
        global_batch=cfg.server.per_device_batch_size * cfg.tpu_slice.chips,
        weights_gib_per_chip=weights,
        kv_cache_gib_per_chip=kv,
        usable_gib_per_chip=usable,
        hbm_gib_per_chip=cfg.tpu_slice.hbm_gib_per_chip,
        decode_step_ms_lower_bound=step_ms,
        replicas=replica_summary(
            cfg.scaling,
            tpu_slice=cfg.tpu_slice,
            roles=cfg.slice_roles,
            startup_delay_seconds=cfg.startup_probe_delay_seconds,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Capacity: one TPU slice per role per replica.


def _capacity_at(replicas: int, tpu_slice: tpu.TpuSlice, roles: tuple[str, ...]) -> dict:
    slices = replicas * len(roles)
    return {
        "replicas": replicas,
        "slices": slices,
        "chips": slices * tpu_slice.chips,
        "hosts": slices * tpu_slice.hosts,
    }


def replica_summary(
    scaling: Autoscaling, *, tpu_slice: tpu.TpuSlice, roles: tuple[str, ...], startup_delay_seconds: int
) -> dict | None:
    """Chips and hosts at the minimum and maximum replica count, for the plan output.

    None for the default single, fixed replica, so a stack without these keys previews as before.
    """
    if scaling.max_replicas == 1:
        return None
    summary = {
        "min": _capacity_at(scaling.replicas, tpu_slice, roles),
        "max": _capacity_at(scaling.max_replicas, tpu_slice, roles),
    }
    if scaling.enabled:
        summary["autoscaling"] = {
            "metric": scaling.metric.prometheus_name,
            "target": scaling.target_quantity,
            "scaleDownStabilizationSeconds": scale_down_stabilization_seconds(startup_delay_seconds),
        }
    return summary
