"""Pre-flight planning: does the model shard onto the slice, and does it fit in HBM?

Pure arithmetic on the catalog rows and the parsed config; a plan that cannot shard or fit raises
`ConfigError` before any resource exists. The memory model (per chip, one slice):

  chips          = chips of the topology (one slice; disaggregated runs two identical slices)
  parallelism    = fsdp x autoregressive x tensor == chips; one axis may be -1 and is filled in
                   with chips / (product of the others), as MaxText does (the same function as
                   the bundled server's mesh: serving/engine/parallelism.py, pure Python).
  weights/chip   = params x bytes_per_weight / chips
                   MaxText shards every matmul weight over the fsdp, tensor and autoregressive
                   axes, so weights divide over all chips. int8 = 1 byte (per-channel scales are
                   < 0.1% and ignored), bf16 = 2 bytes.
  KV cache/chip  = sequences/chip x max_target_length x bytes/token/chip, where
                   global batch     = per_device_batch_size x chips (MaxText's definition)
                   sequences/chip   = global batch / (autoregressive x fsdp)   (cache batch axis)
                   kv heads/chip    = kv_heads / gcd(tensor, kv_heads)          (cache heads axis;
                                      with tensor > kv_heads the heads are replicated)
                   bytes/token/chip = layers x 2 (K and V) x kv heads/chip x bytes/head
                   bytes/head       = head_dim x 2 (bf16), or head_dim x 1 + 2 (int8 + bf16 scale)
  needed/chip    = weights/chip + KV cache/chip
  usable/chip    = 32 GiB x (1 - hbmReservePercent / 100); the reserve covers XLA scratch,
                   activations and compiled programs.
In disaggregated mode each slice holds all weights; the generate slice holds the full-length KV
cache, so the check above is the binding one for both slices.

The decode-step lower bound (needed bytes / HBM bandwidth) is reported as a sanity number: each
generated token reads every weight and the whole live KV cache once.
"""

from __future__ import annotations

import dataclasses
import math

from components.core.config import StackConfig
from components.core.errors import ConfigError
from serving.engine.parallelism import ParallelismError, resolve_axes

GIB = 1 << 30
WEIGHT_BYTES = {"int8": 1, "bf16": 2}
# The stack config key of each mesh axis.
AXIS_KEYS = {"fsdp": "fsdpParallelism", "autoregressive": "autoregressiveParallelism", "tensor": "tensorParallelism"}


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
    slices: int
    chips_per_slice: int
    hosts_per_slice: int
    machine_type: str
    node_pools: tuple[str, ...]
    parallelism: Parallelism
    global_batch: int
    weights_gib_per_chip: float
    kv_cache_gib_per_chip: float
    usable_gib_per_chip: float
    hbm_gib_per_chip: int
    decode_step_ms_lower_bound: float

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
        }


def resolve_parallelism(cfg: StackConfig) -> Parallelism:
    """Fill in a -1 axis and check fsdp x autoregressive x tensor == chips of the slice."""
    chips = cfg.tpu_slice.chips
    configured = {"fsdp": cfg.fsdp_parallelism, "autoregressive": cfg.autoregressive_parallelism, "tensor": cfg.tensor_parallelism}
    try:
        axes = resolve_axes(configured, chips)
    except ParallelismError as error:
        described = " x ".join(f"{axis} {size}" for axis, size in configured.items())
        raise ConfigError((*(AXIS_KEYS[axis] for axis in error.axes), "topology"),
                          f"{described} does not fit: topology {cfg.tpu_slice.topology} has {chips} chips ({error})",
                          "make the product of the parallelism axes the chip count, e.g. tensorParallelism=-1 to fill in") from None
    parallelism = Parallelism(**axes)
    _check_heads_shard(cfg, parallelism)
    return parallelism


def _check_heads_shard(cfg: StackConfig, parallelism: Parallelism) -> None:
    heads = cfg.model.heads
    if heads % parallelism.tensor:
        raise ConfigError(("tensorParallelism", "topology"),
                          f"tensor parallelism {parallelism.tensor} does not divide the {heads} attention heads of {cfg.model.name}",
                          "use a tensor axis that divides the heads and put the rest of the chips on autoregressiveParallelism")


def _weights_bytes_per_chip(cfg: StackConfig) -> float:
    return cfg.model.params * WEIGHT_BYTES[cfg.quantization] / cfg.tpu_slice.chips


def _kv_bytes_per_chip(cfg: StackConfig, parallelism: Parallelism) -> float:
    model = cfg.model
    global_batch = cfg.per_device_batch_size * cfg.tpu_slice.chips
    sequences_per_chip = math.ceil(global_batch / (parallelism.autoregressive * parallelism.fsdp))
    kv_heads_per_chip = model.kv_heads // math.gcd(parallelism.tensor, model.kv_heads)
    bytes_per_head = model.head_dim + 2 if cfg.quantize_kv_cache else model.head_dim * 2
    bytes_per_token = model.layers * 2 * kv_heads_per_chip * bytes_per_head
    return sequences_per_chip * cfg.max_target_length * bytes_per_token


def _check_lengths(cfg: StackConfig) -> None:
    if cfg.max_target_length <= cfg.max_prefill_length:
        raise ConfigError(("maxTargetLength", "maxPrefillLength"),
                          f"max target length {cfg.max_target_length} must exceed max prefill length {cfg.max_prefill_length}",
                          f"pulumi config set maxTargetLength {cfg.max_prefill_length * 2}")


def _check_fit(cfg: StackConfig, weights: float, kv: float, usable: float) -> None:
    needed = weights + kv
    if needed <= usable:
        return
    hbm = cfg.tpu_slice.hbm_gib_per_chip
    # Name the keys that can fix it: the weights alone decide whether batch or length can help.
    keys = ("model", "topology", "quantization") if weights > usable else ("topology", "perDeviceBatchSize", "maxTargetLength")
    raise ConfigError(keys,
                      f"{cfg.model.name} ({cfg.quantization}) does not fit topology {cfg.tpu_slice.topology}: needs {needed:.1f} GiB HBM per chip "
                      f"(weights {weights:.1f} + KV cache {kv:.1f}) but {usable:.1f} of {hbm} GiB are usable",
                      _fit_suggestion(cfg, weights, usable))


def _fit_suggestion(cfg: StackConfig, weights: float, usable: float) -> str:
    hints = []
    if cfg.quantization == "bf16":
        hints.append("quantization=int8")
    if weights > usable:
        hints.append("a bigger topology")
    else:
        hints.append("a smaller perDeviceBatchSize or maxTargetLength")
        if not cfg.quantize_kv_cache:
            hints.append("quantizeKvCache=true")
        hints.append("a bigger topology")
    return "try " + ", or ".join(hints)


def plan_deployment(cfg: StackConfig) -> Plan:
    """The plan for a config, or ConfigError if it cannot shard or fit."""
    _check_lengths(cfg)
    parallelism = resolve_parallelism(cfg)
    weights = _weights_bytes_per_chip(cfg) / GIB
    kv = _kv_bytes_per_chip(cfg, parallelism) / GIB
    usable = cfg.tpu_slice.hbm_gib_per_chip * (1 - cfg.hbm_reserve_percent / 100)
    _check_fit(cfg, weights, kv, usable)
    step_ms = (weights + kv) * GIB / (cfg.tpu_slice.hbm_bandwidth_gbps * 1e9) * 1e3
    return Plan(
        model=cfg.model.name,
        topology=cfg.tpu_slice.topology,
        slices=len(cfg.slice_roles),
        chips_per_slice=cfg.tpu_slice.chips,
        hosts_per_slice=cfg.tpu_slice.hosts,
        machine_type=cfg.tpu_slice.machine_type,
        node_pools=tuple(node_pool_name(cfg, role) for role in cfg.slice_roles),
        parallelism=parallelism,
        global_batch=cfg.per_device_batch_size * cfg.tpu_slice.chips,
        weights_gib_per_chip=weights,
        kv_cache_gib_per_chip=kv,
        usable_gib_per_chip=usable,
        hbm_gib_per_chip=cfg.tpu_slice.hbm_gib_per_chip,
        decode_step_ms_lower_bound=step_ms,
    )


def node_pool_name(cfg: StackConfig, role: str) -> str:
    """GKE node pool name of one slice, e.g. v6e-16-serving or v6e-8-prefill."""
    return f"{cfg.tpu_slice.name}-{role}"
