#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch installed FIRST, then evomerge.
# torch comes first because a bare `torch` requirement would pull a multi-GB CUDA build here; GPU
# users set EVOMERGE_TORCH_SPEC (e.g. "torch==2.14.1") to get the build they want.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EVOMERGE_VENV:-.venv}"
TORCH_SPEC="${EVOMERGE_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EVOMERGE_EXTRAS:-evolve,test}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.evomerge-installed"
want="$TORCH_SPEC|$EXTRAS|$(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip's and the build backend's own messages go to a log; it is shown only when a step fails
log="$VENV/install.log"
: > "$log"
step() {
  if ! "$PY" -m pip install -q "$@" >>"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
    echo "setup: 'pip install $*' failed; the whole log is $log" >&2
    exit 1
  fi
}
echo "setup: installing into $VENV (torch first: $TORCH_SPEC; pip's output in $log)" >&2
"$PY" -m pip install -q --upgrade pip >>"$log" 2>&1 || true   # an old pip still works
step "$TORCH_SPEC"
step -e ".[$EXTRAS]"
"$PY" -c "import torch, merge" >/dev/null
echo "$want" > "$stamp"
