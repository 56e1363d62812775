"""The chat handler with a real tokenizer over the echo engine: the prompt it sends is the tokenizer's
`encode_chat` ids (one BOS, however the template writes it), and template trouble is a 400."""

from __future__ import annotations

import contextlib

import pytest
from fastapi.testclient import TestClient
from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from serving.engine.tokenizer import HFTokenizer
from serving.server.http_api import create_app
from serving.server.orchestrator import Orchestrator
from tests.server.fake_engine import EchoEngine

BOS, EOS = 256, 257
BOS_FIRST_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def byte_tokenizer_with_bos(chat_template: str) -> HFTokenizer:
    """Token id = UTF-8 byte (byte fallback over an empty vocabulary), <s> = 256 added by the
    post-processor (as Llama's tokenizer.json does), </s> = 257."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return HFTokenizer(tok, [EOS], chat_template, {"bos_token": "<s>", "eos_token": "</s>"})


@contextlib.contextmanager
def client_for(tokenizer: HFTokenizer):
    engine = EchoEngine()
    orch = Orchestrator(
        tokenizer=tokenizer,
        prefill_engine=engine,
        generate_engine=engine,
        prefill_params=engine.load_params(),
        generate_params=engine.load_params(),
    )
    orch.start(warmup=False)
    try:
        yield TestClient(create_app(orch, model_name="echo")), engine
    finally:
        orch.stop()


def test_chat_prompt_is_the_encoded_template_with_one_bos():
    tokenizer = byte_tokenizer_with_bos(BOS_FIRST_TEMPLATE)
    with client_for(tokenizer) as (client, engine):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 3  # <s> h i: the template's BOS, none added
        assert r.json()["choices"][0]["message"]["content"] == "<s>hi"  # the echo engine repeats its prompt
        assert ("prefill", 3) in engine.calls


def test_completion_prompt_gets_bos_once():
    tokenizer = byte_tokenizer_with_bos(BOS_FIRST_TEMPLATE)
    with client_for(tokenizer) as (client, _):
        for prompt in ("hi", "<s>hi"):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "<s>hi", r.text


@pytest.mark.parametrize(
    "template,message",
    [
        ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "roles must alternate"),
        ("{{ messages[0].nope.deeper }}", "chat template failed"),
        ("", "this model has no chat template"),
    ],
)
def test_template_trouble_is_a_400_naming_it(template, message):
    with client_for(byte_tokenizer_with_bos(template)) as (client, _):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "messages" and message in error["message"], error
