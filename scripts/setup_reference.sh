#!/usr/bin/env bash
# Idempotent set-up of the reference toolkit (mergekit 0.1.5) for the differential suite
# (tests/test_reference_parity.py, scripts/reference_diff.py).
#
# It lives in a virtual environment of its own (default .cache/mergekit-0.1.5/, override with
# EVOMERGE_REFERENCE_VENV) because it pins its own dependencies: it is never installed into ours.
# torch is installed FIRST, with the same EVOMERGE_TORCH_SPEC default as scripts/setup.sh, so that
# mergekit's torch requirement does not pull a multi-GB CUDA build. A stamp file makes a second
# run instant.
#
# Exit codes: 0 ready; 3 the package registry cannot be reached (one line on stderr; the parity
# tests then skip, naming this cause); anything else: the install itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EVOMERGE_REFERENCE_VENV:-.cache/mergekit-0.1.5}"
TORCH_SPEC="${EVOMERGE_TORCH_SPEC:-torch==2.13.0}"
REF_SPEC="mergekit==0.1.5"
REGISTRY_UNREACHABLE=3
stamp="$VENV/.evomerge-reference-installed"
want="$TORCH_SPEC|$REF_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/mergekit-yaml" ]; then
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
quiet() { grep -v "^WARNING: Location" || true; }

# Can the registry serve the reference at all? Ask for its wheel alone, quickly, before the long
# installs, so that an offline machine gets one clear line instead of pip's retry noise.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
if ! "$PY" -m pip download -q --no-deps --retries 1 --timeout 15 -d "$probe" "$REF_SPEC" \
    >"$probe/log" 2>&1; then
  reason="$(grep -m1 '^ERROR' "$probe/log" || tail -n1 "$probe/log")"
  echo "setup_reference: the package registry is unreachable; $REF_SPEC could not be fetched" \
       "(${reason:0:200})" >&2
  exit $REGISTRY_UNREACHABLE
fi

"$PY" -m pip install -q --upgrade pip 2>&1 | quiet
"$PY" -m pip install -q "$TORCH_SPEC" 2>&1 | quiet
"$PY" -m pip install -q "$REF_SPEC" 2>&1 | quiet
"$PY" -c "import torch, mergekit.merge" >/dev/null
[ -x "$VENV/bin/mergekit-yaml" ]
echo "$want" > "$stamp"
