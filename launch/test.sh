#!/usr/bin/env bash
# Set up .venv (first run) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
# DeepSpeed's CPU op is built once here, not inside a test's time limit
python -c "from jsm_dist.ds_ops import load_cpu_comm_op; load_cpu_comm_op()"
python -m pytest -q -rs "$@" tests
