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
    pip install -q -e '.[demo]'
    mkdir -p "$OUT"
    python -m delf_index.pipelines.demo_corpus "$OUT/corpus"
    # extract -> fit -> build -> every image as a query -> metrics and report
    delf-index evaluate --images "$OUT/corpus/images" --groups "$OUT/corpus/groups.csv" --workdir "$OUT" \
      | tee "$OUT/evaluate.log"
    # one example query the index has not seen, with its matches drawn
    delf-index query --index "$OUT/index" "$OUT/corpus/queries/astronaut.jpg" --top 3 --visualize "$OUT/matches"
    echo
    echo "mAP (leave-one-out on the demo corpus): $(tail -n 1 "$OUT/evaluate.log")"
    echo "outputs:"
    echo "  $OUT/corpus/        the demo images, groups.csv, and queries/ (photos the index has not seen)"
    echo "  $OUT/features/      the features table: a Delta Lake table, failures included (docs/tables.md)"
    echo "  $OUT/codebooks/     PCA + PQ codebooks"
    echo "  $OUT/index/         the index artifact"
    echo "  $OUT/eval/          report.html (open it), report.md, metrics.json, pr.png, queries.parquet"
    echo "  $OUT/matches/       the example query's matches"
    ;;
  *)
    echo "usage: $0 [demo|test]" >&2
    exit 2
    ;;
esac
