#!/usr/bin/env bash
# Set up .venv (first run) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
python -m pytest -q -rs "$@" tests
