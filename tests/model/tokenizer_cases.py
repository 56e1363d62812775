"""Test data for the tokenizer and chat-template tests (imported by name).

`data/llama_cpp_vocab/`: llama.cpp's own tokenizer test files (`models/ggml-vocab-*.gguf` with their
`.inp`/`.out` pairs, MIT licence, copied from the llama-cpp-python 0.3.36 sdist). `data/chat_templates/`:
chat templates from llama.cpp's `models/templates/` for the supported families.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import gguf

from serving.engine.tokenizer import HFTokenizer, tokenizer_from_gguf

DATA = Path(__file__).parent / "data"
VOCAB_DIR = DATA / "llama_cpp_vocab"
TEMPLATE_DIR = DATA / "chat_templates"
# llama.cpp's test-tokenizer-0 separates the inputs of a .inp file with this line.
INPUT_SEPARATOR = "\n__ggml_vocab_test__\n"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Numbers 12345, émojis 😀\tand  spaces\n\nnew lines"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@functools.cache
def gguf_tokenizer(vocab: str) -> HFTokenizer:
    """The tokenizer of llama.cpp's ggml-vocab-<vocab>.gguf, built once per test session."""
    return tokenizer_from_gguf(gguf.GGUFReader(VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"))


def llama_cpp_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs, read as llama.cpp's test-tokenizer-0 reads them."""
    raw = (VOCAB_DIR / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(INPUT_SEPARATOR)
    if texts[-1] == "":  # the file ends with a separator
        texts.pop()
    expected = (VOCAB_DIR / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(expected), vocab
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, expected, strict=False)]


def template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def write_hf_dir(path: Path, tokenizer: HFTokenizer, config: dict, generation_eos=None) -> Path:
    """A Hugging Face tokenizer directory: tokenizer.json from `tokenizer`, tokenizer_config.json from
    its special tokens plus `config`, and generation_config.json when `generation_eos` is given."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}), encoding="utf-8")
    return path


def transformers_tokenizer(path: Path, **kwargs):
    """transformers' own tokenizer for a directory (or a GGUF file in it): the reference the tests compare
    against. transformers is a test requirement: missing, it fails these tests, never skips them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def transformers_prompt_ids(hf_tokenizer, text: str) -> list[int]:
    """transformers' `tokenizer(text)` ids, less the second BOS it adds to a text that starts with one
    (the server never sends two)."""
    ids = list(hf_tokenizer(text)["input_ids"])
    bos = hf_tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def transformers_chat_ids(hf_tokenizer, messages) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
