"""The prefix cache: its block index (pure Python), and the engine with it on against the engine
with it off, token for token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from serving.engine.jax_engine import build_engines
from serving.engine.prefix_cache import PrefixBlockIndex
from serving.engine_api import GREEDY, SamplingParams
from serving.server.settings import DISAGGREGATED_SERVER, ServingSettings
from tests.model.model_helpers import PROMPTS, generate

BLOCK = 4


# ---- the index ---------------------------------------------------------------------------------


def test_a_prompt_matches_the_cached_full_blocks_of_its_longest_shared_prefix():
    index = PrefixBlockIndex(capacity_blocks=8, block_size=BLOCK)
    first = list(range(10))  # blocks [0..3], [4..7]; 8, 9 are not a full block
    assert index.match(first).n_blocks == 0
    assert [i for i, _ in index.add(index.match(first))] == [0, 1]
    assert index.match(first[:8] + [99, 98]).n_blocks == 2
    assert index.match(first[:6] + [99] * 6).n_blocks == 1
    assert index.match([99] + first[1:]).n_blocks == 0  # a block matches only with all before it


def test_a_whole_cached_prompt_still_leaves_its_last_token_to_prefill():
    index = PrefixBlockIndex(capacity_blocks=8, block_size=BLOCK)
    prompt = list(range(8))
    index.add(index.match(prompt))
    assert index.match(prompt).n_blocks == 1
    assert index.match(prompt + [8]).n_blocks == 2


def test_eviction_takes_the_least_recently_used_chain_tails_first():
    index = PrefixBlockIndex(capacity_blocks=4, block_size=BLOCK)
    old, new = list(range(100, 112)), list(range(200, 208))
    index.add(index.match(old))  # 3 blocks
    index.add(index.match(new))  # 2 blocks: one of old's must go, its tail
    assert len(index) == 4
    assert index.match(old + [0]).n_blocks == 2
    assert index.match(new + [0]).n_blocks == 2


def test_a_prompt_longer_than_the_pool_keeps_its_head_and_never_evicts_its_own_blocks():
    index = PrefixBlockIndex(capacity_blocks=2, block_size=BLOCK)
    prompt = list(range(20))
    stores = index.add(index.match(prompt))
    assert [i for i, _ in stores] == [0, 1]
    assert index.match(prompt).n_blocks == 2
    assert index.add(index.match(prompt)) == []


def test_digests_name_the_whole_prefix_and_are_deterministic():
    a, b = PrefixBlockIndex(4, BLOCK), PrefixBlockIndex(4, BLOCK)
    assert a.digests(range(9)) == b.digests(list(range(9)))
    assert len(a.digests(range(9))) == 2
    assert a.digests([1, 2, 3, 4, 5, 6, 7, 8])[1] != a.digests([0, 2, 3, 4, 5, 6, 7, 8])[1]


def test_an_index_without_blocks_is_refused():
    with pytest.raises(ValueError, match="needs blocks"):
        PrefixBlockIndex(0)


# ---- the engine --------------------------------------------------------------------------------

TINY = dict(model_name="tiny", max_prefill_predict_length=64, max_target_length=96, per_device_batch_size=8)


@pytest.fixture(scope="module")
def tiny_pair(one_device):
    """The tiny model's engines with the prefix cache on (a small pool: 6 blocks of 16) and off."""
    on = build_engines(ServingSettings(**TINY, prefix_cache_tokens=96).engine_settings(), one_device)
    off = build_engines(ServingSettings(**TINY, enable_prefix_caching=False).engine_settings(), one_device)
    return on, off


def _sharing_prompts(rng: np.random.Generator, shared: int, tails: list[int]) -> list[list[int]]:
    head = rng.integers(1, 250, shared).tolist()
    return [head + rng.integers(1, 250, n).tolist() for n in tails]


def test_greedy_tokens_with_the_cache_equal_those_without(tiny_pair):
    on, off = tiny_pair
    rng = np.random.default_rng(0)
    prompts = _sharing_prompts(rng, 37, [2, 20, 1]) + _sharing_prompts(rng, 16, [0, 3])
    prompts.append(list(prompts[0]))  # the same prompt again: all but its last token cached
    assert generate(on, prompts, 8) == generate(off, prompts, 8)
    hits = [
        on.prefill_engine.prefill(params=on.prefill_engine.load_params(), tokens=p, sampling=GREEDY)[1] for p in prompts
    ]
    assert [h.cached_tokens for h in hits] == [32, 48, 32, 0, 16, 32]  # whole blocks, never the last token


def test_the_cache_stays_exact_while_its_small_pool_evicts(tiny_pair):
    on, off = tiny_pair
    rng = np.random.default_rng(1)
    prompts = [p for _ in range(4) for p in _sharing_prompts(rng, 40, [5, 9])]  # 12 blocks through a pool of 6
    assert generate(on, prompts, 4) == generate(off, prompts, 4)
    assert len(on.prefill_engine.prefix_index) == 6


def test_greedy_tokens_are_the_same_with_the_cpu_defaults_int8_weights_and_kv_cache(one_device):
    int8 = dict(TINY, quantization="int8", quantize_kvcache=True, quantize_attention_output=False)
    on = build_engines(ServingSettings(**int8).engine_settings(), one_device)
    off = build_engines(ServingSettings(**int8, enable_prefix_caching=False).engine_settings(), one_device)
    prompts = _sharing_prompts(np.random.default_rng(4), 35, [3, 12, 7]) * 2
    assert generate(on, prompts, 8) == generate(off, prompts, 8)


def test_sampled_and_penalised_requests_are_the_same_from_a_cached_prefix(tiny_pair):
    on, off = tiny_pair
    prompts = _sharing_prompts(np.random.default_rng(2), 33, [4, 4])
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=7, repetition_penalty=1.3, presence_penalty=0.5)
    assert generate(on, prompts, 6, sampling) == generate(off, prompts, 6, sampling)


def test_prompt_log_probabilities_are_computed_over_the_whole_prompt(tiny_pair):
    on, off = tiny_pair
    prompt = _sharing_prompts(np.random.default_rng(3), 40, [3])[0]
    wants = SamplingParams(logprobs=1, prompt_logprobs=True)
    results = []
    for engines in (on, off):
        engine = engines.prefill_engine
        engine.prefill(params=engine.load_params(), tokens=prompt, sampling=GREEDY)  # cached on `on`
        _, step = engine.prefill(params=engine.load_params(), tokens=prompt, sampling=wants)
        assert step.cached_tokens == 0
        results.append(step.prompt_logprobs_to_host().logprob)
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def test_smollm2_chat_prompts_sharing_a_system_prompt_decode_the_same(smollm_engines, one_device):
    on = smollm_engines(one_device, max_prefill_predict_length=128, max_target_length=160, per_device_batch_size=4)
    off = smollm_engines(
        one_device,
        max_prefill_predict_length=128,
        max_target_length=160,
        per_device_batch_size=4,
        enable_prefix_caching=False,
    )
    system = "<|im_start|>system\nYou are a careful assistant. Answer in one short sentence, plainly.<|im_end|>\n"
    prompts = [on.tokenizer.encode(system + p) for p in PROMPTS if p.startswith("<|im_start|>")] * 2
    assert generate(on, prompts, 10) == generate(off, prompts, 10)
    assert len(on.prefill_engine.prefix_index) > 0


def test_the_prefix_cache_holds_its_size_in_token_positions_and_the_memory_report_says_so(tiny_pair):
    on, off = tiny_pair
    engine, memory = on.prefill_engine, on.prefill_engine.memory()
    per_position = memory.kv_cache_bytes // (engine.max_concurrent_decodes * engine.cache_length)
    assert memory.prefix_cache_bytes == 96 * per_position
    assert "prefix cache" in on.memory_report() and "prefix cache" not in off.memory_report()
    assert off.prefill_engine.memory().prefix_cache_bytes == 0


def test_disaggregated_the_prefill_engine_alone_holds_the_prefix_cache():
    settings = ServingSettings(**TINY, inference_server=DISAGGREGATED_SERVER).engine_settings()
    engines = build_engines(settings, jax.devices()[:2])
    assert engines.prefill_engine.prefix_caching and not engines.generate_engine.prefix_caching
    assert engines.memory_report().count("prefix cache") == 1
