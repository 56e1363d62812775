"""Helpers shared by the model/engine tests (imported as tests.model.model_helpers; fixtures live in
conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.engine.jax_engine import EngineSet
from serving.engine_api import GREEDY, SamplingParams

# Short prompts in ChatML and plain text; the sharding, int8 and disaggregation tests share them.
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName a fruit that is yellow.<|im_end|>\n<|im_start|>assistant\n",
]


def generate(
    engines: EngineSet,
    prompts: list[list[int]],
    n_tokens: int,
    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    together: bool = False,
) -> list[list[int]]:
    """Run prompts side by side in decode slots (with one sampling for all, or one per prompt),
    prefilled one by one or (`together`) in one `prefill_batch`; returns n_tokens generated ids per
    prompt."""
    return generate_with_logprobs(engines, prompts, n_tokens, sampling, together)[0]


def generate_with_logprobs(
    engines: EngineSet,
    prompts: list[list[int]],
    n_tokens: int,
    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    together: bool = False,
) -> tuple[list[list[int]], list[list[tuple[float, list[int], list[float]]]]]:
    """`generate`, and per prompt the (logprob, top ids, top logprobs) of each generated token
    where the engine returned them (for prompts that asked for log probabilities)."""
    prefill, gen = engines.prefill_engine, engines.generate_engine
    prefill_params, gen_params = prefill.load_params(), gen.load_params()
    state = gen.init_decode_state()
    per_prompt = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    outputs, logprobs = [[] for _ in prompts], [[] for _ in prompts]

    def record(slot: int, tokens, step_logprobs, row: int) -> None:
        outputs[slot].append(int(tokens[row]))
        if step_logprobs is not None and per_prompt[slot].logprobs is not None:
            lp = step_logprobs
            logprobs[slot].append((float(lp.logprob[row]), lp.top_ids[row].tolist(), lp.top_logprobs[row].tolist()))

    if together:
        prefilled = prefill.prefill_batch(params=prefill_params, prompts=list(zip(prompts, per_prompt, strict=False)))
    else:
        prefilled = [
            prefill.prefill(params=prefill_params, tokens=t, sampling=p)
            for t, p in zip(prompts, per_prompt, strict=False)
        ]
    for slot, (prefix, first) in enumerate(prefilled):
        state = gen.insert(gen.transfer(prefix), state, slot=slot)
        record(slot, first.to_host(), first.logprobs_to_host(), 0)
    for _ in range(n_tokens - 1):
        state, step = gen.generate(params=gen_params, decode_state=state)
        host, step_logprobs = step.to_host(), step.logprobs_to_host()
        for slot in range(len(prompts)):
            record(slot, host, step_logprobs, slot)
    return outputs, logprobs


def penalised_reference(logits: np.ndarray, s: SamplingParams, prompt: list[int], out: list[int]) -> np.ndarray:
    """OpenAI's presence/frequency penalties over the output, vLLM's repetition penalty over prompt
    and output, logit_bias added first (vLLM's order)."""
    x = logits.copy()
    for token, value in s.logit_bias:
        x[token] += value
    counts = np.bincount(np.asarray(out, np.int64), minlength=len(x)).astype(np.float32)
    seen = (counts > 0) | (np.bincount(prompt, minlength=len(x)) > 0)
    x = np.where(seen, np.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty), x)
    return x - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)


def reference_greedy(reference_logits, s: SamplingParams, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` with `s`'s bias and penalties, where reference_logits(sequence)
    gives the next-token logits [V] of a reference implementation."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(penalised_reference(reference_logits(prompt + out), s, prompt, out))))
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64."""
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
