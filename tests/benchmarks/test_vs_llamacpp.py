"""The random Llama 3.2 1B-shaped model vs_llamacpp.py benchmarks: its tokenizer is Llama 3's, as
llama.cpp's converter and our Hugging Face loader read it."""

from __future__ import annotations

import json

from benchmarks import vs_llamacpp
from serving.engine.tokenizer import tokenizer_from_hf_dir
from tests.model.tokenizer_cases import VOCAB_DIR, llama_cpp_cases


def test_the_written_tokenizer_tokenizes_as_llama_cpp_does(tmp_path):
    vs_llamacpp.write_tokenizer(tmp_path, VOCAB_DIR / vs_llamacpp.LLAMA_BPE_VOCAB)
    (tmp_path / "config.json").write_text(json.dumps(vs_llamacpp.load_bench.LLAMA32_1B))
    tokenizer = tokenizer_from_hf_dir(tmp_path)
    assert tokenizer.vocab_size == vs_llamacpp.load_bench.LLAMA32_1B["vocab_size"]
    for text, ids in llama_cpp_cases("llama-bpe"):
        assert tokenizer.encode(text) == ids, text
    assert tokenizer.encode_prompt("Hello")[0] == 128000  # <|begin_of_text|>, added as llama.cpp adds it
