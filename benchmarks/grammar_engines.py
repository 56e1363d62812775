"""Grammar engines for structured outputs, measured on this machine's CPU: compile time and per-token
mask time, on SmolLM2's 49k vocabulary (the bundled GGUF) and a Llama-3 128k vocabulary (a GGUF
holding only the vocabulary, e.g. llama.cpp's models/ggml-vocab-llama-bpe.gguf).

For each engine, vocabulary and schema: compile the schema (tokenizer set-up excluded, it is paid
once per server; llguidance through the server's own structured.py), then walk the tokens of a
valid instance, computing the allowed-token mask before each token and advancing the matcher with
it, as the server does once per decode step.

  pip install xgrammar outlines-core   # the alternatives (the server needs only llguidance)
  python benchmarks/grammar_engines.py --llama3-vocab path/to/ggml-vocab-llama-bpe.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.engine.loaders.gguf_loader import bundled_gguf_path  # noqa: E402
from serving.engine.tokenizer import tokenizer_from_gguf  # noqa: E402
from serving.engine_api import unconstrained_bitmask  # noqa: E402
from serving.server.structured import GrammarCompiler, parse_response_format  # noqa: E402

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0},
                "role": {"enum": ["admin", "user", "guest"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "age", "role", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"]},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "price": {"type": "number"},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        "required": ["sku", "qty"],
                    },
                },
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["id", "price", "items", "note"],
        },
        {"id": "ABC-1234", "price": 12.5, "items": [{"sku": "x-1", "qty": 2}, {"sku": "y-2", "qty": 1}], "note": None},
    ),
}


def load_vocab(path: Path):
    reader = gguf.GGUFReader(str(path))
    return tokenizer_from_gguf(reader)


class LLGuidance:
    """The server's own code path (serving/server/structured.py)."""

    name = "llguidance"

    def __init__(self, tok):
        self.compiler = GrammarCompiler(tok)
        self.compiler.matcher(parse_response_format({"type": "json_object"}))  # builds the vocabulary

    def compile(self, schema):
        fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}})
        return lambda: self.compiler.matcher(fmt)

    def walk(self, matcher, tokens, vocab):
        row = unconstrained_bitmask(1, vocab)[0]
        times = []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill(row)
            times.append(time.perf_counter() - start)
            matcher.advance(token)
            assert not matcher.error, matcher.error
        return times


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(tok.token_bytes(), stop_token_ids=sorted(tok.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema))
        return lambda: self.xgr.GrammarMatcher(compiled)

    def walk(self, matcher, tokens, vocab):
        mask = self.xgr.allocate_token_bitmask(1, vocab)
        times = []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(token)
        return times


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core

        self.oc = outlines_core
        eos = min(tok.eos_ids)
        special = tok.special_ids
        pieces: dict[bytes, list[int]] = {}
        for i, piece in enumerate(tok.token_bytes()):
            if i not in special:
                pieces.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, pieces)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        index = self.oc.Index(regex, self.vocabulary)
        return lambda: self.oc.Guide(index)

    def walk(self, guide, tokens, vocab):
        mask = np.zeros((vocab + 31) // 32, np.int32)
        times = []
        for token in tokens:
            start = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
            times.append(time.perf_counter() - start)
            guide.advance(token, return_tokens=False)
        return times


ENGINES = {e.name: e for e in (LLGuidance, XGrammar, OutlinesCore)}


def measure(engine_cls, tok, label: str) -> list[dict]:
    start = time.perf_counter()
    engine = engine_cls(tok)
    setup_s = time.perf_counter() - start
    rows = []
    for name, (schema, instance) in SCHEMAS.items():
        tokens = tok.encode(json.dumps(instance))
        start = time.perf_counter()
        make_matcher = engine.compile(schema)
        matcher = make_matcher()
        compile_s = time.perf_counter() - start
        times = engine.walk(matcher, tokens, tok.vocab_size)
        rows.append(
            {
                "engine": engine.name,
                "vocab": f"{label} ({tok.vocab_size})",
                "schema": name,
                "tokenizer_setup_s": round(setup_s, 3),
                "compile_ms": round(1e3 * compile_s, 2),
                "mask_us_mean": round(1e6 * statistics.mean(times), 1),
                "mask_us_p99": round(1e6 * sorted(times)[int(0.99 * (len(times) - 1))], 1),
                "tokens": len(tokens),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama3-vocab", type=Path, help="a GGUF with a Llama-3 (128k) vocabulary")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    args = parser.parse_args()
    vocabs = [("SmolLM2", bundled_gguf_path())] + ([("Llama-3", args.llama3_vocab)] if args.llama3_vocab else [])
    for label, path in vocabs:
        tok = load_vocab(path)
        for name in args.engines.split(","):
            measure(ENGINES[name], tok, label)


if __name__ == "__main__":
    main()
