"""Tokenizers implementing `engine_api.Tokenizer`, and the two ways to build one.

`tokenizer_from_hf_dir`: a Hugging Face checkpoint directory (`tokenizer.json` through the `tokenizers`
library, `tokenizer_config.json`, optional `chat_template.jinja` and `generation_config.json`).
`tokenizer_from_gguf`: a GGUF file's `tokenizer.ggml.*` metadata, tokenizing as llama.cpp does: byte-level
BPE split by the regexes `tokenizer.ggml.pre` names (`llama-vocab.cpp`), or SentencePiece (`llama`),
built as a BPE over the vocabulary's scores with byte fallback.
`HFTokenizer`: what both return. `ByteTokenizer`: one token per UTF-8 byte, for the tiny random model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from serving.engine.chat_template import ChatTemplate
from serving.engine_api import ChatTemplateError

# Tokens that end a turn in the supported families' templates, as llama.cpp recognises them by text
# (Llama 3's <|eot_id|> and <|eom_id|>, ChatML's <|im_end|>, ...): a generation stops on them.
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>")

# tokenizer_config.json classes whose splitting transformers rebuilds from `legacy` (Llama 2, Mistral 7B).
SENTENCEPIECE_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")

# The named special tokens transformers passes to a chat template (`SPECIAL_TOKENS_ATTRIBUTES`).
TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before byte-level BPE for one `tokenizer.ggml.pre` value."""

    splits: tuple[str, ...]  # regexes applied in turn, each isolating its matches
    ignore_merges: bool = False  # a word that is itself a token is not merged from pieces
    add_bos: bool = False  # BOS default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2_SPLIT))
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": PreTokenizer((_QWEN2_SPLIT,)),
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "gpt-2": PreTokenizer((_GPT2_SPLIT,)),
}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character; the character -> byte.

    Printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _decodes_byte_level(tok: Tokenizer) -> bool:
    """Whether the tokenizer spells bytes as GPT-2's characters (else SentencePiece's ▁ and <0xNN>)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _spm_token_bytes(token: str) -> bytes:
    """A SentencePiece piece's bytes: a byte-fallback piece <0xNN> is that byte, ▁ is a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace(SPM_SPACE, " ").encode()


# tokenizer.ggml.token_type values used here (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
SPM_SPACE = "\u2581"


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: BOS/EOS as the post-processor adds
    them, the named special tokens, the chat template and the ids that end a generation."""

    def __init__(
        self,
        tok: Tokenizer,
        eos_ids: Sequence[int],
        chat_template: str = "",
        special_tokens: Mapping[str, str] | None = None,
    ):
        self._tok = tok
        self._eos_ids = frozenset(int(i) for i in eos_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._chat = ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        self._prefix, self._suffix = _post_processor_ids(tok)

    def to_json(self) -> str:
        """The `tokenizers` serialization (vocab, merges, normalizer, pre-tokenizer, BOS/EOS, added tokens)."""
        return self._tok.to_str()

    @classmethod
    def from_json(
        cls, data: str, eos_ids: Sequence[int], chat_template: str = "", special_tokens: Mapping[str, str] | None = None
    ) -> HFTokenizer:
        return cls(Tokenizer.from_str(data), eos_ids, chat_template, special_tokens)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, added in self._tok.get_added_tokens_decoder().items() if added.special)

    def token_bytes(self) -> list[bytes]:
        """The bytes of each id from its spelling (byte-level characters, or SentencePiece pieces);
        a special token, or an added token spelled as plain text, is its own name."""
        special = self.special_ids
        byte_level = _decodes_byte_level(self._tok)

        def spelled(i: int, token: str) -> bytes:
            if i in special:
                return token.encode()
            if byte_level:
                return (
                    bytes(_BYTE_OF_CHAR[c] for c in token) if all(c in _BYTE_OF_CHAR for c in token) else token.encode()
                )
            return _spm_token_bytes(token)

        return [spelled(i, self._tok.id_to_token(i) or "") for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.encode(text)
        prefix = [] if ids[: len(self._prefix)] == self._prefix else self._prefix  # never a second BOS
        return prefix + ids + self._suffix

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included (callers drop stop tokens before decoding)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self._chat is None:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json, chat_template.jinja or the "
                "GGUF's tokenizer.chat_template)"
            )
        return self._chat.render(messages)


def _post_processor_ids(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (BOS, EOS), read off a probe encoding."""
    with_special = tok.encode("a", add_special_tokens=True)
    plain = len(tok.encode("a", add_special_tokens=False).ids)
    mask, ids = with_special.special_tokens_mask, with_special.ids
    lead = next((i for i, special in enumerate(mask) if not special), len(mask) - plain)
    return ids[:lead], ids[lead + plain :]


def _bos_eos_processor(bos: str | None, eos: str | None, vocab: Mapping[str, int]) -> processors.TemplateProcessing:
    single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
    pair = " ".join([single] + [f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
    special = [(token, vocab[token]) for token in (bos, eos) if token]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def generation_end_ids(vocab: Mapping[str, int], declared: Sequence[int | None]) -> list[int]:
    """EOS and the other declared ends (EOT, EOM, generation_config's list) plus end-of-turn tokens by text."""
    ids = {int(i) for i in declared if i is not None}
    return sorted(ids | {vocab[text] for text in END_OF_TURN_TEXTS if text in vocab})


def _spm_decoder(prefix_space: bool) -> decoders.Decoder:
    strip = [decoders.Strip(" ", 1, 0)] * prefix_space
    return decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])


# -- Hugging Face checkpoint directories ------------------------------------------------------------


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _hf_chat_template(path: Path, config: Mapping) -> str:
    """chat_template.jinja wins over tokenizer_config.json's `chat_template` (a string, or named templates)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or ""
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", "")
    return template


def _add_config_tokens(tok: Tokenizer, config: Mapping) -> None:
    """Added tokens tokenizer_config.json declares that tokenizer.json lacks (transformers adds them too)."""
    present = {added.content for added in tok.get_added_tokens_decoder().values()}
    for entry in config.get("added_tokens_decoder", {}).values():
        if entry["content"] not in present:
            options = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            tok.add_tokens([AddedToken(entry["content"], **options)])


def _apply_llama_tokenizer_class(tok: Tokenizer, config: Mapping) -> None:
    """transformers' LlamaTokenizer (Llama 2, Mistral) keeps only tokenizer.json's vocabulary, merges and
    post-processor: it splits with Metaspace, putting U+2581 before the first piece only (or before every
    piece after a special token when tokenizer_config.json says `legacy: true`), whatever normalizer the
    file has. Rebuild the same so prompts equal transformers' on old Hub files too."""
    prefix_space = config.get("add_prefix_space")
    prefix_space = True if prefix_space is None else prefix_space
    scheme = ("always" if config.get("legacy", False) else "first") if prefix_space else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme=scheme, split=False)
    tok.decoder = _spm_decoder(prefix_space)


def tokenizer_from_hf_dir(path: Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory.

    BOS/EOS come from tokenizer.json's post-processor, as transformers uses it when tokenizer.json exists
    (it then ignores tokenizer_config.json's add_bos_token). The normalizer, pre-tokenizer and decoder are
    the file's, except for the LlamaTokenizer class, which transformers rebuilds (`_apply_llama_tokenizer_class`).
    A generation ends on EOS, on every id of generation_config.json's `eos_token_id` (an int or a list) and
    on the end-of-turn tokens.
    """
    path = Path(path)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (the Hugging Face tokenizer file this server reads)")
    tok = Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(path / "tokenizer_config.json")
    if config.get("tokenizer_class") in SENTENCEPIECE_CLASSES:
        _apply_llama_tokenizer_class(tok, config)
    _add_config_tokens(tok, config)
    special = {name: _token_content(config[name]) for name in TEMPLATE_SPECIAL_TOKENS if config.get(name)}
    vocab = tok.get_vocab(with_added_tokens=True)
    generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    declared = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    eos_ids = generation_end_ids(vocab, [vocab.get(special.get("eos_token", "")), *declared])
    return HFTokenizer(tok, eos_ids, _hf_chat_template(path, config), special)


# -- GGUF metadata ------------------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _added_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[AddedToken]:
    """Control tokens match whole as special tokens; user-defined ones match whole as plain text (llama.cpp)."""
    kinds = {TOKEN_CONTROL: True, TOKEN_USER_DEFINED: False}
    return [
        AddedToken(token, special=kinds[kind], normalized=False)
        for token, kind in zip(tokens, types, strict=False)
        if kind in kinds
    ]


def _byte_level_bpe(reader: gguf.GGUFReader, tokens: Sequence[str], pre: PreTokenizer) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """SentencePiece merges as llama.cpp applies them: any two adjacent pieces whose concatenation is a
    token merge, the best-scoring result first (a BPE whose merge ranks follow the scores)."""
    mergeable = {TOKEN_NORMAL, TOKEN_USER_DEFINED}
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=False)) if kind in mergeable}
    ranked = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: Sequence[str], types: Sequence[int]) -> Tokenizer:
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF tokenizer.ggml.model 'llama' (SentencePiece) needs tokenizer.ggml.scores")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
    model = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=spm_merges(tokens, scores, types),
        unk_token=tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    # llama.cpp puts a space before the text and after every special token, then writes spaces as U+2581.
    space = [normalizers.Replace(" ", SPM_SPACE)]
    prefix_space = _field(reader, "tokenizer.ggml.add_space_prefix", True)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE)] * prefix_space + space)
    tok.decoder = _spm_decoder(prefix_space)
    return tok


def _gguf_model(reader: gguf.GGUFReader, tokens: Sequence[str], types: Sequence[int]) -> tuple[Tokenizer, bool]:
    """(tokenizer without special tokens, whether llama.cpp adds BOS by default) for the file's model and pre."""
    model = _field(reader, "tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_bpe(reader, tokens, types), True
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)"
        )
    pre_name = _field(reader, "tokenizer.ggml.pre")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre {pre_name!r} (with tokenizer.ggml.model 'gpt2') is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return _byte_level_bpe(reader, tokens, pre), pre.add_bos


def _gguf_special_tokens(reader: gguf.GGUFReader, tokens: Sequence[str]) -> dict[str, str]:
    """The named special tokens a template may use, from the token ids the file declares."""
    keys = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }
    ids = {name: _field(reader, f"tokenizer.ggml.{key}") for name, key in keys.items()}
    return {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> HFTokenizer:
    """The tokenizer a GGUF file describes, tokenizing as llama.cpp does.

    BOS is added when tokenizer.ggml.add_bos_token says so (llama.cpp's default when absent: yes for
    SentencePiece and Llama 3's pre-tokenizer), EOS when tokenizer.ggml.add_eos_token does. A generation
    ends on EOS, EOT, EOM and the end-of-turn tokens.
    """
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    tok, add_bos_default = _gguf_model(reader, tokens, types)
    tok.add_special_tokens(_added_tokens(tokens, types))
    special = _gguf_special_tokens(reader, tokens)
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token", False)
    vocab = tok.get_vocab(with_added_tokens=True)
    bos, eos = special.get("bos_token") if add_bos else None, special.get("eos_token") if add_eos else None
    tok.post_processor = _bos_eos_processor(bos, eos, vocab)
    declared = [_field(reader, f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    chat_template = _field(reader, "tokenizer.chat_template", "")
    return HFTokenizer(tok, generation_end_ids(vocab, declared), chat_template, special)


# -- the tiny random-weight test model -----------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ByteTokenizer:
    """Token id = UTF-8 byte (vocab 256). Byte 2 (STX) plays EOS. No BOS. ChatML chat template."""

    def __init__(self, eos_id: int = 2):
        self._eos_ids = frozenset({eos_id})
        self._chat = ChatTemplate(CHATML_TEMPLATE, {})

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset()

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self._chat.render(messages)
