"""The HBM and sharding planner against hand-computed figures, and the reference deployments' two decisions.

Every expected number below was worked out by hand from the model card and the slice (the
arithmetic is in the comment next to it), not with the planner's own formula. GiB = 2**30 bytes.
"""

import pytest

from components.core.errors import ConfigError
from components.core.planner import plan_deployment, preset_axes
from tests.stack.stack_helpers import config

REFERENCE_405B = dict(model="llama3.1-405b", topology="4x4")  # preset = the reference YAML's flags
BUNDLED = dict(
    serverRuntime="bundled",
    bundledServerImage="registry.example/jetstream-jax:0.1.0",
    checkpointPath="gs://test-checkpoints/m/model.npz",
)


def test_405b_int8_on_4x4_with_the_reference_settings_fits():
    plan = plan_deployment(config(**REFERENCE_405B, quantization="int8"))
    assert (plan.parallelism.tensor, plan.parallelism.autoregressive, plan.parallelism.fsdp) == (8, 2, 1)
    assert plan.global_batch == 160  # 10 per chip x 16 chips
    # 405.85e9 params x 1 byte / 16 chips = 25.366e9 bytes.
    assert plan.weights_gib_per_chip == pytest.approx(23.624, abs=1e-3)
    # 160 sequences / AR 2 = 80 per chip x 2048 tokens x 126 layers x 2 (K, V) x 1 kv head (8 / TP 8)
    # x 130 bytes (128 int8 + a 2-byte scale) = 5,367,398,400 bytes.
    assert plan.kv_cache_gib_per_chip == pytest.approx(4.999, abs=1e-3)
    assert plan.needed_gib_per_chip == pytest.approx(28.622, abs=1e-3) and plan.usable_gib_per_chip == pytest.approx(
        28.8
    )


def test_405b_bf16_on_4x4_is_refused_with_numbers_and_a_suggestion():
    with pytest.raises(ConfigError) as refused:
        plan_deployment(config(**REFERENCE_405B, quantization="bf16"))
    message = str(refused.value)
    assert "`topology`" in message and "`quantization`" in message
    # 2 x 23.62 GiB of weights + 5.0 GiB of KV cache.
    assert "52.2 GiB" in message and "28.8 of 32 GiB" in message
    assert "quantization=int8" in message and "bigger topology" in message


def test_405b_bf16_on_8x8_adapts_the_preset_recipe():
    """8.10: tensor 8 x autoregressive 2 covers only 16 of 64 chips; the recipe keeps tensor 8
    and autoregressive takes the rest, and the server is told so."""
    plan = plan_deployment(config(model="llama3.1-405b", topology="8x8", quantization="bf16"))
    assert (plan.parallelism.fsdp, plan.parallelism.autoregressive, plan.parallelism.tensor) == (1, 8, 8)
    assert dict(plan.axis_flags) == {"fsdp": 1, "autoregressive": 8, "tensor": 8}
    # 405.85e9 x 2 bytes / 64 chips = 12.683e9 bytes; KV: 640 / AR 8 = 80 sequences, as on 4x4.
    assert plan.weights_gib_per_chip == pytest.approx(11.812, abs=1e-3)
    assert plan.kv_cache_gib_per_chip == pytest.approx(4.999, abs=1e-3)


@pytest.mark.parametrize(
    "recipe, chips, heads, fitted",
    [
        (
            {"fsdp": 1, "autoregressive": 2, "tensor": 8},
            16,
            128,
            {"fsdp": 1, "autoregressive": 2, "tensor": 8},
        ),  # as written
        ({"fsdp": 1, "autoregressive": 2, "tensor": 8}, 64, 128, {"fsdp": 1, "autoregressive": 8, "tensor": 8}),
        ({"fsdp": 1, "autoregressive": 2, "tensor": 8}, 4, 128, {"fsdp": 1, "autoregressive": 1, "tensor": 4}),
        (
            {"fsdp": 1, "autoregressive": 1, "tensor": -1},
            8,
            64,
            {"fsdp": 1, "autoregressive": 1, "tensor": -1},
        ),  # as written
        ({"fsdp": 1, "autoregressive": 1, "tensor": -1}, 256, 32, {"fsdp": 1, "autoregressive": 8, "tensor": 32}),
    ],
)
def test_preset_recipe_fits_any_slice(recipe, chips, heads, fitted):
    assert preset_axes(recipe, chips, heads) == fitted


def test_parallelism_the_user_sets_is_checked_strictly():
    with pytest.raises(ConfigError) as refused:
        plan_deployment(
            config(model="llama3.1-405b", topology="8x8", tensorParallelism="8", autoregressiveParallelism="2")
        )
    assert {"tensorParallelism", "autoregressiveParallelism", "topology"} <= set(refused.value.keys)
    assert "topology 8x8 has 64 chips" in str(refused.value)


def test_disaggregated_70b_fills_in_tensor_parallelism_like_maxtext():
    plan = plan_deployment(config(model="llama2-70b", topology="2x4", mode="disaggregated"))
    assert (plan.parallelism.tensor, plan.slices, plan.hosts_per_slice) == (8, 2, 2)
    assert plan.axis_flags["tensor"] == -1  # the reference YAML's flag: MaxText fills it in
    assert plan.node_pools == ("v6e-8-prefill-test", "v6e-8-generate-test")
    # 8 sequences x 2048 tokens x 80 layers x 2 x 1 kv head x 130 bytes = 340,787,200 bytes.
    assert plan.kv_cache_gib_per_chip == pytest.approx(0.3174, abs=1e-4)
    # 68.98e9 params x 1 byte / 8 chips = 8.6225e9 bytes.
    assert plan.weights_gib_per_chip == pytest.approx(8.030, abs=1e-3)


def test_kv_heads_are_replicated_when_tensor_exceeds_kv_heads():
    narrow = plan_deployment(
        config(model="llama3.1-70b", topology="4x4", tensorParallelism="8", autoregressiveParallelism="2")
    )
    wide = plan_deployment(
        config(model="llama3.1-70b", topology="4x4", tensorParallelism="16", autoregressiveParallelism="1")
    )
    # TP 8 x AR 2: 32 sequences / 2 = 16 x 2048 x 80 x 2 x 1 kv head x 130 = 681,574,400 bytes.
    assert narrow.kv_cache_gib_per_chip == pytest.approx(0.6348, abs=1e-4)
    # TP 16 > 8 kv heads: still one kv head per chip, and all 32 sequences on every chip.
    assert wide.kv_cache_gib_per_chip == pytest.approx(1.2695, abs=1e-4)


def test_int8_kv_cache_is_smaller_and_more_batch_costs_more():
    base = dict(model="llama3.1-8b", topology="2x2")
    # TP 4: 2 kv heads per chip; 8 x 4 = 32 sequences x 2048 x 32 layers x 2 x 2 heads x 130 bytes.
    assert plan_deployment(config(**base, quantizeKvCache="true")).kv_cache_gib_per_chip == pytest.approx(
        1.0156, abs=1e-4
    )
    # bf16: x 256 bytes per head instead of 130 = 2,147,483,648 bytes.
    assert plan_deployment(config(**base, quantizeKvCache="false")).kv_cache_gib_per_chip == pytest.approx(2.0)
    assert plan_deployment(config(**base, perDeviceBatchSize="16")).kv_cache_gib_per_chip == pytest.approx(
        2.0312, abs=1e-4
    )


def test_bundled_server_memory_is_what_it_allocates():
    """8.11: the bundled server keeps one float32 scale per (token, head) of its int8 KV cache and a
    full weight copy per autoregressive shard (tests/contract compares with the server itself)."""
    tp4 = plan_deployment(config(model="llama3.1-8b", topology="2x2", **BUNDLED))
    # 32 sequences x 2048 x 32 layers x 2 x 2 kv heads x (128 + 4) bytes = 1,107,296,256 bytes.
    assert tp4.kv_cache_gib_per_chip == pytest.approx(1.0312, abs=1e-4)
    # Embeddings 2 x 128256 x 4096 + attention 32 x 4096 x 128 x (2 x 32 + 2 x 8) + MLP 32 x 3 x 4096 x 14336
    # = 8,029,995,008 int8 weights over TP 4 = 2,007,498,752 bytes.
    assert tp4.weights_gib_per_chip == pytest.approx(1.8696, abs=1e-4)
    ar2 = plan_deployment(
        config(model="llama3.1-8b", topology="2x2", tensorParallelism="2", autoregressiveParallelism="2", **BUNDLED)
    )
    assert ar2.weights_gib_per_chip == pytest.approx(3.7393, abs=1e-4)  # over TP 2 only: AR replicates


def test_bundled_405b_with_the_reference_recipe_is_refused_with_the_fsdp_hint():
    with pytest.raises(ConfigError) as refused:
        plan_deployment(config(**REFERENCE_405B, **BUNDLED))
    # 405.85e9 int8 weights over TP 8 only = 50.7e9 bytes per chip.
    assert "weights 47.2" in str(refused.value) and "fsdpParallelism=2 with autoregressiveParallelism=1" in str(
        refused.value
    )


def test_reserve_percent_sets_usable_hbm():
    plan = plan_deployment(config(hbmReservePercent="25"))
    assert plan.usable_gib_per_chip == pytest.approx(24.0)


def test_decode_step_lower_bound_reads_needed_bytes_at_hbm_bandwidth():
    plan = plan_deployment(config(**REFERENCE_405B))
    # 28.622 GiB = 30.733e9 bytes at 1640e9 bytes/s.
    assert plan.decode_step_ms_lower_bound == pytest.approx(18.74, abs=0.01)


@pytest.mark.parametrize(
    "raw, keys, fragment",
    [
        (
            dict(model="llama3.1-405b", topology="4x8", tensorParallelism="8", autoregressiveParallelism="2"),
            ("tensorParallelism", "topology"),
            "topology 4x8 has 32 chips",
        ),
        (
            dict(tensorParallelism="-1", autoregressiveParallelism="-1"),
            ("autoregressiveParallelism", "tensorParallelism"),
            "only one axis may be -1",
        ),
        (
            dict(tensorParallelism="3", autoregressiveParallelism="-1"),
            ("autoregressiveParallelism", "topology"),
            "not a multiple",
        ),
        (
            dict(model="gemma-7b", topology="4x8", tensorParallelism="-1"),
            ("tensorParallelism", "topology"),
            "does not divide the 16 attention heads",
        ),
        (dict(maxPrefillLength="4096", maxTargetLength="2048"), ("maxTargetLength", "maxPrefillLength"), "must exceed"),
        (
            dict(model="llama3.1-8b", topology="1x1", perDeviceBatchSize="512"),
            ("perDeviceBatchSize", "maxTargetLength"),
            "smaller perDeviceBatchSize",
        ),
    ],
)
def test_plans_that_cannot_shard_or_fit_are_refused(raw, keys, fragment):
    with pytest.raises(ConfigError) as refused:
        plan_deployment(config(**raw))
    assert set(keys) <= set(refused.value.keys), refused.value
    assert fragment in str(refused.value)


def test_summary_reports_hbm_needed_vs_available():
    summary = plan_deployment(config(**REFERENCE_405B)).summary()
    assert (
        summary["chipsPerSlice"] == 16
        and summary["hostsPerSlice"] == 4
        and summary["nodePools"] == ["v6e-16-serving-test"]
    )
    assert summary["hbmGiBPerChip"] == {
        "weights": 23.62,
        "kvCache": 5.0,
        "needed": 28.62,
        "usable": 28.8,
        "physical": 32,
    }
