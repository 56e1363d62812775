"""Offline checkpoint converter: any checkpoint the server loads -> this server's own `.npz`.

    python -m serving.convert OUT.npz [key=value ...]    # e.g. quantization=int8

The key=value arguments are the server's settings (serving/server/settings.py): which checkpoint
to read (load_parameters_path; default the bundled SmolLM2 GGUF) and the weight format to write.
With quantization=int8 the file holds the int8 weights and their scales, served with
`quantization=int8 checkpoint_is_quantized=true load_parameters_path=OUT.npz`. It lives beside
`__main__` because it joins the two halves: server settings in, engine loaders out.
"""

from __future__ import annotations

import sys

from serving.engine.loaders import load_checkpoint
from serving.engine.loaders.npz_loader import save_npz
from serving.server.settings import SettingsError, parse_settings


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = argv[0]
    try:
        settings = parse_settings(argv[1:])
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg, params, tokenizer = load_checkpoint(settings.engine_settings())
    save_npz(out, cfg, params, tokenizer)
    print(f"wrote {out} (int8 weights: {cfg.quantize_weights})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
