"""Tokenizers implementing `engine_api.Tokenizer`.

`BPETokenizer`: byte-level BPE built with the `tokenizers` library from a vocab, merges and special
tokens (as stored in a GGUF file's tokenizer.ggml.* fields), with a ChatML chat template.
`ByteTokenizer`: one token per UTF-8 byte, for the tiny random-weight test model.
"""

from __future__ import annotations

import re
from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character; the character -> byte.

    Printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


_BYTE_OF_CHAR = _byte_level_alphabet()


class ChatML:
    """ChatML turns `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then `<|im_start|>assistant\\n`.

    Matches the Jinja template SmolLM2 ships: when the first message is not a system message, a
    default system turn is prepended; its text is read from the template string itself.
    """

    _DEFAULT_SYSTEM = re.compile(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END), re.S)

    def __init__(self, template: str = ""):
        if template and IM_START not in template:
            raise ValueError("chat template is not ChatML (no <|im_start|>); add a renderer for it")
        found = self._DEFAULT_SYSTEM.search(template)
        self.default_system: str | None = found.group(1) if found else None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        parts = []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
        for message in messages:
            parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
        parts.append(f"{IM_START}assistant\n")
        return "".join(parts)


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) with digits split one by one, as llama.cpp's 'smollm' pre."""

    def __init__(self, tok: Tokenizer, eos_ids: Sequence[int], chat_template: str = ""):
        self._tok = tok
        self._eos_ids = frozenset(int(i) for i in eos_ids)
        self.chat_template = chat_template
        self._chat = ChatML(chat_template)

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        special_ids: Sequence[int],
        eos_ids: Sequence[int],
        chat_template: str = "",
    ) -> "BPETokenizer":
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
        return cls(tok, eos_ids, chat_template)

    def to_json(self) -> str:
        """The `tokenizers` serialization (vocab, merges, pre-tokenizer, special tokens)."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, data: str, eos_ids: Sequence[int], chat_template: str = "") -> "BPETokenizer":
        return cls(Tokenizer.from_str(data), eos_ids, chat_template)

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
        """The bytes of each id, from its byte-level spelling; a special token's own name."""
        special = self.special_ids
        spelled = (self._tok.id_to_token(i) for i in range(self.vocab_size))
        return [
            token.encode() if i in special else bytes(_BYTE_OF_CHAR[c] for c in token)
            for i, token in enumerate(spelled)
        ]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included (callers drop stop tokens before decoding)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._chat.render(messages)


class ByteTokenizer:
    """Token id = UTF-8 byte (vocab 256). Byte 2 (STX) plays EOS. For the tiny test model."""

    def __init__(self, eos_id: int = 2):
        self._eos_ids = frozenset({eos_id})
        self._chat = ChatML()

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

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._chat.render(messages)
