"""Regenerate the converted-checkpoint fixtures: tiny Hugging Face directories (bfloat16
safetensors, from `hf_families`) and their GGUF conversions by llama.cpp's own converter.

    python tests/model/data/make_converted_fixtures.py LLAMA_CPP_DIR

LLAMA_CPP_DIR is llama.cpp's source tree (e.g. the one vendored in the llama-cpp-python sdist).
The converter recognises byte-level BPE tokenizers by hashing their output on a test text; the
byte-only vocabulary written here is not one it knows, so its pre-tokenizer name is set to
"default" (this only names the tokenizer in the GGUF metadata: the tensors are converted as is).
Run by hand when the fixtures must change; the tests read only the files it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))

FAMILIES = ("llama3", "qwen2")


def byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer whose 256 tokens are the bytes (no merges), then <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def convert(llama_cpp: Path, hf_dir: Path, out: Path) -> None:
    """The converter in a fresh interpreter: it must import its own gguf-py, not the installed one."""
    subprocess.run([sys.executable, __file__, "--convert", str(llama_cpp), str(hf_dir), str(out)], check=True)


def run_converter(llama_cpp: Path, hf_dir: Path, out: Path) -> None:
    sys.path.insert(0, str(llama_cpp))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "bf16", "--outfile", str(out)]
    convert_hf_to_gguf.main()


def main(llama_cpp: str) -> None:
    from tests.model import hf_families

    for name in FAMILIES:
        hf_dir = HERE / f"{name}-hf"
        hf_families.save_family(name, hf_dir, "bfloat16")
        byte_tokenizer(hf_dir)
        convert(Path(llama_cpp), hf_dir, HERE / f"{name}.gguf")


if __name__ == "__main__":
    if sys.argv[1] == "--convert":
        run_converter(*map(Path, sys.argv[2:]))
    else:
        main(sys.argv[1])
