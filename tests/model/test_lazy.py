"""Lazy checkpoint tensors: read only on demand, stacked layer by layer, int8-quantized slab by slab
with exactly the result of quantizing the whole."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine import quant
from serving.engine.loaders import lazy


def _counting(values: np.ndarray, reads: list):
    def view():
        reads.append(1)
        return values

    return lazy.from_view(view, values.shape, values.dtype)


def test_tensors_are_read_only_when_asked_for_and_stacked_per_layer():
    rng = np.random.default_rng(0)
    layers, reads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)], []
    stacked = lazy.stack([_counting(layer, reads) for layer in layers])
    assert stacked.shape == (2, 3, 4) and reads == []
    np.testing.assert_array_equal(np.asarray(stacked.cast(np.float16)), np.stack(layers).astype(np.float16))
    assert len(reads) == 2
    with pytest.raises(ValueError, match=r"layer 1 has shape \(4,\), layer 0 has \(3, 4\)"):
        lazy.stack([_counting(layers[0], reads), _counting(np.zeros(4, np.float32), reads)])


@pytest.mark.parametrize("contract", [(2,), (1, 2), (0,)])
def test_int8_in_slabs_equals_quantizing_the_whole(monkeypatch, contract):
    monkeypatch.setattr(lazy, "QUANTIZE_CHUNK_ELEMENTS", 24)  # two of the five leading rows per slab
    values = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
    reads = []
    result = lazy.quantized(_counting(values, reads), contract)
    whole = quant.quantize(values, contract)
    np.testing.assert_array_equal(np.asarray(result.values), whole.values)
    np.testing.assert_array_equal(np.asarray(result.scale), whole.scale)
    assert len(reads) == 1  # values and scale come from one read


def test_a_read_tensor_becomes_a_cpu_device_array_without_a_copy():
    """Read into a page-aligned buffer of its own, which JAX's CPU backend takes as the device array
    (a plain NumPy allocation would be copied once more at placement)."""
    import jax

    values = np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096)
    host = lazy.from_view(lambda: values, values.shape, np.float32).read()
    assert host.ctypes.data % 4096 == 0
    placed = jax.device_put(host, jax.devices("cpu")[0])
    assert np.asarray(placed).ctypes.data == host.ctypes.data
    np.testing.assert_array_equal(np.asarray(placed), values)
    assert lazy.host_array((0, 5), np.int8).shape == (0, 5)
