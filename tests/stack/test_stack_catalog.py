"""The TPU v6e catalog rows and the model presets."""

import dataclasses

import pytest

from components.core import models, tpu

# topology -> (chips, default machine type, hosts): the GKE v6e facts the stack's contract fixes.
EXPECTED = {
    "1x1": (1, "ct6e-standard-1t", 1),
    "2x2": (4, "ct6e-standard-4t", 1),
    "2x4": (8, "ct6e-standard-4t", 2),
    "4x4": (16, "ct6e-standard-4t", 4),
    "4x8": (32, "ct6e-standard-4t", 8),
    "8x8": (64, "ct6e-standard-4t", 16),
    "8x16": (128, "ct6e-standard-4t", 32),
    "16x16": (256, "ct6e-standard-4t", 64),
}


@pytest.mark.parametrize("topology", EXPECTED)
def test_every_v6e_shape_has_its_gke_facts(topology):
    row = tpu.slice_for(topology)
    chips, machine_type, hosts = EXPECTED[topology]
    assert (row.chips, row.machine_type, row.hosts) == (chips, machine_type, hosts)
    assert row.multi_host == (hosts > 1)
    assert row.name == f"v6e-{chips}"
    assert row.node_selector == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": topology,
    }
    assert row.tpu_request == str(row.chips_per_host)
    assert row.lws_size(1) == hosts + 1
    assert row.pathways_instance_type == f"tpuv6e:{topology}"
    assert (row.hbm_gib_per_chip, row.hbm_bandwidth_gbps) == (32, 1640)


def test_multi_host_slices_are_4_chip_hosts():
    for row in tpu.SLICES:
        if row.multi_host:
            assert row.machine_type == "ct6e-standard-4t" and row.hosts == row.chips // 4


def test_2x4_runs_as_two_hosts_by_default_or_one_8_chip_host():
    assert tpu.machine_types_for("2x4") == ("ct6e-standard-4t", "ct6e-standard-8t")
    single = tpu.slice_for("2x4", "ct6e-standard-8t")
    assert (single.hosts, single.multi_host, single.tpu_request, single.lws_size(1)) == (1, False, "8", 2)
    assert tpu.slice_for("2x4").lws_size(2) == 5  # the disaggregated reference deployment's LWS size


def test_every_topology_has_exactly_one_default_row():
    for topology in tpu.TOPOLOGIES:
        assert sum(row.default for row in tpu.SLICES if row.topology == topology) == 1


def test_non_v6e_shapes_are_not_in_the_catalog():
    for topology in ("3x3", "2x8", "4x2", "v6e-16"):
        with pytest.raises(KeyError):
            tpu.slice_for(topology)
    with pytest.raises(KeyError):
        tpu.slice_for("4x4", "ct6e-standard-8t")


def test_inconsistent_rows_are_rejected():
    with pytest.raises(ValueError):
        tpu.TpuSlice(topology="3x3", chips=9, machine_type="ct6e-standard-4t")
    with pytest.raises(ValueError):
        tpu.TpuSlice(topology="2x4", chips=16, machine_type="ct6e-standard-4t")


def test_rows_are_frozen_and_keyword_built():
    row = tpu.slice_for("4x4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.chips = 8
    with pytest.raises(TypeError):
        tpu.TpuSlice("4x4", 16, "ct6e-standard-4t")


REQUIRED_PRESETS = ("llama2-7b", "llama2-70b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b")


def test_required_presets_and_a_gemma_exist():
    assert set(REQUIRED_PRESETS) <= set(models.PRESETS)
    assert any(name.startswith("gemma") for name in models.PRESETS)


@pytest.mark.parametrize("name", models.PRESETS)
def test_preset_architecture_is_consistent(name):
    preset = models.PRESETS[name]
    assert preset.heads % preset.kv_heads == 0  # grouped-query attention
    if not name.startswith("gemma"):  # gemma-7b: 16 heads x 256 != 3072 by design
        assert preset.heads * preset.head_dim == preset.d_model
    # Embedding + attention alone must stay below the parameter count.
    attention = preset.layers * preset.d_model * preset.head_dim * (2 * preset.heads + 2 * preset.kv_heads)
    assert preset.vocab * preset.d_model + attention < preset.params


@pytest.mark.parametrize("name", models.PRESETS)
def test_preset_recipe_is_well_formed(name):
    preset = models.PRESETS[name]
    assert len(set(preset.flag_order)) == len(preset.flag_order)
    assert set(preset.fixed_flags) <= set(preset.flag_order)
    assert preset.maxtext_config.endswith(".yml")
