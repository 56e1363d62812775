"""SmolLM2-135M compiled for 8-device meshes: no involuntary rematerialization, no KV-cache traffic.

Compiles (does not run) prefill, insert and generate from abstract inputs (`JaxEngine.lower`) and
checks XLA's SPMD partitioner output: its "Involuntary full rematerialization" warning (printed to
stderr by XLA when it can only reshard by replicating) must not appear, and no collective may move
KV-cache data (only the new token's k/v [B, K, E] travel). The settings differ from the other
tests' so these programs are compiled here, not fetched from JAX's in-memory cache.
"""

from __future__ import annotations

import re

import jax
import pytest

pytestmark = pytest.mark.slow

SETTINGS = dict(max_prefill_predict_length=16, max_target_length=200, per_device_batch_size=2)
COLLECTIVE = re.compile(r"= \w+\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(")


def collective_shapes(hlo: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims, _ in COLLECTIVE.findall(hlo)]


def moves_cache(shape: tuple[int, ...], cache_length: int, head_dim: int, block: int) -> bool:
    """A collective result holding cache positions: a [.., S or kv_block, E] run of dims."""
    pairs = set(zip(shape, shape[1:], strict=False))
    return (cache_length, head_dim) in pairs or (block, head_dim) in pairs


@pytest.mark.parametrize(
    "mesh",
    [
        dict(ici_tensor_parallelism=8),
        dict(ici_tensor_parallelism=4, ici_autoregressive_parallelism=2),
        dict(ici_fsdp_parallelism=2, ici_tensor_parallelism=4),
        # fsdp shared by the batch and the weights' d_model: warned before activations were pinned.
        dict(ici_fsdp_parallelism=2, ici_autoregressive_parallelism=2, ici_tensor_parallelism=2),
    ],
    ids=["tp8", "tp4xar2", "fsdp2xtp4", "fsdp2xar2xtp2"],
)
def test_compiled_steps_do_not_rematerialize_or_move_the_cache(smollm_engines, capfd, mesh):
    engine = smollm_engines(jax.devices(), **SETTINGS, **mesh).generate_engine
    cfg = engine.cfg
    capfd.readouterr()
    hlo = {name: lowered.compile().as_text() for name, lowered in engine.lower().items()}
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[-2000:]
    # really partitioned: w_down contracts the MLP hidden dim, split over tensor (>= 2 here), so its
    # partial sums meet in an all-reduce
    assert re.search(r"\ball-reduce(-start)?\(", hlo["generate"])
    for name, text in hlo.items():
        moved = [s for s in collective_shapes(text) if moves_cache(s, engine.cache_length, cfg.head_dim, cfg.kv_block)]
        assert not moved, f"{name} moves KV-cache data: {moved}"
