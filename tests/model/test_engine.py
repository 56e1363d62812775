"""Model and engine on the tiny random-weight config: cache consistency, bucketing, slots, sampling,
int8 round trips, loaders, shardings of every array."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from serving.engine import model, parallelism, quant, sharding
from serving.engine.config import PRESETS
from serving.engine.jax_engine import JaxEngine, build_engines, prefill_buckets
from serving.engine.loaders import load_checkpoint, npz_loader
from serving.engine_api import GREEDY, SamplingParams
from serving.server.settings import DISAGGREGATED_SERVER, ServingSettings
from tests.model.model_helpers import generate

TINY = dict(model_name="tiny", max_prefill_predict_length=32, max_target_length=48, per_device_batch_size=4)
PROMPTS = [[5, 6, 7], list(range(10, 30)), [100] * 17]


def reference_greedy(cfg, params, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy decoding by re-running prefill over the whole sequence (no KV cache reuse)."""
    seq, prefill = list(prompt), jax.jit(model.prefill, static_argnums=0)
    for _ in range(n_tokens):
        padded = jnp.zeros((1, 64), jnp.int32).at[0, : len(seq)].set(jnp.array(seq))
        logits, _ = prefill(cfg, params, padded, len(seq))
        seq.append(int(jnp.argmax(logits[0])))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def tiny(one_device):
    engines = build_engines(ServingSettings(**TINY).engine_settings(), devices=one_device)
    return engines, engines.generate_engine.load_params()


def test_engine_greedy_matches_cacheless_reference(tiny):
    engines, params = tiny
    ours = generate(engines, PROMPTS, 8)
    for prompt, out in zip(PROMPTS, ours, strict=False):
        assert out == reference_greedy(engines.model_config, params, prompt, 8)


def test_warmup_by_role_compiles_what_a_request_then_runs():
    """Disaggregated: the prefill engine compiles only its prefill buckets (and the prefix cache's
    pool and its store per bucket); the generate engine, without a prefix of its own, still
    compiles insert for every bucket's transferred prefix, release and every decode bucket, so a
    request through the pipeline compiles nothing more (a prompt that starts with a cached prefix
    compiles its variant of prefill on first use: tests/model/test_prefix_cache.py)."""
    compiles = []

    def count_compiles(event, _secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    try:
        _run_warmup_by_role(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(count_compiles)


def _run_warmup_by_role(compiles: list) -> None:
    disaggregated = ServingSettings(**TINY, inference_server=DISAGGREGATED_SERVER).engine_settings()
    engines = build_engines(disaggregated, devices=jax.devices()[:2])
    pre, gen = engines.prefill_engine, engines.generate_engine
    pre_params, gen_params = pre.load_params(), gen.load_params()
    compiles.clear()
    pre.warmup(pre_params, generate=False)
    buckets = len(pre.prefill_buckets)
    assert len(compiles) == 2 * buckets + buckets + 1  # with and without a token mask; stores; the pool
    gen.warmup(gen_params, prefill=False)
    compiles.clear()
    words = engines.model_config.vocab_size // 32
    for n_tokens, masked in ((3, False), (20, False), (4, True), (21, True)):  # both buckets; no shared prefix
        masks = (np.full((1, words), -1, np.int32), np.full((4, words), -1, np.int32)) if masked else (None, None)
        prefix, _ = pre.prefill(
            params=pre_params, tokens=list(range(n_tokens, 0, -1)), sampling=GREEDY, token_mask=masks[0]
        )
        state = gen.insert(gen.transfer(prefix), gen.init_decode_state(), slot=n_tokens % 4)
        state, step = gen.generate(params=gen_params, decode_state=state, token_mask=masks[1])
        step.to_host()
        gen.release(state, slot=n_tokens % 4)
    assert compiles == []


@pytest.mark.parametrize(
    "formats",
    [{}, {"quantization": "int8", "quantize_kvcache": True}, {"weight_dtype": "bfloat16", "dtype": "bfloat16"}],
    ids=["float32", "int8", "bfloat16"],
)
def test_unscanned_layers_generate_what_scanned_layers_generate(one_device, formats):
    """scan_layers=false holds one weight tree per layer and unrolls the layer loop; it computes
    what the scanned loop computes, from the same weights, in every weight format."""
    tokens = {}
    for scan in (True, False):
        settings = ServingSettings(**TINY, scan_layers=scan, **formats).engine_settings()
        engines = build_engines(settings, devices=one_device)
        layers = engines.generate_engine.load_params()["layers"]
        n_layers = engines.model_config.n_layers
        assert isinstance(layers, dict if scan else tuple) and (scan or len(layers) == n_layers)
        tokens[scan] = generate(engines, PROMPTS, 8)
    assert tokens[False] == tokens[True]


def test_unscanned_layers_shard_each_layer_as_the_stack_shards_its_layer_axis():
    """On a mesh (TP=2 shards tiny's heads) each layer's weights take the stacked weight's
    sharding without its L axis, and the tokens are the single device's."""
    mesh = dict(ici_tensor_parallelism=2, ici_autoregressive_parallelism=2, ici_fsdp_parallelism=2)
    runs = {}
    for devices, extra in ((jax.devices()[:1], {}), (jax.devices(), mesh)):
        settings = ServingSettings(**TINY, scan_layers=False, **extra).engine_settings()
        engines = build_engines(settings, devices=devices)
        runs[len(devices)] = generate(engines, PROMPTS, 8)
    layers = engines.generate_engine.load_params()["layers"]
    assert all(layer["w_gate"].sharding.spec == P("tensor", "fsdp") for layer in layers)
    assert all(layer["wq"].sharding.spec == P("tensor", None, "fsdp") for layer in layers)
    assert runs[8] == runs[1]


def test_a_bfloat16_kv_cache_stores_its_values_bits():
    """XLA:CPU converts a bfloat16 array a loop slices into to float32 whole on every step; the
    cache holds the bits as uint16 instead, exactly."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)), jnp.bfloat16)
    stored = quant.store_kv(x)
    assert stored.dtype == quant.kv_storage_dtype(jnp.bfloat16) == jnp.uint16
    assert jnp.array_equal(quant.dequantize_kv(stored, None, jnp.bfloat16), x)
    assert quant.kv_storage_dtype(jnp.float32) == jnp.float32


def test_prefill_buckets_and_limits(tiny):
    engine = tiny[0].generate_engine
    assert prefill_buckets(32) == (16, 32) and prefill_buckets(100) == (16, 32, 64, 100)
    assert engine.bucket_for(1) == 16 and engine.bucket_for(17) == 32
    for bad in ([], list(range(33))):
        with pytest.raises(ValueError):
            engine.prefill(params=tiny[1], tokens=bad, sampling=GREEDY)


def test_generate_is_safe_past_cache_end_and_release_frees(tiny):
    engines, params = tiny
    engine = engines.generate_engine
    state = engine.init_decode_state()
    state, step = engine.generate(params=params, decode_state=state)  # all slots free
    assert step.to_host().shape == (4,)
    prefix, _ = engine.prefill(params=params, tokens=list(range(30)), sampling=GREEDY)
    state = engine.insert(prefix, state, slot=3)
    for _ in range(engine.cache_length + 5):
        state, step = engine.generate(params=params, decode_state=state)
    assert int(sharding.to_host(jax.device_put(state.arrays.lengths, engine._replicated))[3]) == engine.cache_length
    assert np.all((step.to_host() >= 0) & (step.to_host() < 256))
    state = engine.release(state, slot=3)
    lengths = np.asarray(jax.device_get(state.arrays.lengths))
    assert lengths[3] == 0 and not np.asarray(jax.device_get(state.arrays.active)).any()


def test_generate_runs_the_smallest_bucket_covering_the_highest_live_slot(tiny, monkeypatch):
    engines, params = tiny
    engine = engines.generate_engine
    assert engine.decode_buckets == (1, 2, 4)
    ran = []
    monkeypatch.setattr(engine, "_generate_fns", {
        key: lambda p, arrays, key=key, fn=fn: ran.append(key) or fn(p, arrays)
        for key, fn in engine._generate_fns.items()
    })  # fmt: skip
    prefix, _ = engine.prefill(params=params, tokens=[5, 6, 7], sampling=GREEDY)
    state = engine.init_decode_state()
    for op, slot in (("insert", 0), ("insert", 2), ("release", 2), ("insert", 1), ("release", 0), ("release", 1)):
        state = engine.insert(prefix, state, slot) if op == "insert" else engine.release(state, slot)
        state, step = engine.generate(params=params, decode_state=state)
        step.to_host()
    # (rows, with log probabilities, masked); no live slot: the one-row bucket
    assert [rows for rows, _, _ in ran] == [1, 4, 1, 2, 2, 1]
    assert not any(logprobs or masked for _, logprobs, masked in ran)


def test_sampling_seeded_reproducible_and_slot_independent(tiny):
    engines, _ = tiny
    hot = SamplingParams(temperature=1.5, seed=7)
    a = generate(engines, [PROMPTS[0]], 10, hot)[0]
    b = generate(engines, [PROMPTS[1], PROMPTS[0]], 10, hot)[1]
    assert a == b
    assert a != generate(engines, [PROMPTS[0]], 10, dataclasses.replace(hot, seed=8))[0]
    greedy = generate(engines, [PROMPTS[0]], 10)[0]
    assert generate(engines, [PROMPTS[0]], 10, SamplingParams(temperature=2.0, top_k=1, seed=1))[0] == greedy
    assert generate(engines, [PROMPTS[0]], 10, SamplingParams(temperature=2.0, top_p=1e-6, seed=1))[0] == greedy


def test_int8_weight_einsum_and_kv_roundtrip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 5)).astype(np.float32)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    q = quant.quantize(w, (0,))
    assert q.values.dtype == np.int8 and q.scale.shape == (1, 3, 5)
    exact = np.einsum("bd,dhe->bhe", x, w)
    np.testing.assert_allclose(quant.einsum("bd,dhe->bhe", jnp.asarray(x), q), exact, atol=0.05)
    kv = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    values, scale = quant.quantize_kv(kv)
    np.testing.assert_allclose(quant.dequantize_kv(values, scale, jnp.float32), kv, atol=0.02)


def test_bfloat16_einsum_accumulates_in_float32_and_returns_bfloat16():
    """XLA:CPU has no bfloat16-output GEMM (a generic loop, 25x slower): the product is a float32
    one rounded once to bfloat16 at the end."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    product = lambda x, w: quant.einsum("bd,fd->bf", x, w)  # noqa: E731
    dots = [e for e in jax.make_jaxpr(product)(x, w).eqns if e.primitive.name == "dot_general"]
    assert [e.params["preferred_element_type"] for e in dots] == [jnp.float32]
    y = product(x, w)
    assert y.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2**-7, atol=1e-6)  # one bfloat16 rounding


def test_quantized_checkpoint_roundtrip(tmp_path, one_device):
    """Offline int8 conversion to .npz, served with checkpoint_is_quantized=true, equals quantize-on-load."""
    settings = ServingSettings(**TINY, quantization="int8").engine_settings()
    cfg, params, _ = load_checkpoint(settings)
    assert isinstance(params["layers"]["wq"], quant.QuantArray)
    from tokenizers import Tokenizer, models

    from serving.engine.tokenizer import HFTokenizer

    tok = HFTokenizer(Tokenizer(models.BPE()), [2])
    path = str(tmp_path / "tiny-int8.npz")
    npz_loader.save_npz(path, cfg, params, tok)
    loaded = dataclasses.replace(settings, model_name="x", load_parameters_path=path, checkpoint_is_quantized=True)
    cfg2, params2, _ = load_checkpoint(loaded)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    with pytest.raises(ValueError, match="checkpoint_is_quantized"):
        load_checkpoint(dataclasses.replace(loaded, checkpoint_is_quantized=False))


def test_mesh_shape_errors_name_the_keys():
    s = ServingSettings(ici_tensor_parallelism=4, ici_autoregressive_parallelism=-1).engine_settings()
    assert sharding.mesh_shape(s, 8) == {"fsdp": 1, "autoregressive": 2, "tensor": 4}
    with pytest.raises(sharding.MeshError, match="ici_tensor_parallelism=3"):
        sharding.mesh_shape(ServingSettings(ici_tensor_parallelism=3).engine_settings(), 8)
    with pytest.raises(sharding.MeshError, match="only one axis"):
        sharding.mesh_shape(ServingSettings(ici_fsdp_parallelism=-1, ici_tensor_parallelism=-1).engine_settings(), 8)


@pytest.mark.parametrize("tp,heads_sharded", [(2, True), (4, False)])
def test_every_array_has_its_intended_sharding(tp, heads_sharded):
    """tiny has 2 kv heads: TP=2 shards attention heads and the cache's heads; TP=4 replicates the
    attention heads and splits the cache's slots over tensor instead."""
    settings = ServingSettings(
        **TINY, ici_tensor_parallelism=tp, ici_autoregressive_parallelism=-1, quantization="int8", quantize_kvcache=True
    ).engine_settings()
    engines = build_engines(settings, devices=jax.devices())
    engine = engines.generate_engine
    params, state = engine.load_params(), engine.init_decode_state()
    heads = "tensor" if heads_sharded else None
    batch = ("fsdp", "autoregressive")
    cache_batch = batch if heads_sharded else batch + ("tensor",)
    layers = params["layers"]
    expected = {
        "wq": (layers["wq"].values, P(None, heads, None, "fsdp")),
        "wq.scale": (layers["wq"].scale, P(None, heads, None, None)),
        "wo": (layers["wo"].values, P(None, "fsdp", heads, None)),
        "w_up": (layers["w_up"].values, P(None, "tensor", "fsdp")),
        "w_down": (layers["w_down"].values, P(None, "fsdp", "tensor")),
        "embed": (params["embed"].values, P("tensor", "fsdp")),
        "attn_norm": (layers["attn_norm"], P(None, None)),
        "cache.k": (state.arrays.cache.k, P(None, cache_batch, heads, None, None)),
        "cache.k_scale": (state.arrays.cache.k_scale, P(None, cache_batch, heads, None)),
        "lengths": (state.arrays.lengths, P(batch)),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, name
    # Every leaf carries exactly the sharding derived from its declaration.
    for arrays, wanted in ((params, engine.param_shardings), (state.arrays, engine.state_shardings)):
        for array, target in zip(jax.tree.leaves(arrays), jax.tree.leaves(wanted), strict=False):
            assert array.sharding == target
    prefix, first = engine.prefill(params=params, tokens=[1, 2, 3], sampling=GREEDY)
    assert first.array.sharding.is_fully_replicated
    assert prefix.arrays.cache.k.sharding.spec == P(None, None, heads, None, None)


def test_untied_preset_runs(one_device):
    untied = ServingSettings(**{**TINY, "model_name": "tiny-untied"}).engine_settings()
    engines = build_engines(untied, devices=one_device)
    assert "lm_head" in engines.generate_engine.load_params()
    assert generate(engines, [PROMPTS[0]], 3)[0] == reference_greedy(
        engines.model_config, engines.generate_engine.load_params(), PROMPTS[0], 3
    )


@pytest.mark.parametrize(
    "model_name,mesh",
    [
        ("smollm2-135m", dict(ici_tensor_parallelism=8)),  # 3 kv heads: slots over all 8 devices
        ("smollm2-135m", dict(ici_tensor_parallelism=4, ici_autoregressive_parallelism=2)),
        ("smollm2-135m", dict(ici_fsdp_parallelism=2, ici_tensor_parallelism=4)),
        ("tiny", dict(ici_tensor_parallelism=2, ici_autoregressive_parallelism=4)),  # 2 kv heads over TP=2
    ],
)
def test_kv_cache_bytes_per_device_are_what_kv_cache_split_says(model_name, mesh):
    """The memory report's per-device KV bytes equal the total over parallelism.kv_cache_split's
    ways, the rule the stack's planner sizes the cache with. No weights are placed."""
    cfg = PRESETS[model_name]
    settings = ServingSettings(
        max_prefill_predict_length=16, max_target_length=2048, per_device_batch_size=4, **mesh
    ).engine_settings()
    engine = JaxEngine(settings, cfg, None, jax.devices())
    split = parallelism.kv_cache_split(cfg.n_kv_heads, dict(engine.mesh.shape))
    report = engine.memory()
    assert report.kv_cache_bytes_per_device * split.batch * split.kv_heads * split.seq == report.kv_cache_bytes


def test_tp8_holds_an_eighth_of_the_single_device_kv_cache():
    """SmolLM2 (3 kv heads) at TP=8: the cache splits its 32 slots over the 8 devices instead of
    replicating all of them on each (the bound: at most a quarter)."""
    cfg = PRESETS["smollm2-135m"]
    common = dict(max_prefill_predict_length=16, max_target_length=2048)
    single_settings = ServingSettings(**common, per_device_batch_size=32).engine_settings()
    tp8_settings = ServingSettings(**common, per_device_batch_size=4, ici_tensor_parallelism=8).engine_settings()
    single = JaxEngine(single_settings, cfg, None, jax.devices()[:1]).memory()
    tp8 = JaxEngine(tp8_settings, cfg, None, jax.devices())
    assert tp8.max_concurrent_decodes == 32
    assert tp8.memory().kv_cache_bytes_per_device * 8 == single.kv_cache_bytes_per_device
