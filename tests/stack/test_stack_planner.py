"""The HBM and sharding planner: hand-computed numbers and the seed's two decisions."""

import math

import pytest

from components.core.errors import ConfigError
from components.core.planner import GIB, plan_deployment

from stack_helpers import config

SEED_405B = dict(model="llama3.1-405b", topology="4x4")  # preset = the seed's flags


def test_405b_int8_on_4x4_with_the_seed_settings_fits():
    plan = plan_deployment(config(**SEED_405B, quantization="int8"))
    assert (plan.parallelism.tensor, plan.parallelism.autoregressive, plan.parallelism.fsdp) == (8, 2, 1)
    assert plan.global_batch == 10 * 16
    # Weights: 405.85e9 params x 1 byte over 16 chips.
    assert plan.weights_gib_per_chip == pytest.approx(405.85e9 / 16 / GIB)
    # KV: 160 sequences / AR 2 = 80 per chip x 2048 tokens x 126 layers x 2 x (8 kv heads / TP 8)
    #     x (128 int8 + 2 bytes scale).
    assert plan.kv_cache_gib_per_chip == pytest.approx(80 * 2048 * 126 * 2 * 1 * 130 / GIB)
    assert plan.needed_gib_per_chip < plan.usable_gib_per_chip == pytest.approx(32 * 0.9)


def test_405b_bf16_on_4x4_is_refused_with_numbers_and_a_suggestion():
    with pytest.raises(ConfigError) as refused:
        plan_deployment(config(**SEED_405B, quantization="bf16"))
    message = str(refused.value)
    assert "`topology`" in message and "`quantization`" in message
    assert "52.2 GiB" in message and "28.8 of 32 GiB" in message
    assert "quantization=int8" in message and "bigger topology" in message


def test_405b_bf16_fits_on_a_bigger_slice():
    plan = plan_deployment(config(model="llama3.1-405b", topology="8x8", quantization="bf16", tensorParallelism="8", autoregressiveParallelism="-1"))
    assert plan.parallelism.autoregressive == 8
    assert plan.weights_gib_per_chip == pytest.approx(405.85e9 * 2 / 64 / GIB)


def test_disaggregated_70b_fills_in_tensor_parallelism_like_maxtext():
    plan = plan_deployment(config(model="llama2-70b", topology="2x4", mode="disaggregated"))
    assert (plan.parallelism.tensor, plan.slices, plan.hosts_per_slice) == (8, 2, 2)
    assert plan.node_pools == ("v6e-8-prefill", "v6e-8-generate")
    # 8 sequences x 2048 tokens x 80 layers x 2 x 1 kv head/chip x 130 bytes.
    assert plan.kv_cache_gib_per_chip == pytest.approx(8 * 2048 * 80 * 2 * 130 / GIB)


def test_kv_heads_are_replicated_when_tensor_exceeds_kv_heads():
    narrow = plan_deployment(config(model="llama3.1-70b", topology="4x4", tensorParallelism="8", autoregressiveParallelism="2"))
    wide = plan_deployment(config(model="llama3.1-70b", topology="4x4", tensorParallelism="16", autoregressiveParallelism="1"))
    # TP 16 > 8 kv heads: each chip still holds one kv head, and batch is no longer split by AR.
    assert wide.kv_cache_gib_per_chip == pytest.approx(2 * narrow.kv_cache_gib_per_chip)


def test_int8_kv_cache_halves_the_cache_and_more_batch_costs_more():
    base = dict(model="llama3.1-8b", topology="2x2")
    int8 = plan_deployment(config(**base, quantizeKvCache="true")).kv_cache_gib_per_chip
    bf16 = plan_deployment(config(**base, quantizeKvCache="false")).kv_cache_gib_per_chip
    assert int8 == pytest.approx(bf16 * 130 / 256)
    bigger = plan_deployment(config(**base, perDeviceBatchSize="16")).kv_cache_gib_per_chip
    assert bigger == pytest.approx(2 * int8)


def test_reserve_percent_sets_usable_hbm():
    plan = plan_deployment(config(hbmReservePercent="25"))
    assert plan.usable_gib_per_chip == pytest.approx(24.0)


def test_decode_step_lower_bound_reads_needed_bytes_at_hbm_bandwidth():
    plan = plan_deployment(config())
    assert plan.decode_step_ms_lower_bound == pytest.approx(plan.needed_gib_per_chip * GIB / 1640e9 * 1e3)


@pytest.mark.parametrize(
    "raw, keys, fragment",
    [
        (dict(model="llama3.1-405b", topology="4x8"), ("tensorParallelism", "topology"), "topology 4x8 has 32 chips"),
        (dict(tensorParallelism="-1", autoregressiveParallelism="-1"), ("autoregressiveParallelism", "tensorParallelism"), "only one axis may be -1"),
        (dict(tensorParallelism="3", autoregressiveParallelism="-1"), ("autoregressiveParallelism", "topology"), "not a multiple"),
        (dict(model="gemma-7b", topology="4x8"), ("tensorParallelism", "topology"), "does not divide the 16 attention heads"),
        (dict(maxPrefillLength="4096", maxTargetLength="2048"), ("maxTargetLength", "maxPrefillLength"), "must exceed"),
        (dict(model="llama3.1-8b", topology="1x1", perDeviceBatchSize="512"), ("perDeviceBatchSize", "maxTargetLength"), "smaller perDeviceBatchSize"),
    ],
)
def test_plans_that_cannot_shard_or_fit_are_refused(raw, keys, fragment):
    with pytest.raises(ConfigError) as refused:
        plan_deployment(config(**raw))
    assert set(keys) <= set(refused.value.keys), refused.value
    assert fragment in str(refused.value)


def test_summary_reports_hbm_needed_vs_available():
    summary = plan_deployment(config(**SEED_405B)).summary()
    assert summary["chipsPerSlice"] == 16 and summary["hostsPerSlice"] == 4 and summary["nodePools"] == ["v6e-16-serving"]
    hbm = summary["hbmGiBPerChip"]
    assert math.isclose(hbm["needed"], hbm["weights"] + hbm["kvCache"], abs_tol=0.011) and hbm["physical"] == 32
