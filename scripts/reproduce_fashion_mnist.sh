#!/usr/bin/env bash
# The whole pipeline on Fashion-MNIST with a ResNet-18 (small stem), and the table of results:
#   MDRA pretraining -> weighted kNN, fine-tuning on 1% and 10% of the labels, linear probe;
#   baselines: raw-pixel kNN, random-init kNN, supervised from scratch on the same 1% / 10% subsets,
#   and the ablation --groups 1 (relation alignment without subspaces).
#
#   scripts/reproduce_fashion_mnist.sh [OUT]          # OUT defaults to runs/fashion-mnist
#
# Every fine-tuning row (MDRA and from scratch alike) first fine-tunes once with each learning rate of
# FT_LRS, evaluated on HOLDOUT training images outside its labelled subset, and then once more with the
# best of them, evaluated on the test split: the test images choose nothing. The linear probe does the
# same with LINEAR_LRS, its trials holding the HOLDOUT images out of its labels.
#
# Environment (defaults in brackets): EPOCHS pretraining epochs [200], FT_EPOCHS fine-tuning epochs
# [100], LINEAR_EPOCHS linear-probe epochs [100], FT_LRS [0.3 0.1 0.03 0.01], LINEAR_LRS [FT_LRS],
# HOLDOUT [10000], DEVICE [auto], WORKERS [8], FLAGS extra flags for every script, PRETRAIN_FLAGS for
# mdra.py (e.g. --gpu-aug), FT_FLAGS for finetune.py, KNN_FLAGS for eval_knn.py, PARALLEL=1 runs
# independent rows at once (one GPU has room for several), ABLATION=0 skips the --groups 1 pretraining
# (it costs as much as the main one), DATA [fashion-mnist]
# (DATA=synthetic with small sizes in the *FLAGS checks the script end to end in a minute on a CPU:
#   DATA=synthetic EPOCHS=1 FT_EPOCHS=1 LINEAR_EPOCHS=1 WORKERS=0 DEVICE=cpu FLAGS="--synthetic-size 64" \
#   PRETRAIN_FLAGS="--queue-size 32 --img-size 16 --batch-size 16" FT_FLAGS="--batch-size 8" \
#   FT_LRS="0.1 0.01" HOLDOUT=16 KNN_FLAGS="--k 10 20" scripts/reproduce_fashion_mnist.sh /tmp/repro).
# Each row's log, wall time and results land in OUT/<row>/ (the learning-rate trials in
# OUT/lr-trials/<row>-lr<lr>/); the table in OUT/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fashion-mnist}
EPOCHS=${EPOCHS:-200}
FT_EPOCHS=${FT_EPOCHS:-100}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
FT_LRS=${FT_LRS:-0.3 0.1 0.03 0.01}
LINEAR_LRS=${LINEAR_LRS:-$FT_LRS}
HOLDOUT=${HOLDOUT:-10000}
COMMON="--data ${DATA:-fashion-mnist} --device ${DEVICE:-auto} --workers ${WORKERS:-8} ${FLAGS:-}"
mkdir -p "$OUT"

# The GPU if any, the CPU and its cores (all of them: nproc alone follows OMP_NUM_THREADS), and torch's
# version (from its metadata: importing torch takes seconds).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
HARDWARE="${gpu:+$gpu, }$(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc --all) cores),\
 torch $(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')"

# row NAME COMMAND...: run COMMAND; OUT/NAME/ keeps its output, command line, wall time and hardware.
# Running the script again resumes: finished rows are kept, and an interrupted or failed row runs
# again, where mdra.py and finetune.py resume from their checkpoints; its wall time adds up over the
# runs. Returns 1 if COMMAND failed (OUT/NAME/failed marks it), 2 if OUT/NAME is another command's.
row() {
    local name=$1; shift
    if [ -f "$OUT/$name/command" ] && [ "$(cat "$OUT/$name/command")" != "$*" ]; then
        echo "[$(date +%T)] $name: $OUT/$name was made by another command ($(cat "$OUT/$name/command")); use another OUT or remove it."
        return 2
    fi
    if [ -f "$OUT/$name/time_s" ]; then
        echo "[$(date +%T)] $name: finished in an earlier run, kept"; return 0
    fi
    mkdir -p "$OUT/$name"
    rm -f "$OUT/$name/failed"
    echo "$*" > "$OUT/$name/command"
    echo "$HARDWARE" > "$OUT/$name/hardware"
    local start; start=$(date +%s)
    echo "[$(date +%T)] $name: $*"
    trap 'add_elapsed "$OUT/$name" "$start"; exit 143' TERM INT  # after COMMAND has saved and exited
    if ! "$@" >> "$OUT/$name/output.log" 2>&1; then
        trap - TERM INT; add_elapsed "$OUT/$name" "$start"; touch "$OUT/$name/failed"
        echo "[$(date +%T)] $name FAILED; the end of $OUT/$name/output.log:"; tail -n 20 "$OUT/$name/output.log"; return 1
    fi
    trap - TERM INT; add_elapsed "$OUT/$name" "$start"
    mv "$OUT/$name/elapsed_s" "$OUT/$name/time_s"
    echo "[$(date +%T)] $name done in $(cat "$OUT/$name/time_s") s"
}

add_elapsed() {  # add_elapsed DIR START: DIR/elapsed_s += now - START
    echo $(( $(cat "$1/elapsed_s" 2>/dev/null || echo 0) + $(date +%s) - $2 )) > "$1/elapsed_s"
}

# finetune_row NAME EPOCHS "LR..." FLAGS...: finetune.py FLAGS for EPOCHS with the learning rate that
# is best on HOLDOUT held-out training images (each trial a row of its own), evaluated on the test split.
# A trial that fails (a rate that diverges stops finetune.py) only drops out of the choice.
finetune_row() {
    local name=$1 epochs=$2 lrs=($3) lr; shift 3
    [ ${#lrs[@]} -gt 0 ] || { echo "$name: no learning rate to try; give at least one."; return 1; }
    lr=${lrs[0]}
    if [ ${#lrs[@]} -gt 1 ]; then
        for lr in "${lrs[@]}"; do
            row "lr-trials/$name-lr$lr" python3 finetune.py "$@" --epochs "$epochs" --lr "$lr" \
                --holdout "$HOLDOUT" --eval-every "$epochs" --out-dir "$OUT/lr-trials/$name-lr$lr" || [ $? = 1 ]
        done
        lr=$(python3 scripts/results_table.py --best-lr "$OUT" "$name" "${lrs[@]}")
    fi
    row "$name" python3 finetune.py "$@" --epochs "$epochs" --lr "$lr" --out-dir "$OUT/$name"
}

# together "CMD" ...: run the commands one after another, or all at once with PARALLEL=1.
together() {
    if [ "${PARALLEL:-0}" = 1 ]; then
        local pids=() status=0
        for cmd in "$@"; do eval "$cmd" & pids+=($!); done
        # A signal (a time limit) stops the rows, which save first: leave only once they have, so that a
        # run started next does not meet them still writing.
        trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        trap - TERM INT
        return $status
    fi
    for cmd in "$@"; do eval "$cmd"; done
}

pretrain_chain() {  # MDRA (G = 4): pretraining, then everything that uses its backbone
    row mdra python3 mdra.py $COMMON --arch resnet18 --epochs "$EPOCHS" --out-dir "$OUT/mdra" ${PRETRAIN_FLAGS:-}
    local ckpt out lrs linear_lrs  # quoted for eval, as paths may hold spaces
    printf -v ckpt %q "$OUT/mdra/checkpoint.pth"; printf -v out %q "$OUT/mdra-knn/knn.json"
    printf -v lrs %q "$FT_LRS"; printf -v linear_lrs %q "$LINEAR_LRS"
    together \
        "row mdra-knn python3 eval_knn.py $COMMON --ckpt $ckpt ${KNN_FLAGS:-} --out $out" \
        "finetune_row mdra-ft1 $FT_EPOCHS $lrs $COMMON --ckpt $ckpt --label-fraction 0.01 ${FT_FLAGS:-}" \
        "finetune_row mdra-ft10 $FT_EPOCHS $lrs $COMMON --ckpt $ckpt --label-fraction 0.1 ${FT_FLAGS:-}" \
        "finetune_row mdra-linear $LINEAR_EPOCHS $linear_lrs $COMMON --ckpt $ckpt --linear --label-fraction 1.0 ${FT_FLAGS:-}"
}

ablation_chain() {  # the same run with one subspace
    row mdra-g1 python3 mdra.py $COMMON --arch resnet18 --groups 1 --epochs "$EPOCHS" --out-dir "$OUT/mdra-g1" ${PRETRAIN_FLAGS:-}
    row mdra-g1-knn python3 eval_knn.py $COMMON --ckpt "$OUT/mdra-g1/checkpoint.pth" ${KNN_FLAGS:-} --out "$OUT/mdra-g1-knn/knn.json"
}

baseline_chain() {  # no pretraining; the fine-tuning subsets are the same (same seed, same class-balanced draw)
    row pixels-knn python3 eval_knn.py $COMMON --pixels ${KNN_FLAGS:-} --out "$OUT/pixels-knn/knn.json"
    row random-knn python3 eval_knn.py $COMMON --random-init --arch resnet18 ${KNN_FLAGS:-} --out "$OUT/random-knn/knn.json"
    finetune_row scratch1 "$FT_EPOCHS" "$FT_LRS" $COMMON --random-init --arch resnet18 --label-fraction 0.01 ${FT_FLAGS:-}
    finetune_row scratch10 "$FT_EPOCHS" "$FT_LRS" $COMMON --random-init --arch resnet18 --label-fraction 0.1 ${FT_FLAGS:-}
}

chains=(pretrain_chain baseline_chain)
[ "${ABLATION:-1}" = 0 ] || chains+=(ablation_chain)
together "${chains[@]}"
python3 scripts/results_table.py "$OUT" > "$OUT/results.md.tmp"
mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
