"""Tokenizers built from GGUF metadata and from Hugging Face directories.

GGUF: llama.cpp's own test files give the expected ids (llama.cpp's test-tokenizer-0 tokenizes with
add_special=false). Hugging Face directories: transformers loading the same directory is the reference.
"""

from __future__ import annotations

import gguf
import pytest

from serving.engine.loaders import gguf_loader
from serving.engine.tokenizer import (
    PRE_TOKENIZERS,
    HFTokenizer,
    tokenizer_from_gguf,
    tokenizer_from_hf_dir,
)
from tests.model.tokenizer_cases import (
    CONVERSATIONS,
    gguf_tokenizer,
    llama_cpp_cases,
    template,
    transformers_chat_ids,
    transformers_prompt_ids,
    transformers_tokenizer,
    write_hf_dir,
)

# Every accepted vocabulary kind has a llama.cpp test file here: SentencePiece (llama-spm, Llama 2 and
# Mistral), Llama 3's pre-tokenizer, Qwen 2's, GPT-2's, and digits-then-GPT-2 (starcoder, which llama.cpp
# shares with smollm; the bundled SmolLM2 file is checked against transformers in test_reference.py).
LLAMA_CPP_VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "starcoder"]
TEXTS = ["Hello world", " Hello", "<s>Hi", "<|begin_of_text|>Hi", "Numbers 12345 and émojis 😀\n\n\tx", ""]


@pytest.mark.parametrize("vocab", LLAMA_CPP_VOCABS)
def test_gguf_tokenizer_gives_llama_cpp_ids(vocab):
    tokenizer, cases = gguf_tokenizer(vocab), llama_cpp_cases(vocab)
    failed = [(text, ids, tokenizer.encode(text)) for text, ids in cases if tokenizer.encode(text) != ids]
    print(f"{vocab}: {len(cases) - len(failed)}/{len(cases)} lines match llama.cpp")
    assert not failed, failed[:3]


@pytest.mark.parametrize("vocab", LLAMA_CPP_VOCABS)
def test_decode_inverts_encode(vocab):
    tokenizer = gguf_tokenizer(vocab)
    for text, ids in llama_cpp_cases(vocab):
        if text.strip() == text:  # SentencePiece and clean-up rules may drop leading/trailing spaces
            assert tokenizer.decode(ids) == text, text


@pytest.mark.parametrize(
    "vocab,bos",
    [("llama-spm", 1), ("llama-bpe", 128000), ("qwen2", None)],  # llama.cpp's defaults: the files set no flag
)
def test_bos_is_added_as_configured_and_never_twice(vocab, bos):
    tokenizer = gguf_tokenizer(vocab)
    lead = [bos] if bos is not None else []
    assert tokenizer.encode_prompt("Hello world") == lead + tokenizer.encode("Hello world")
    if bos is not None:
        bos_text = tokenizer.special_tokens["bos_token"]
        once = tokenizer.encode_prompt(bos_text + "Hello world")
        assert once == tokenizer.encode(bos_text + "Hello world") and once.count(bos) == 1


def test_generation_ends_on_eos_and_end_of_turn_tokens():
    assert {128001, 128009} <= gguf_tokenizer("llama-bpe").eos_ids  # <|end_of_text|>, <|eot_id|> (Llama 3.0: no EOM)
    assert {151643, 151645} <= gguf_tokenizer("qwen2").eos_ids  # <|endoftext|>, <|im_end|>
    assert gguf_tokenizer("llama-spm").eos_ids == {2}


def test_special_tokens_in_text_are_parsed_as_such():
    tokenizer = gguf_tokenizer("llama-bpe")
    assert tokenizer.encode("<|start_header_id|>user<|end_header_id|>") == [128006, 882, 128007]
    assert tokenizer.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def _vocab_only_gguf(path, model: str, pre: str | None) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize(
    "model,pre,names",
    [
        ("gpt2", "tekken", ["tokenizer.ggml.pre 'tekken'", "llama-bpe", "qwen2", "smollm"]),
        ("gpt2", None, ["tokenizer.ggml.pre None"]),
        ("bert", "default", ["tokenizer.ggml.model 'bert'", "'gpt2'", "'llama'"]),
    ],
)
def test_unsupported_vocabulary_is_refused_naming_the_key(tmp_path, model, pre, names):
    reader = _vocab_only_gguf(tmp_path / "vocab.gguf", model, pre)
    with pytest.raises(ValueError) as error:
        tokenizer_from_gguf(reader)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_supported_pre_tokenizers_are_listed():
    assert {"llama-bpe", "qwen2", "smollm", "gpt-2"} <= set(PRE_TOKENIZERS)


# -- Hugging Face directories, against transformers --------------------------------------------------


@pytest.mark.parametrize(
    "vocab,template_name,generation_eos",
    [
        ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", [128001, 128008, 128009]),
        ("qwen2", "Qwen-Qwen2.5-7B-Instruct", 151645),
    ],
)
def test_hf_dir_matches_transformers(tmp_path, vocab, template_name, generation_eos):
    source = gguf_tokenizer(vocab)
    path = write_hf_dir(tmp_path, source, {"chat_template": template(template_name)}, generation_eos)
    ours, reference = tokenizer_from_hf_dir(path), transformers_tokenizer(path)
    for text in TEXTS:
        assert ours.encode_prompt(text) == transformers_prompt_ids(reference, text), text
    for messages in CONVERSATIONS:
        assert ours.encode_chat(messages) == transformers_chat_ids(reference, messages)
    declared = set(generation_eos) if isinstance(generation_eos, list) else {generation_eos}
    assert declared <= ours.eos_ids and reference.eos_token_id in ours.eos_ids


def test_hf_dir_chat_template_file_wins_over_config(tmp_path):
    path = write_hf_dir(tmp_path, gguf_tokenizer("qwen2"), {"chat_template": "{{ raise_exception('unused') }}"})
    (path / "chat_template.jinja").write_text(template("Qwen-Qwen2.5-7B-Instruct"), encoding="utf-8")
    ours, reference = tokenizer_from_hf_dir(path), transformers_tokenizer(path)
    assert ours.encode_chat(CONVERSATIONS[0]) == transformers_chat_ids(reference, CONVERSATIONS[0])


@pytest.mark.parametrize("legacy", [None, False, True])
def test_hf_dir_llama_tokenizer_class_splits_as_transformers(tmp_path, legacy):
    """transformers' LlamaTokenizer rebuilds its pre-tokenizer from `legacy`, whatever tokenizer.json says."""
    config = {"tokenizer_class": "LlamaTokenizer", "chat_template": template("mistralai-Mistral-Nemo-Instruct-2407")}
    if legacy is not None:
        config["legacy"] = legacy
    path = write_hf_dir(tmp_path, gguf_tokenizer("llama-spm"), config, generation_eos=2)
    ours, reference = tokenizer_from_hf_dir(path), transformers_tokenizer(path)
    for text in TEXTS + ["<s>[INST] Hi [/INST]", "  two spaces"]:
        ids = transformers_prompt_ids(reference, text)
        assert ours.encode_prompt(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids), text
    for messages in CONVERSATIONS[:2]:
        assert ours.encode_chat(messages) == transformers_chat_ids(reference, messages)


def test_hf_dir_adds_tokens_only_tokenizer_config_declares(tmp_path):
    declared = {
        "32000": {
            "content": "<|tool|>",
            "special": True,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
    }
    path = write_hf_dir(tmp_path, gguf_tokenizer("llama-spm"), {"added_tokens_decoder": declared})
    ours, reference = tokenizer_from_hf_dir(path), transformers_tokenizer(path)
    text = "call<|tool|> now"
    assert ours.encode_prompt(text) == transformers_prompt_ids(reference, text)
    assert 32000 in ours.encode(text) and ours.vocab_size == 32001


def test_hf_dir_without_tokenizer_json_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_from_hf_dir(tmp_path)


def test_serialization_keeps_bos_and_special_tokens():
    source = gguf_tokenizer("llama-spm")
    copy = HFTokenizer.from_json(source.to_json(), source.eos_ids, "{{ bos_token }}", source.special_tokens)
    assert copy.encode_prompt("Hello") == source.encode_prompt("Hello") == [1, 15043]
    assert copy.apply_chat_template([]) == "<s>"


def test_bundled_smollm_vocabulary_matches_transformers():
    """The smollm pre-tokenizer on the bundled SmolLM2 file, over llama.cpp's test inputs, against
    transformers reading the same GGUF. One line differs, and llama.cpp sides with us: transformers'
    GGUF reader has no smollm split and keeps GPT-2's ` ?\\p{N}+`, so " ½" stays one piece, while llama.cpp
    (and SmolLM2's own tokenizer.json, Digits(individual_digits)) isolate every \\p{N} character first;
    the same regexes pass llama.cpp's starcoder file above."""
    path = gguf_loader.bundled_gguf_path()
    ours = tokenizer_from_gguf(gguf.GGUFReader(path))
    reference = transformers_tokenizer(path.parent, gguf_file=path.name)
    texts = [text for text, _ in llama_cpp_cases("gpt-2")]
    failed = [text for text in texts if ours.encode(text) != reference.encode(text, add_special_tokens=False)]
    print(f"smollm (bundled SmolLM2): {len(texts) - len(failed)}/{len(texts)} lines match transformers")
    assert failed == ["ied 4 \u00bd months"]
    assert ours.encode("ied 4 \u00bd months") == [885, 216, 36, 216, 16738, 2704]  # ied, " ", 4, " ", ½, " months"
