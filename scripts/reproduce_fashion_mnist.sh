#!/usr/bin/env bash
# The whole pipeline on Fashion-MNIST with a ResNet-18 (small stem), and the table of results:
#   MDRA pretraining -> weighted kNN, fine-tuning on 1% and 10% of the labels, linear probe;
#   baselines: raw-pixel kNN, random-init kNN, supervised from scratch on the same 1% / 10% subsets;
#   ablations, each one mdra.py flag: --groups 1 (relation alignment without subspaces), --sinkhorn-iters 0
#   (no balance constraint), --no-predictor, --no-cross; and a second seed of MDRA and of G = 1.
#
#   scripts/reproduce_fashion_mnist.sh [OUT]          # OUT defaults to runs/fashion-mnist
#   ROWS="ablations seeds" scripts/reproduce_fashion_mnist.sh [OUT]
#   timeout --signal=TERM 3600 scripts/reproduce_fashion_mnist.sh [OUT]   # stopped after an hour
#
# Rows: the pretrainings mdra, mdra-seed1, mdra-g1, mdra-g1-seed1, mdra-nobalance, mdra-nopredictor,
# mdra-nocross; for each pretraining P the rows that use its backbone, P-knn, P-ft1, P-ft10 (fine-tuned on
# 1% / 10% of the labels), P-linear and P-hknn (the kNN of HOLDOUT training images against a bank of the
# others: eval_knn.py --holdout, which never sees the test split); the baselines pixels-knn, random-knn,
# scratch1, scratch10. ROWS names the rows to run, and these sets of them: default (mdra and its four rows,
# the baselines, mdra-g1 and mdra-g1-knn), ablations (the kNN of each ablation), seeds (mdra-seed1-knn,
# mdra-seed1-linear, mdra-g1-seed1-knn). A row brings the pretraining whose backbone it uses.
#
# A signal (SIGTERM, SIGINT; timeout sends SIGTERM to the whole process group) stops every running row:
# each saves its checkpoint and exits, and running the script again with the same OUT resumes them.
#
# Every fine-tuning row (MDRA and from scratch alike) first fine-tunes once with each learning rate of
# FT_LRS, evaluated on HOLDOUT training images outside its labelled subset, and then once more with the
# best of them, evaluated on the test split: the test images choose nothing. The linear probe does the
# same with LINEAR_LRS, its trials holding the HOLDOUT images out of its labels.
#
# Environment (defaults in brackets): ROWS [default], ARCH the network of the pretrainings and of the
# random-init baselines (the other rows take their pretraining's) [resnet18], EPOCHS pretraining epochs
# [200], FT_EPOCHS fine-tuning epochs [100], LINEAR_EPOCHS linear-probe epochs [100], FT_LRS [0.3 0.1 0.03
# 0.01], LINEAR_LRS [FT_LRS], HOLDOUT [10000], DEVICE [auto], WORKERS [8], FLAGS extra flags for every script,
# PRETRAIN_FLAGS for mdra.py (e.g. --gpu-aug), FT_FLAGS for finetune.py, KNN_FLAGS for eval_knn.py,
# PARALLEL=1 runs independent rows at once (one GPU has room for several), ABLATION=0 leaves mdra-g1 and
# mdra-g1-knn out of the default rows (they cost as much as the main pretraining), DATA [fashion-mnist],
# RESULTS a folder that keeps the records of the finished rows (no checkpoints), also when the run is
# stopped, and the table of every row it holds: separate runs (each on its own machine) accumulate there;
# DRY_RUN=1 prints the command of every row that would run (a fine-tuning row's lr as <best of ...> while
# its trials are unfinished) and runs nothing, to plan a run.
# (DATA=synthetic:N with a small network and small sizes checks the script end to end in a minute on a CPU:
#   DATA=synthetic:64 ARCH=resnet10-w8 EPOCHS=1 FT_EPOCHS=1 LINEAR_EPOCHS=1 WORKERS=0 DEVICE=cpu \
#   FLAGS="--img-size 8" PRETRAIN_FLAGS="--hidden-dim 32 --queue-size 32 --batch-size 16" FT_FLAGS="--batch-size 8" \
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
ARCH=${ARCH:-resnet18}
COMMON="--data ${DATA:-fashion-mnist} --device ${DEVICE:-auto} --workers ${WORKERS:-8} ${FLAGS:-}"

# The pretraining rows and their mdra.py flags; scripts/results_table.py names them in the table.
PRETRAININGS=(mdra mdra-seed1 mdra-g1 mdra-g1-seed1 mdra-nobalance mdra-nopredictor mdra-nocross)
declare -A PRETRAIN_ARGS=([mdra]="" [mdra-seed1]="--seed 1" [mdra-g1]="--groups 1" [mdra-g1-seed1]="--groups 1 --seed 1"
                          [mdra-nobalance]="--sinkhorn-iters 0" [mdra-nopredictor]="--no-predictor"
                          [mdra-nocross]="--no-cross")
USES=(knn ft1 ft10 linear hknn)  # the rows P-knn, P-ft1, P-ft10, P-linear, P-hknn of every pretraining P
BASELINES=(pixels-knn random-knn scratch1 scratch10)

selected=()
for name in ${ROWS:-default}; do
    case $name in
        default) selected+=(mdra mdra-knn mdra-ft1 mdra-ft10 mdra-linear "${BASELINES[@]}")
                 [ "${ABLATION:-1}" = 0 ] || selected+=(mdra-g1 mdra-g1-knn) ;;
        ablations) selected+=(mdra-g1-knn mdra-nobalance-knn mdra-nopredictor-knn mdra-nocross-knn) ;;
        seeds) selected+=(mdra-seed1-knn mdra-seed1-linear mdra-g1-seed1-knn) ;;
        *) selected+=("$name") ;;
    esac
done
known=" ${BASELINES[*]} "
for p in "${PRETRAININGS[@]}"; do known+="$p ${USES[*]/#/$p-} "; done
for name in "${selected[@]}"; do
    [[ $known == *" $name "* ]] || { echo "ROWS: no row $name; a row is a pretraining (${PRETRAININGS[*]}), one of them" \
        "followed by -knn, -ft1, -ft10, -linear or -hknn, a baseline (${BASELINES[*]}), or the set default," \
        "ablations or seeds."; exit 2; }
done
wanted() { [[ " ${selected[*]} " == *" $1 "* ]]; }

[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$OUT"

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
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "[dry run] $name: $*"; return 0; fi
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
        if [ "${DRY_RUN:-0}" = 1 ] && ! all_finished "$name" "${lrs[@]}"; then
            lr="<best of ${lrs[*]}>"
        else
            lr=$(python3 scripts/results_table.py --best-lr "$OUT" "$name" "${lrs[@]}")
        fi
    fi
    row "$name" python3 finetune.py "$@" --epochs "$epochs" --lr "$lr" --out-dir "$OUT/$name" || return $?
    # the rates it was chosen from: the table lists those trials, not others an earlier FT_LRS left
    if [ ${#lrs[@]} -gt 1 ] && [ "${DRY_RUN:-0}" != 1 ]; then echo "${lrs[*]}" > "$OUT/$name/lrs"; fi
}

all_finished() {  # all_finished NAME LR...: every learning-rate trial of NAME has finished or failed
    local name=$1 lr; shift
    for lr in "$@"; do
        [ -f "$OUT/lr-trials/$name-lr$lr/time_s" ] || [ -f "$OUT/lr-trials/$name-lr$lr/failed" ] || return 1
    done
}

# together "CMD" ...: run the commands one after another, or all at once with PARALLEL=1 (not in a dry run).
together() {
    if [ "${PARALLEL:-0}" = 1 ] && [ "${DRY_RUN:-0}" != 1 ]; then
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

pretrain_chain() {  # pretrain_chain P: the pretraining P, then the chosen rows that use its backbone
    local p=$1 ckpt out lrs linear_lrs uses=()
    row "$p" python3 mdra.py $COMMON --arch "$ARCH" ${PRETRAIN_ARGS[$p]} --epochs "$EPOCHS" --out-dir "$OUT/$p" ${PRETRAIN_FLAGS:-}
    # quoted for eval, as paths may hold spaces
    printf -v ckpt %q "$OUT/$p/checkpoint.pth"; printf -v out %q "$OUT/$p-knn/knn.json"
    printf -v lrs %q "$FT_LRS"; printf -v linear_lrs %q "$LINEAR_LRS"
    if wanted "$p-knn"; then uses+=("row $p-knn python3 eval_knn.py $COMMON --ckpt $ckpt ${KNN_FLAGS:-} --out $out"); fi
    if wanted "$p-hknn"; then
        printf -v out %q "$OUT/$p-hknn/knn.json"
        uses+=("row $p-hknn python3 eval_knn.py $COMMON --ckpt $ckpt --holdout $HOLDOUT ${KNN_FLAGS:-} --out $out")
    fi
    if wanted "$p-ft1"; then
        uses+=("finetune_row $p-ft1 $FT_EPOCHS $lrs $COMMON --ckpt $ckpt --label-fraction 0.01 ${FT_FLAGS:-}")
    fi
    if wanted "$p-ft10"; then
        uses+=("finetune_row $p-ft10 $FT_EPOCHS $lrs $COMMON --ckpt $ckpt --label-fraction 0.1 ${FT_FLAGS:-}")
    fi
    if wanted "$p-linear"; then
        uses+=("finetune_row $p-linear $LINEAR_EPOCHS $linear_lrs $COMMON --ckpt $ckpt --linear --label-fraction 1.0 ${FT_FLAGS:-}")
    fi
    together "${uses[@]}"
}

baseline_chain() {  # no pretraining; the fine-tuning subsets are the same (same seed, same class-balanced draw)
    if wanted pixels-knn; then row pixels-knn python3 eval_knn.py $COMMON --pixels ${KNN_FLAGS:-} --out "$OUT/pixels-knn/knn.json"; fi
    if wanted random-knn; then
        row random-knn python3 eval_knn.py $COMMON --random-init --arch "$ARCH" ${KNN_FLAGS:-} --out "$OUT/random-knn/knn.json"
    fi
    if wanted scratch1; then
        finetune_row scratch1 "$FT_EPOCHS" "$FT_LRS" $COMMON --random-init --arch "$ARCH" --label-fraction 0.01 ${FT_FLAGS:-}
    fi
    if wanted scratch10; then
        finetune_row scratch10 "$FT_EPOCHS" "$FT_LRS" $COMMON --random-init --arch "$ARCH" --label-fraction 0.1 ${FT_FLAGS:-}
    fi
}

# pretraining_of ROW: the pretraining whose backbone ROW (or its learning-rate trial) uses; empty for a
# pretraining or a baseline.
pretraining_of() {
    local name=$1
    [[ $name != lr-trials/* ]] || { name=${name#lr-trials/}; name=${name%-lr*}; }
    [[ " ${USES[*]} " == *" ${name##*-} "* ]] || return 0
    [[ " ${PRETRAININGS[*]} " == *" ${name%-*} "* ]] && echo "${name%-*}"
    return 0
}

# keep_records: the finished rows' records, no checkpoints, into RESULTS (and the failed ones' where it has
# no finished one), and the table of all it holds. A finished record of another command is not replaced,
# and a row that uses a pretraining is kept only beside the record of that same pretraining.
keep_records() {
    local dir name file pass pretraining
    mkdir -p "$RESULTS"
    for pass in pretrainings uses; do  # the pretrainings (and baselines) first: the rows that use them check them
        for dir in "$OUT"/*/ "$OUT"/lr-trials/*/; do
            [ -d "$dir" ] || continue  # an unmatched glob
            name=${dir#"$OUT"/}; name=${name%/}
            [ "$name" != lr-trials ] || continue
            pretraining=$(pretraining_of "$name")
            if [ $pass = pretrainings ] && [ -n "$pretraining" ]; then continue; fi
            if [ $pass = uses ] && [ -z "$pretraining" ]; then continue; fi
            [ -f "$dir/time_s" ] || { [ -f "$dir/failed" ] && [ ! -f "$RESULTS/$name/time_s" ]; } || continue
            if [ -f "$RESULTS/$name/time_s" ] && ! cmp -s "$RESULTS/$name/command" "$dir/command"; then
                echo "RESULTS: $RESULTS/$name holds another command's row ($(cat "$RESULTS/$name/command"));" \
                     "not replaced."
                continue
            fi
            if [ -n "$pretraining" ] && ! cmp -s "$RESULTS/$pretraining/command" "$OUT/$pretraining/command"; then
                echo "RESULTS: $name not kept: it uses $OUT/$pretraining, which $RESULTS does not hold as made by" \
                     "the same command."
                continue
            fi
            rm -rf "${RESULTS:?}/$name"; mkdir -p "$RESULTS/$name"
            for file in command hardware time_s elapsed_s failed lrs log.jsonl knn.json; do
                [ ! -f "$dir/$file" ] || cp "$dir/$file" "$RESULTS/$name/"
            done
        done
    done
    python3 scripts/results_table.py "$RESULTS" > "$RESULTS/results.md.tmp" && mv "$RESULTS/results.md.tmp" "$RESULTS/results.md"
}
[ -z "${RESULTS:-}" ] || [ "${DRY_RUN:-0}" = 1 ] || trap keep_records EXIT  # also when a row fails or a time limit stops the run

chains=()
for p in "${PRETRAININGS[@]}"; do
    for name in "$p" "${USES[@]/#/$p-}"; do
        if wanted "$name"; then chains+=("pretrain_chain $p"); break; fi
    done
    [ "$p" != mdra ] || chains+=(baseline_chain)
done
together "${chains[@]}"
[ "${DRY_RUN:-0}" != 1 ] || exit 0
python3 scripts/results_table.py "$OUT" > "$OUT/results.md.tmp"
mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
