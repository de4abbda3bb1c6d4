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
.venv/bin/python -m pip install -q --no-deps -e .
