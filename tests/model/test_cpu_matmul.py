"""The AVX-512 matmul kernels (serving/engine/cpu_matmul): exact int8 products and float32-accumulated
bfloat16 ones at every tail of rows, channels and depth; a row's result independent of the rows
beside it; quant.einsum and the engine routing to them only where they apply."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine import cpu_matmul, model, quant
from serving.engine.config import PRESETS
from serving.engine.jax_engine import build_engines, use_cpu_kernels
from serving.engine_api import GREEDY, SamplingParams
from serving.server.settings import ServingSettings
from tests.model.model_helpers import generate, generate_with_logprobs

needs_kernels = pytest.mark.skipif(
    cpu_matmul.unavailable() is not None, reason=f"the kernels cannot run here: {cpu_matmul.unavailable()}"
)

# rows (tiles of 4 and 1..3 left), depth (vectors of 64 int8 / 32 bfloat16 and masked tails),
# channels (tiles of 6, single channels left, more than one task's 48)
SHAPES = [(1, 1, 1), (3, 63, 7), (4, 64, 6), (5, 100, 13), (70, 576, 97), (2, 2048, 50)]


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64).T


@needs_kernels
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_products_are_exact(m, k, n):
    rng = np.random.default_rng(m * k * n)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)  # -128 too: the x + 128 flip must hold at both ends
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    y = jax.jit(cpu_matmul.matmul)(x, w)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), _reference(x, w).astype(np.int64))


@needs_kernels
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bfloat16_products_accumulate_in_float32(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    y = jax.jit(cpu_matmul.matmul)(x, w)
    assert y.dtype == jnp.float32
    exact = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(y), exact, rtol=0, atol=1e-6 * k)


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype):
    """Each row's sums run in one order whatever M is: a request's tokens never depend on how many
    slots decode beside it."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-100, 100, (37, 300)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.integers(-100, 100, (29, 300)), jnp.float32).astype(dtype)
    together = np.asarray(cpu_matmul.matmul(x, w))
    for i in (0, 3, 36):
        np.testing.assert_array_equal(np.asarray(cpu_matmul.matmul(x[i : i + 1], w))[0], together[i])


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bfloat16])
def test_only_the_leading_rows_asked_for_are_multiplied_and_the_rest_are_zeros(dtype):
    """A prompt padded to its bucket costs its own length: `rows` (traced) real rows."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(-100, 100, (16, 200)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.integers(-100, 100, (30, 200)), jnp.float32).astype(dtype)
    full = np.asarray(cpu_matmul.matmul(x, w))
    by_rows = jax.jit(cpu_matmul.matmul)
    for rows in (0, 5, 16, 40):
        y = np.asarray(by_rows(x, w, jnp.int32(rows)))
        kept = min(rows, 16)
        np.testing.assert_array_equal(y[:kept], full[:kept])
        assert not y[kept:].any()


@needs_kernels
def test_matmul_names_the_operands_it_takes():
    with pytest.raises(ValueError, match=r"both int8 or bfloat16; got float32\[2, 8\]"):
        cpu_matmul.matmul(jnp.zeros((2, 8), jnp.float32), jnp.zeros((3, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
        cpu_matmul.matmul(jnp.zeros((2, 8), jnp.int8), jnp.zeros((3, 9), jnp.int8))


@needs_kernels
def test_einsum_on_the_kernels_equals_xla_int8_to_the_bit_and_bfloat16_closely():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 96)), jnp.float32)
    q = quant.quantize(w, (1,))
    on = quant.einsum("btd,fd->btf", x, q, cpu_kernels=True)
    off = quant.einsum("btd,fd->btf", x, q)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(off))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    on = quant.einsum("btd,fd->btf", xb, wb, out_dtype=jnp.float32, cpu_kernels=True)
    off = quant.einsum("btd,fd->btf", xb, wb, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=0, atol=1e-4)


def test_einsum_keeps_xla_for_products_the_kernels_do_not_take():
    """float32 activations and any product other than x's last axis by a 2-D weight [N, K] stay
    with XLA: no custom call in their program."""
    x32 = jnp.ones((2, 8), jnp.float32)

    def lowered(eq, x, w):
        return jax.jit(lambda x, w: quant.einsum(eq, x, w, cpu_kernels=True)).lower(x, w).as_text()

    assert "custom_call" not in lowered("bd,fd->bf", x32, jnp.ones((4, 8), jnp.float32))
    assert "custom_call" not in lowered("bd,dhe->bhe", x32.astype(jnp.bfloat16), jnp.ones((8, 2, 3), jnp.bfloat16))
    if cpu_matmul.unavailable() is None:
        assert "jst_matmul_bf16" in lowered("bd,fd->bf", x32.astype(jnp.bfloat16), jnp.ones((4, 8), jnp.bfloat16))


def test_the_engine_uses_the_kernels_on_one_cpu_device_when_asked_and_able():
    settings = ServingSettings(model_name="tiny").engine_settings()
    assert not use_cpu_kernels(dataclasses.replace(settings, cpu_kernels=False), jax.devices()[:1])
    assert not use_cpu_kernels(settings, jax.devices()[:2])  # a mesh: XLA shards its own dots
    assert use_cpu_kernels(settings, jax.devices()[:1]) == (cpu_matmul.unavailable() is None)


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_library_path", lambda: tmp_path / "_cpu_matmul-test.so")
    monkeypatch.setattr(cpu_matmul, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C...? compiler"):
        cpu_matmul.build()


@needs_kernels
def test_int8_engines_generate_the_same_tokens_with_and_without_the_kernels(one_device):
    tiny = dict(model_name="tiny", max_prefill_predict_length=32, max_target_length=48, per_device_batch_size=4)
    prompts = [[5, 6, 7], list(range(10, 30)), [100] * 17]
    tokens = {}
    for kernels in (True, False):
        settings = ServingSettings(**tiny, quantization="int8", quantize_kvcache=True, cpu_kernels=kernels)
        engines = build_engines(settings.engine_settings(), devices=one_device)
        assert engines.generate_engine.cfg.cpu_kernels == kernels
        assert ("AVX-512" in engines.memory_report()) == kernels
        tokens[kernels] = generate(engines, prompts, 8)
    assert tokens[True] == tokens[False]


@needs_kernels
def test_bfloat16_logits_on_the_kernels_stay_within_rounding_of_xla():
    cfg = dataclasses.replace(PRESETS["tiny"], dtype="bfloat16", weight_dtype="bfloat16")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), model.init_params(cfg, seed=0))
    tokens = jnp.asarray([list(range(3, 19))], jnp.int32)
    logits = {
        kernels: jax.jit(model.prefill, static_argnums=0)(
            dataclasses.replace(cfg, cpu_kernels=kernels), params, tokens, 16
        )[0]
        for kernels in (True, False)
    }
    assert jnp.argmax(logits[True]) == jnp.argmax(logits[False])
    np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), rtol=0, atol=0.05)


@needs_kernels
@pytest.mark.parametrize(
    "formats",
    [{"quantization": "int8", "quantize_kvcache": True}, {"weight_dtype": "bfloat16", "dtype": "bfloat16"}],
    ids=["int8", "bfloat16"],
)
def test_prompts_prefilled_together_generate_what_each_prefilled_alone_generates(one_device, formats):
    """prefill_batch runs the short prompts of one bucket in one call (their rows gathered into
    each product, the weights read once); each prompt's tokens and log probabilities are those of
    its own prefill, to the bit, and a prompt it cannot take (too long) gets its own error without
    failing the others."""
    tiny = dict(model_name="tiny", max_prefill_predict_length=64, max_target_length=96, per_device_batch_size=4)
    settings = ServingSettings(**tiny, **formats, enable_prefix_caching=False)  # no hits on the second run
    engines = build_engines(settings.engine_settings(), devices=one_device)
    engine = engines.prefill_engine
    assert engine.prefill_batch_size > 1
    prompts = [[5, 6, 7], list(range(10, 40)), [100] * 17, [9]]  # buckets 16, 32, 32, 16: two calls
    sampling = [SamplingParams(logprobs=2), GREEDY, SamplingParams(temperature=0.8, seed=3), GREEDY]
    alone = generate_with_logprobs(engines, prompts, 6, sampling)
    assert generate_with_logprobs(engines, prompts, 6, sampling, together=True) == alone
    results = engine.prefill_batch(params=engine.load_params(), prompts=[([1] * 65, GREEDY), ([1, 2], GREEDY)])
    assert isinstance(results[0], ValueError) and "65 tokens" in str(results[0])
    assert int(results[1][1].to_host()[0]) == int(
        engine.prefill(params=engine.load_params(), tokens=[1, 2], sampling=GREEDY)[1].to_host()[0]
    )
