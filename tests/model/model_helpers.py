"""Helpers shared by the model/engine tests (imported by name; fixtures live in conftest.py)."""

from __future__ import annotations

from serving.engine.jax_engine import EngineSet
from serving.engine_api import GREEDY, SamplingParams

# Short prompts in ChatML and plain text; the sharding, int8 and disaggregation tests share them.
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName a fruit that is yellow.<|im_end|>\n<|im_start|>assistant\n",
]


def generate(engines: EngineSet, prompts: list[list[int]], n_tokens: int, sampling: SamplingParams = GREEDY):
    """Run prompts side by side in decode slots; returns n_tokens generated ids per prompt."""
    prefill, gen = engines.prefill_engine, engines.generate_engine
    prefill_params, gen_params = prefill.load_params(), gen.load_params()
    state = gen.init_decode_state()
    outputs = []
    for slot, tokens in enumerate(prompts):
        prefix, first = prefill.prefill(params=prefill_params, tokens=tokens, sampling=sampling)
        state = gen.insert(gen.transfer(prefix), state, slot=slot)
        outputs.append([int(first.to_host()[0])])
    for _ in range(n_tokens - 1):
        state, step = gen.generate(params=gen_params, decode_state=state)
        host = step.to_host()
        for slot, out in enumerate(outputs):
            out.append(int(host[slot]))
    return outputs
