#!/usr/bin/env bash
# One GPU call's share of the Fashion-MNIST table: scripts/reproduce_fashion_mnist.sh on the rows that ROWS
# names (its other variables too: EPOCHS, FT_EPOCHS, PARALLEL, PRETRAIN_FLAGS, ...), stopped after LIMIT
# seconds, its records added to those of the earlier calls, all of it packed as one file in OUT_DIR.
#
#   ROWS="mdra-g1 mdra-g1-knn" EPOCHS=60 scripts/gpu_rows.sh [LIMIT] [OUT_DIR]    # LIMIT [480], OUT_DIR [$OUT]
#
# The records of the earlier calls travel with the working tree, in results/NAME (NAME [fashion-mnist]); a
# copy of them takes this call's finished rows (reproduce_fashion_mnist.sh's RESULTS: logs and tables, never
# checkpoints), and the whole folder comes back as OUT_DIR/NAME.tar.gz, with its table, OUT_DIR/results.md,
# and this call's output, OUT_DIR/console.txt: three files, as the GPU machine gives back at most 8. A time
# limit stops the rows as a signal does (each saves and exits), so that the finished ones are packed all the
# same; rows resume only within a call, as no checkpoint comes back. Then, here:
#
#   tar -xzf FILE -C results && python3 scripts/plot_curves.py results/NAME      # and commit results/NAME
#
# The rows run in RUN_DIR [runs/gpu-rows/NAME], the same folder in every call, so that a row's command, which
# names it, is the same in every call too (results/NAME keeps a row only once, of one command).
# Exit status: reproduce_fashion_mnist.sh's, or 124 when LIMIT stopped it.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-480}
OUT_DIR=${2:-${OUT:-}}
NAME=${NAME:-fashion-mnist}
RESULTS_ROOT=${RESULTS_ROOT:-results}
RUN_DIR=${RUN_DIR:-runs/gpu-rows/$NAME}
[ -n "$OUT_DIR" ] || { echo "gpu_rows.sh: no output folder: give OUT_DIR, or set OUT."; exit 2; }
[[ $LIMIT =~ ^[0-9]+$ ]] && [ "$LIMIT" -gt 0 ] || { echo "gpu_rows.sh: LIMIT must be a whole number of seconds, not $LIMIT."; exit 2; }
mkdir -p "$OUT_DIR" || exit 2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -d "$RESULTS_ROOT/$NAME" ]; then cp -r "$RESULTS_ROOT/$NAME" "$work/$NAME"; else mkdir -p "$work/$NAME"; fi

# timeout signals the whole process group: the script's rows save and exit, then its records are kept.
timeout --signal=TERM --kill-after=90 "$LIMIT" env RESULTS="$work/$NAME" \
    bash scripts/reproduce_fashion_mnist.sh "$RUN_DIR" 2>&1 | tee "$OUT_DIR/console.txt"
status=${PIPESTATUS[0]}
[ "$status" != 124 ] || echo "gpu_rows.sh: stopped after the limit of $LIMIT s; the finished rows are kept." | tee -a "$OUT_DIR/console.txt"

tar -czf "$OUT_DIR/$NAME.tar.gz" -C "$work" "$NAME"
[ ! -f "$work/$NAME/results.md" ] || cp "$work/$NAME/results.md" "$OUT_DIR/results.md"
echo "gpu_rows.sh: $OUT_DIR/$NAME.tar.gz holds results/$NAME with this call's rows ($(du -h "$OUT_DIR/$NAME.tar.gz" | cut -f1))"
exit "$status"
