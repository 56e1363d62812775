"""Every GGUF tensor type the `gguf` package reads loads into the model's layout: a tiny `llama`
GGUF per type (written with gguf.GGUFWriter; weights quantized with gguf.quants.quantize, or, for
the K-quants it cannot quantize, random blocks with valid scales) loads to exactly the dequantized
reference in the model's layout, and the `rope_freqs` tensor becomes the RoPE factors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from serving.engine.loaders import gguf_loader

D, H, K, E, F, V = 256, 4, 2, 64, 256, 256  # K-quant blocks hold 256 values: rows of 256
# byte offsets of the float16 scale fields in one block of each K-quant (the rest is random)
K_QUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)


def _encode(values: np.ndarray, kind: Q, rng) -> np.ndarray:
    """`values` [rows, cols] stored as `kind` (random valid blocks for the K-quants)."""
    if kind in QUANTIZED:
        return gguf.quants.quantize(values, kind)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (values.shape[0] * values.shape[1] // block_size, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES[kind]:
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(values.shape[0], -1)


def _write(path, kind: Q) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF with every matrix stored as `kind`; returns the stored bytes by name."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("block_count", 1),
        ("embedding_length", D),
        ("feed_forward_length", F),
        ("attention.head_count", H),
        ("attention.head_count_kv", K),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_token_list([f"t{i}" for i in range(V)])
    matrices = {
        "token_embd": (V, D),
        "output": (V, D),
        "blk.0.attn_q": (H * E, D),
        "blk.0.attn_k": (K * E, D),
        "blk.0.attn_v": (K * E, D),
        "blk.0.attn_output": (D, H * E),
        "blk.0.ffn_gate": (F, D),
        "blk.0.ffn_up": (F, D),
        "blk.0.ffn_down": (D, F),
    }
    stored = {}
    for name, shape in matrices.items():
        stored[name] = _encode(rng.standard_normal(shape).astype(np.float32), kind, rng)
        writer.add_tensor(f"{name}.weight", stored[name], raw_dtype=kind)
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", rng.standard_normal(D).astype(np.float32))
    writer.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, E // 2).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("kind", QUANTIZED + tuple(K_QUANT_SCALES), ids=lambda kind: kind.name)
def test_every_tensor_type_loads_to_the_dequantized_reference(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gguf_loader, "DEQUANTIZE_CHUNK_ELEMENTS", 3 * 256)  # slabs of three rows
    stored = _write(tmp_path / "m.gguf", kind)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    cfg = gguf_loader.read_config(reader)
    params = gguf_loader.read_params(reader, cfg)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (D, H, K, E, False)
    np.testing.assert_allclose(cfg.rope_freq_factors, np.linspace(1.0, 8.0, E // 2), rtol=1e-6)

    def reference(name):
        values = gguf.quants.dequantize(stored[name], kind).astype(np.float32)
        assert np.isfinite(values).all() and values.std() > 0
        return values

    layer = params["layers"]
    expected = {
        "wq": gguf_loader.unpermute_rope_rows(reference("blk.0.attn_q"), H).reshape(H, E, D),
        "wk": gguf_loader.unpermute_rope_rows(reference("blk.0.attn_k"), K).reshape(K, E, D),
        "wv": reference("blk.0.attn_v").reshape(K, E, D),
        "wo": reference("blk.0.attn_output").reshape(D, H, E),
        "w_gate": reference("blk.0.ffn_gate"),
        "w_down": reference("blk.0.ffn_down"),
    }
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(layer[key])[0], value, err_msg=key)
    np.testing.assert_array_equal(np.asarray(params["embed"]), reference("token_embd"))
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), reference("output"))


def test_other_architectures_are_refused_naming_the_servable_ones(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gemma' is not served; servable: llama, qwen2"):
        gguf_loader.read_config(gguf.GGUFReader(str(tmp_path / "g.gguf")))
