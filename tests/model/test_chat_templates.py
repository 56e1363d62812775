"""Chat templates from llama.cpp's `models/templates/` for the supported families, rendered by our Jinja
renderer and by transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`:
the token ids must be equal, from the GGUF-built tokenizer and from the Hugging Face directory alike."""

from __future__ import annotations

import jinja2
import pytest

from serving.engine.chat_template import ChatTemplate
from serving.engine.tokenizer import HFTokenizer, tokenizer_from_hf_dir
from serving.engine_api import ChatTemplateError
from tests.model.tokenizer_cases import (
    CONVERSATIONS,
    gguf_tokenizer,
    template,
    transformers_chat_ids,
    transformers_tokenizer,
    write_hf_dir,
)

TEMPLATES = [
    ("meta-llama-Llama-3.1-8B-Instruct", "llama-bpe"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama-bpe"),
    ("meta-llama-Llama-3.3-70B-Instruct", "llama-bpe"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "llama-bpe"),
    ("HuggingFaceTB-SmolLM3-3B", "llama-bpe"),
    ("Qwen-Qwen2.5-7B-Instruct", "qwen2"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "llama-spm"),  # Mistral's [INST] turns on a SentencePiece vocabulary
]


def _with_template(tokenizer: HFTokenizer, source: str) -> HFTokenizer:
    return HFTokenizer.from_json(tokenizer.to_json(), tokenizer.eos_ids, source, tokenizer.special_tokens)


@pytest.mark.parametrize("template_name,vocab", TEMPLATES)
def test_chat_prompt_equals_transformers(tmp_path, template_name, vocab):
    source = template(template_name)
    from_gguf = _with_template(gguf_tokenizer(vocab), source)
    path = write_hf_dir(tmp_path, from_gguf, {"chat_template": source})
    from_dir, reference = tokenizer_from_hf_dir(path), transformers_tokenizer(path)
    rendered = 0
    for messages in CONVERSATIONS:
        try:
            expected = transformers_chat_ids(reference, messages)
        except jinja2.TemplateError as exc:  # the template itself refuses this conversation
            for ours in (from_gguf, from_dir):
                with pytest.raises(ChatTemplateError, match=str(exc)):
                    ours.encode_chat(messages)
            continue
        assert from_gguf.encode_chat(messages) == expected, messages
        assert from_dir.encode_chat(messages) == expected, messages
        rendered += 1
    assert rendered >= 2, "most conversations should render"


def test_bos_written_by_the_template_is_not_doubled():
    tokenizer = _with_template(gguf_tokenizer("llama-bpe"), template("meta-llama-Llama-3.1-8B-Instruct"))
    ids = tokenizer.encode_chat(CONVERSATIONS[1])
    assert ids[0] == 128000 and ids.count(128000) == 1


def test_raise_exception_names_the_problem():
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('first role must be user') }}{% endif %}"
    chat = ChatTemplate(source, {})
    with pytest.raises(ChatTemplateError, match="first role must be user"):
        chat.render([{"role": "assistant", "content": "x"}])


def test_template_environment_matches_transformers():
    source = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}|{{ add_generation_prompt }}"
    rendered = ChatTemplate(source, {"bos_token": "<s>"}).render([{"role": "user", "content": "<b>&é", "name": None}])
    assert rendered == '[{"role": "user", "content": "<b>&é"}]|4|<s>|True'  # None keys dropped, no HTML escapes


def test_generation_block_renders_its_body():
    source = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert ChatTemplate(source, {}).render([{"role": "assistant", "content": "kept"}]) == "kept"


def test_sandbox_refuses_unsafe_access():
    chat = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatTemplateError):
        chat.render([])


def test_template_that_does_not_compile_is_refused_at_load():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", {})


def test_model_without_template_refuses_chat():
    tokenizer = HFTokenizer.from_json(gguf_tokenizer("qwen2").to_json(), [151643])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.encode_chat(CONVERSATIONS[0])
