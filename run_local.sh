#!/usr/bin/env bash
# delf-index on this machine.
#   ./run_local.sh          set up a virtualenv and run the demo end to end
#   ./run_local.sh test     install the dev extras and run the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
OUT=${OUT:-outputs/demo}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip >/dev/null

case "${1:-demo}" in
  test)
    # torch 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build
    pip install -q torch==2.13.0
    pip install -q -e '.[model,dev]'
    ruff check .
    python -m pytest -q tests
    ;;
  demo)
    pip install -q -e '.[dev]'
    mkdir -p "$OUT"
    python - "$OUT" <<'PY'
import sys
from PIL import Image
from skimage import data
Image.fromarray(data.astronaut()).save(f"{sys.argv[1]}/astronaut.jpg", quality=95)
PY
    delf-index extract-image "$OUT/astronaut.jpg" --output "$OUT/astronaut.npz"
    ;;
  *)
    echo "usage: $0 [demo|test]" >&2
    exit 2
    ;;
esac
