"""Orchestrator tests against the echo engine (tests/server/fake_engine.py): exact outputs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.engine_api import SamplingParams
from serving.server.orchestrator import IncrementalDetokenizer, Orchestrator
from serving.server.requests import GenerateRequest, NotReady, Overloaded, RequestError
from tests.server.fake_engine import EOS, ByteTokenizer, EchoEngine, echo_orchestrator, echo_tokens
from tests.server.server_process import metric_sample, wait_until

TIMEOUT_S = 20


@pytest.fixture
def orch():
    o = echo_orchestrator()
    yield o
    o.stop()


def run(orch: Orchestrator, prompt, max_tokens: int, **sampling):
    req = GenerateRequest(prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(**sampling))
    return orch.submit(req).collect(timeout_s=TIMEOUT_S)


def metric_value(orch: Orchestrator, name: str) -> float:
    return metric_sample(orch.metrics.exposition().decode(), name)


def test_greedy_echo_until_max_tokens(orch):
    result = run(orch, "abc", 7)
    assert result.text == "abcabca"
    assert result.token_ids == tuple(b"abcabca")
    assert (result.finish.reason, result.finish.prompt_tokens, result.finish.completion_tokens) == (
        "length",
        3,
        7,
    )


def test_stops_at_eos_without_emitting_it(orch):
    result = run(orch, "hi<eos>zz", 10)
    assert (result.text, result.finish.reason, result.finish.completion_tokens) == ("hi", "stop", 2)


def test_ignore_eos_generates_through_eos_up_to_max_tokens(orch):
    request = GenerateRequest(prompt="hi<eos>", max_tokens=5, ignore_eos=True)
    result = orch.submit(request).collect(timeout_s=TIMEOUT_S)
    assert result.token_ids == (*b"hi", EOS, *b"hi")
    assert (result.finish.reason, result.finish.completion_tokens) == ("length", 5)


def test_eos_or_max_tokens_at_prefill_finish_without_holding_a_slot(orch):
    assert run(orch, "<eos>ab", 5).text == ""
    assert run(orch, "xyz", 1).text == "x"
    wait_until(lambda: orch.slots_used == 0)
    assert run(orch, "ok", 3).text == "oko"  # the slots are all usable afterwards


def test_cache_full_ends_request():
    orch = echo_orchestrator(EchoEngine(max_prefill_length=16, max_target_length=32))
    try:
        result = run(orch, "0123456789", 30)
        # prompt + generated must stay below max_target_length: 32 - 1 - 10 = 21 tokens
        assert result.finish.completion_tokens == 21
        assert result.finish.reason == "length"
        assert result.text == ("0123456789" * 3)[:21]
    finally:
        orch.stop()


def test_more_requests_than_slots_are_batched_continuously():
    engine = EchoEngine(slots=2)
    orch = echo_orchestrator(engine)
    try:
        prompts = [f"p{i}-" for i in range(7)]
        lengths = [3 + 2 * i for i in range(7)]
        streams = [orch.submit(GenerateRequest(p, n)) for p, n in zip(prompts, lengths, strict=False)]
        results = [s.collect(timeout_s=TIMEOUT_S) for s in streams]
        for prompt, n, result in zip(prompts, lengths, results, strict=False):
            assert result.token_ids == tuple(echo_tokens(list(prompt.encode()), n))
        kinds = [c[0] for c in engine.calls]
        first_generate = kinds.index("generate")
        assert "insert" in kinds[first_generate:], "no request joined while others were decoding"
        assert {c[1] for c in engine.calls if c[0] == "insert"} == {0, 1}
        wait_until(lambda: orch.slots_used == 0)
        inserts = [c for c in engine.calls if c[0] == "insert"]
        releases = [c for c in engine.calls if c[0] == "release"]
        assert len(inserts) == len(releases) == 7  # every finished slot is released in the engine
    finally:
        orch.stop()


def test_prompts_waiting_for_a_free_slot_are_prefilled_before_the_next_decode_step():
    """A burst of prompts joins a running request: no decode step runs between their prefills,
    so every one of them joins the next step instead of waiting behind steps for a single row."""
    engine = EchoEngine(slots=8, max_target_length=64, step_delay_s=0.005)
    orch = echo_orchestrator(engine)
    try:
        running = orch.submit(GenerateRequest("a", 60))
        wait_until(lambda: engine.calls.count(("generate",)) >= 2)
        burst = [orch.submit(GenerateRequest(f"p{i}", 4)) for i in range(6)]
        for stream in burst:
            stream.collect(timeout_s=TIMEOUT_S)
        running.cancel()
        calls = list(engine.calls)
        kinds = [c[0] for c in calls]
        start = kinds.index("prefill", 1)  # the burst's first prefill
        last_insert = max(i for i, c in enumerate(calls) if c == ("insert", 6))
        assert kinds[start:last_insert].count("prefill") == 6
        assert "generate" not in kinds[start:last_insert], kinds[start:last_insert]
    finally:
        orch.stop()


class BatchingEchoEngine(EchoEngine):
    """Takes 4 prompts a prefill_batch call; its prefills wait for `gate`; "bad" prompts raise."""

    prefill_batch_size = 4

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches: list[int] = []
        self.gate, self.at_gate = threading.Event(), threading.Event()

    def prefill(self, *, params, tokens, sampling, token_mask=None):
        self.at_gate.set()
        self.gate.wait(TIMEOUT_S)
        if bytes(tokens).startswith(b"bad"):
            raise ValueError("bad prompt")
        return super().prefill(params=params, tokens=tokens, sampling=sampling, token_mask=token_mask)

    def prefill_batch(self, *, params, prompts):
        self.batches.append(len(prompts))
        return super().prefill_batch(params=params, prompts=prompts)


def test_prompts_that_wait_are_prefilled_together_and_an_error_ends_only_its_own_request():
    engine = BatchingEchoEngine(slots=8)
    orch = echo_orchestrator(engine)
    try:
        first = orch.submit(GenerateRequest("first", 3))  # its prefill holds the thread at the gate
        wait_until(engine.at_gate.is_set)
        prompts = ["p1-", "bad", "p3-", "p4-", "p5-"]
        streams = [orch.submit(GenerateRequest(p, 3)) for p in prompts]
        engine.gate.set()
        assert first.collect(timeout_s=TIMEOUT_S).text == "fir"
        results = [s.collect(timeout_s=TIMEOUT_S) for s in streams]
        assert engine.batches == [4]  # the four behind the first, then the last one alone
        assert (results[1].finish.reason, results[1].finish.error) == ("error", "bad prompt")
        for prompt, result in zip(prompts, results, strict=True):
            if prompt != "bad":
                assert (result.text, result.finish.reason) == (prompt, "length")
    finally:
        orch.stop()


def test_streaming_emits_only_whole_utf8_characters(orch):
    stream = orch.submit(GenerateRequest("é€", 5))  # 2 + 3 bytes: one token per byte
    deltas = list(stream.iter(TIMEOUT_S))
    assert [d.text for d in deltas] == ["", "é", "", "", "€"]
    assert [len(d.token_ids) for d in deltas] == [1] * 5


def test_truncated_character_is_flushed_at_the_end(orch):
    result = run(orch, "é€", 4)
    assert result.token_ids == tuple("é€".encode()[:4])
    assert result.text == ByteTokenizer().decode(result.token_ids) == "é\ufffd"


def test_incremental_detokenizer_matches_full_decode():
    tok = ByteTokenizer()
    ids = tok.encode("naïve – 日本語 ok 🙂!")
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_sampling_is_per_request(orch):
    greedy = orch.submit(GenerateRequest("abc", 4))
    sampled = orch.submit(GenerateRequest("abc", 4, SamplingParams(temperature=0.7, seed=2)))
    assert greedy.collect(timeout_s=TIMEOUT_S).text == "abca"
    assert sampled.collect(timeout_s=TIMEOUT_S).text == "cdec"


def test_token_id_prompts(orch):
    result = run(orch, (104, 105, EOS), 9)
    assert (result.text, result.finish.reason) == ("hi", "stop")


def test_cancel_frees_the_slot_and_later_requests_complete():
    orch = echo_orchestrator(EchoEngine(slots=1, max_target_length=64, step_delay_s=0.01))
    try:
        stream = orch.submit(GenerateRequest("abcdef", 60))
        first = next(iter(stream.iter(TIMEOUT_S)))
        assert first.text == "a"
        stream.cancel()
        rest = list(stream.iter(TIMEOUT_S))
        assert stream.finish.reason == "cancelled"
        assert 1 + len(rest) < 60
        wait_until(lambda: orch.slots_used == 0)
        assert run(orch, "xy", 3).text == "xyx"
    finally:
        orch.stop()


def test_a_new_request_takes_the_lowest_free_slot():
    """Live slots stay packed low, so the engine's decode bucket follows the live count."""
    engine = EchoEngine(slots=4, max_target_length=64, step_delay_s=0.01)
    orch = echo_orchestrator(engine)
    inserted = lambda: [c[1] for c in engine.calls if c[0] == "insert"]  # noqa: E731
    try:
        streams = []
        for prompt in ("a", "b", "c"):
            streams.append(orch.submit(GenerateRequest(prompt, 60)))
            wait_until(lambda: len(inserted()) == len(streams))
        assert inserted() == [0, 1, 2]
        streams[1].cancel()  # slot 1 frees; 3 was never used
        wait_until(lambda: orch.slots_used == 2)
        later = orch.submit(GenerateRequest("d", 60))
        wait_until(lambda: len(inserted()) == 4)
        assert inserted() == [0, 1, 2, 1]
        for stream in (streams[0], streams[2], later):
            stream.cancel()
    finally:
        orch.stop()


def test_overload_rejects_beyond_the_queue_and_loses_nothing():
    orch = echo_orchestrator(EchoEngine(slots=1, max_target_length=64, step_delay_s=0.01), max_queued_requests=2)
    try:
        busy = orch.submit(GenerateRequest("long", 60))
        next(iter(busy.iter(TIMEOUT_S)))
        wait_until(lambda: orch.slots_used == 1)
        queued = [orch.submit(GenerateRequest(p, 3)) for p in ("q1", "q2")]
        with pytest.raises(Overloaded) as info:
            orch.submit(GenerateRequest("q3", 3))
        assert info.value.retry_after_s >= 1
        assert metric_value(orch, "num_requests_waiting") == 2
        busy.cancel()
        assert [s.collect(timeout_s=TIMEOUT_S).text for s in queued] == ["q1q", "q2q"]
        assert run(orch, "q3", 3).text == "q3q"  # admitted once the queue drained
    finally:
        orch.stop()


@pytest.mark.parametrize(
    "prompt,max_tokens,field",
    [
        ("", 4, "prompt"),
        ("x" * 17, 4, "prompt"),  # max_prefill_length is 16
        ((1, 2, 999), 4, "prompt"),  # id beyond the vocabulary
        ("ok", 0, "max_tokens"),
        ("ok", -3, "max_tokens"),
        ("ok", 10**9, "max_tokens"),
    ],
)
def test_invalid_requests_name_the_field(orch, prompt, max_tokens, field):
    with pytest.raises(RequestError) as info:
        orch.submit(GenerateRequest(prompt, max_tokens))
    assert info.value.field == field
    assert run(orch, "ok", 2).text == "ok"


def test_not_live_before_start_and_warmup_compiles_every_bucket():
    engine = EchoEngine(max_prefill_length=16)
    orch = echo_orchestrator(engine, start=False)
    assert not orch.is_live
    with pytest.raises(NotReady):
        orch.submit(GenerateRequest("a", 1))
    orch.start(warmup=True)
    try:
        assert engine.warmed == (True, True) and orch.is_live
        assert [c[1] for c in engine.calls if c[0] == "prefill"] == [1, 2, 4, 8, 16]
    finally:
        orch.stop()
    assert not orch.is_live


def test_disaggregated_warmup_compiles_each_engine_for_its_own_role():
    prefill, generate = EchoEngine(mesh="prefill"), EchoEngine(mesh="generate")
    orch = echo_orchestrator(generate, prefill_engine=prefill, start=False)
    orch.start(warmup=True)
    try:
        assert (prefill.warmed, generate.warmed) == ((True, False), (False, True))
        assert {c[0] for c in prefill.calls} == {"prefill"}
        assert {c[0] for c in generate.calls} == {"generate", "release"}  # no prefix to insert here
    finally:
        orch.stop()


def test_disaggregated_transfers_to_the_generate_mesh_with_same_outputs():
    prefill, generate = EchoEngine(mesh="prefill"), EchoEngine(mesh="generate")
    orch = echo_orchestrator(generate, prefill_engine=prefill)
    try:
        streams = [orch.submit(GenerateRequest(p, 6)) for p in ("ab", "cde", "f")]
        assert [s.collect(timeout_s=TIMEOUT_S).text for s in streams] == ["ababab", "cdecde", "ffffff"]
        wait_until(lambda: orch.slots_used == 0)
        assert [c[0] for c in prefill.calls] == ["prefill"] * 3
        assert sorted({c[0] for c in generate.calls}) == ["generate", "insert", "release", "transfer"]
        assert metric_value(orch, "jetstream_transfer_time_count") == 3
    finally:
        orch.stop()


def test_metrics_report_live_values():
    orch = echo_orchestrator(EchoEngine(slots=4, max_target_length=64, step_delay_s=0.01))
    try:
        for prompt in ("a", "bc"):
            run(orch, prompt, 5)
        assert metric_value(orch, "jetstream_request_success_count_total") == 2
        assert metric_value(orch, "jetstream_time_to_first_token_count") == 2
        assert metric_value(orch, "jetstream_time_per_output_token_count") == 2
        assert metric_value(orch, "jetstream_request_output_length_sum") == 10
        busy = orch.submit(GenerateRequest("long", 60))
        next(iter(busy.iter(TIMEOUT_S)))
        wait_until(lambda: metric_value(orch, "jetstream_slots_used_percentage") == 0.25)
        # the slot is taken just before the insert; the cache counts the request once inserted
        wait_until(lambda: metric_value(orch, "kv_cache_utilization_perc") > 0)
        busy.cancel()
        wait_until(lambda: metric_value(orch, "jetstream_slots_used_percentage") == 0.0)
        assert metric_value(orch, "jetstream_request_success_count_total") == 2  # cancelled ≠ success
        stopped = orch.submit(GenerateRequest("long", 60))  # a front end's stop string matched
        next(iter(stopped.iter(TIMEOUT_S)))
        stopped.stop()
        stopped.cancel()  # the first ask decides how it ends
        list(stopped.iter(TIMEOUT_S))
        assert stopped.finish.reason == "stop"
        assert metric_value(orch, "jetstream_request_success_count_total") == 3  # a stop is a success
        assert metric_value(orch, "jetstream_prefill_backlog_size") == 0
    finally:
        orch.stop()


class FailingEngine(EchoEngine):
    def generate(self, *, params, decode_state, token_mask=None):
        raise RuntimeError("device lost")


def test_engine_failure_ends_requests_and_health():
    orch = echo_orchestrator(FailingEngine())
    try:
        result = run(orch, "abc", 5)
        assert result.finish.reason == "error" and "device lost" in result.finish.error
        wait_until(lambda: not orch.is_live)
        with pytest.raises(NotReady):
            orch.submit(GenerateRequest("a", 1))
    finally:
        orch.stop()


def test_async_consumer_sees_the_same_stream(orch):
    async def consume():
        stream = orch.submit(GenerateRequest("xyz", 5))
        return await asyncio.wait_for(stream.acollect(), TIMEOUT_S)

    result = asyncio.run(consume())
    assert (result.text, result.finish.reason) == ("xyzxy", "length")
