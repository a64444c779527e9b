#!/usr/bin/env bash
# Full-scale training on one GPU inside a fixed budget (issue 21), in one prepared run:
#   1. generate the data: flying shapes (3 objects, T = 20, 50,000 / 10,000 / 10,000 sequences,
#      studies/runs/flying_shapes.yaml) and static shapes (3 objects, 50,000 / 10,000 / 10,000)
#      into a cache on the machine ($NEM_DATA_DIR, default /tmp/nem-data);
#   2. RNN-EM K = 3 on flying shapes, most of the budget (train.time_budget_s), validating each
#      epoch and testing 1,000 test sequences after each (train.test_each_epoch: the AMI curve
#      against sequences seen), then the final test on all 10,000 with the best weights;
#   3. static shapes N-EM and RNN-EM (K = 3, 15 EM steps, 50,000 images), the time left, halved.
# Each part runs `nem-study train` under `timeout`, so one that hangs costs only its own share;
# a killed part keeps its last finished epoch (last.pt is written atomically every epoch).
#
# The GPU path: one seed, the whole training step replayed as one CUDA graph (train.cuda_graph,
# on by default on CUDA), fp32, batch 64 as in the paper. fp32 because bf16 autocast was
# 0.89-1.03x fp32 on every GPU path measured (BENCHMARKS.md "GPU"; train.precision auto also
# picks fp32 on a GPU). No ensemble: the seeds-at-once path (`ensemble: true`) exists only in
# Ray studies (ray and mlflow are not on the GPU image), and it was faster per sequence than one
# graphed trial only when it trained several seeds (1.38x at 4, 1.60x at 8; 0.83x at 2): one
# graphed trial already keeps the GPU busy. Runs one after another, not side by side: the GPU
# time-slices between processes without MPS, and the reported sequences/s stay each run's own.
#
# Usage, from the repository root:
#   bash bench/gpu_full_scale.sh                  # on a GPU: about BUDGET_S seconds in all
#   QUICK=1 nice -n 10 bash bench/gpu_full_scale.sh   # CPU smoke run, tiny data, ~2 minutes
#   RESUME=gpu_prev bash bench/gpu_full_scale.sh  # continue the runs of an earlier OUT folder
# Environment: OUT (output folder, default gpu_out), BUDGET_S (seconds in all, default 540;
# QUICK 150), QUICK=1 (a few hundred sequences, CPU allowed), RESUME (an earlier OUT, or a folder
# holding <run>/last.pt), PYTHON (default .venv/bin/python if there, else python3),
# NEM_DATA_DIR (data cache, default /tmp/nem-data). The whole script ends within BUDGET_S + ~25 s.
#
# $OUT receives at most 8 plain files (the device tool's limit), no folders:
#   checkpoints.tar.00 ...   one tar of <run>/last.pt for the three runs, split into 15 MiB parts
#                            (the flying-shapes last.pt is ~39 MiB: 3.4 M weights + Adam's two
#                            moments; the device tool returns files of at most 16 MiB)
#   metrics.json             per run: the trainer's metrics (final test) and the per-epoch history
#                            (valid/test AMI, sequences_per_second, sequences_seen)
#   summary.json             per run: epochs, sequences seen, sequences/s, test AMI; GPU name
#   log.txt                  everything printed
# RESUME=<that folder> joins the parts (checked against summary.json's sha256) and continues each
# run with `nem-study train --resume` (model, Adam, epoch counter, history, best loss): epochs
# count on, shuffling and noise depend on (seed, epoch) only, and the time budget is the earlier
# epochs' seconds plus this run's share. best.pt is not returned (size), so a resumed run's final
# test uses its own best epoch if it improved on the earlier best, else its last weights.
#
# With the device tool (one `run` call; the wheels are pydantic and platformdirs with their
# dependencies, missing from the GPU image; the script installs them when pydantic is missing).
# Fetch them first, here, into the git-ignored .whl/ (2.9 MB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     platformdirs==4.14.9 typing_extensions==4.16.0
#   run(command="bash bench/gpu_full_scale.sh", carry=[".whl"], timeout_s=600)
# To continue that run in a later call: copy the returned files into an ignored folder of the
# repository (`mkdir -p gpu_prev && cp <files_at>/* gpu_prev/`; .git/info/exclude: /gpu_prev/),
#   run(command="RESUME=gpu_prev bash bench/gpu_full_scale.sh", carry=[".whl", "gpu_prev"], timeout_s=600)
# (~47 MiB of checkpoints: the working tree must stay under the tool's 64 MiB.)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
QUICK=${QUICK:-0}
[ "$QUICK" = 1 ] || QUICK=0
BUDGET_S=${BUDGET_S:-$([ "$QUICK" = 1 ] && echo 150 || echo 540)}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nem-full-scale.XXXXXX") || exit 1
RUNS="flying_shapes static_nem static_rnn_em"
export NEM_DATA_DIR=${NEM_DATA_DIR:-/tmp/nem-data}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
die() { echo "gpu_full_scale: $*" >&2; exit 1; }

# ---- an earlier run to continue: unpacked into $WORK/resume/<run>/last.pt before $OUT is reused
RESUMED_FROM=null
if [ -n "${RESUME:-}" ]; then
    [ -d "$RESUME" ] || die "RESUME=$RESUME: no such folder"
    RESUME=$(cd "$RESUME" && pwd)
    RESUMED_FROM="\"$(basename "$RESUME")\""
    mkdir -p "$WORK/resume"
    if compgen -G "$RESUME/checkpoints.tar.[0-9][0-9]" >/dev/null; then
        cat "$RESUME"/checkpoints.tar.[0-9][0-9] >"$WORK/resume.tar" || die "cannot join $RESUME/checkpoints.tar.*"
        want=$(grep -o '"sha256": "[0-9a-f]*"' "$RESUME/summary.json" 2>/dev/null | grep -o '[0-9a-f]\{64\}')
        got=$(sha256sum "$WORK/resume.tar" | cut -d' ' -f1)
        [ -z "$want" ] || [ "$want" = "$got" ] || die "RESUME: checkpoints.tar parts do not match summary.json's sha256"
        tar -xf "$WORK/resume.tar" -C "$WORK/resume" || die "RESUME: cannot unpack checkpoints.tar"
        rm -f "$WORK/resume.tar"
    else
        for r in $RUNS; do
            [ -f "$RESUME/$r/last.pt" ] && mkdir -p "$WORK/resume/$r" && cp "$RESUME/$r/last.pt" "$WORK/resume/$r/"
        done
    fi
    if grep -q '"quick": true' "$RESUME/summary.json" 2>/dev/null && [ "$QUICK" = 0 ]; then
        echo "warning: RESUME holds a QUICK run; continuing it on the full data is not an exact continuation" >&2
    fi
fi
rm -f "$OUT"/checkpoints.tar.[0-9][0-9] "$OUT/metrics.json" "$OUT/summary.json" "$OUT/log.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "gpu_full_scale: $(date -u +%FT%TZ), QUICK=$QUICK, BUDGET_S=$BUDGET_S, RESUME=${RESUME:+$(basename "$RESUME")}"

# ---- Python: the image's python3 has torch with CUDA; pydantic and platformdirs travel as wheels
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # we cd to $WORK
if ! "$PY" -c 'import pydantic, platformdirs' 2>/dev/null; then
    compgen -G ".whl/*.whl" >/dev/null || die "$PY lacks pydantic/platformdirs and there is no .whl/ to install them from"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl || die "installing .whl/*.whl failed"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HELP="$REPO/bench/gpu_full_scale.py"
timeout 120 "$PY" "$HELP" env "$WORK/env.json" || die "python/torch check failed"
if grep -q '"device": "cuda"' "$WORK/env.json"; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    DEVICE=cuda
elif [ "$QUICK" = 1 ]; then
    DEVICE=cpu
else
    die "torch sees no CUDA device (QUICK=1 runs on a CPU)"
fi

# ---- sizes and time shares (seconds). A part's limit = its training budget + its margin: start-up
# (imports, data open, graph capture), the epoch that overruns the budget (the trainer checks it
# after each epoch; ~20-25 s for flying shapes at ~2,800 sequences/s), the final test, the plots.
if [ "$QUICK" = 1 ]; then
    FLY_DATA="train=128 valid=64 test=64"; STATIC_DATA="train=512 valid=128 test=128"
    EVAL=(--set train.valid_samples=64 --set train.test_each_epoch=64 --set train.test_samples=64)
    FLY_MARGIN=30; STATIC_MIN=30; STATIC_MARGIN=18; END_RESERVE=15
    EXTRA=(--set train.threads=2)
else
    FLY_DATA="train=50000 valid=10000 test=10000"; STATIC_DATA="$FLY_DATA"
    EVAL=(--set train.valid_samples=1000 --set train.test_each_epoch=1000)   # final test: all 10,000
    FLY_MARGIN=90; STATIC_MIN=65; STATIC_MARGIN=35; END_RESERVE=15
    EXTRA=()
fi
COMMON=(--set train.device="$DEVICE" --set train.precision=fp32 --set train.cuda_graph=true
        --set train.batch_size=64 --set train.seed=0 "${EVAL[@]}" "${EXTRA[@]}")
data_sets() { for kv in $1; do printf -- '--set data.%s ' "$kv"; done; }   # run-config keys
spec_sets() { for kv in $1; do printf -- '--set %s ' "$kv"; done; }        # data-spec keys

cd "$WORK" || exit 1
cp "$REPO/studies/runs/flying_shapes.yaml" flying_shapes.yaml
for kind in nem rnn_em; do
    cat >"static_$kind.yaml" <<EOF
# Static shapes (NEM_SPEC.md §6): K = 3, 15 EM steps, bitflip 0.1; written by bench/gpu_full_scale.sh
data: {name: static_shapes, objects: 3, train: 50000, valid: 10000, test: 10000}
model: {kind: $kind, k: 3, em_steps: 15}
noise: {kind: bitflip, prob: 0.1}
train: {lr: 0.001, batch_size: 64}
EOF
done

echo; echo "## data -> \$NEM_DATA_DIR ($(left) s left)"
t0=$(now)
# shellcheck disable=SC2046
timeout -k 10 240 "$PY" -m nem_study.cli data generate flying_shapes.yaml $(spec_sets "$FLY_DATA") \
    || die "generating flying shapes failed"
# shellcheck disable=SC2046
timeout -k 10 120 "$PY" -m nem_study.cli data generate static_nem.yaml $(spec_sets "$STATIC_DATA") \
    || die "generating static shapes failed"
DATA_S=$(( $(now) - t0 ))
echo "data ready in $DATA_S s"
commit=${COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}   # no .git there: COMMIT=
cat >run.json <<EOF
{"started": $START, "budget_s": $BUDGET_S, "quick": $([ "$QUICK" = 1 ] && echo true || echo false),
 "resumed_from": $RESUMED_FROM, "commit": "$commit", "data_seconds": $DATA_S,
 "batch_size": 64, "precision": "fp32", "cuda_graph": $([ "$DEVICE" = cuda ] && echo true || echo false), "ensemble": false, "seed": 0}
EOF

# part NAME CONFIG LIMIT_S MARGIN_S DATA: train one run within LIMIT_S seconds of wall time
part() {
    local name=$1 config=$2 limit=$3 margin=$4 data=$5
    local budget=$((limit - margin)) resume=() prior_epoch=0 prior_s=0
    [ "$limit" -ge 20 ] || limit=20      # a BUDGET_S too small for all three: each still tries
    budget=$((limit - margin))
    [ "$budget" -ge 5 ] || budget=5
    if [ -f "resume/$name/last.pt" ]; then
        read -r prior_epoch prior_s < <(timeout 60 "$PY" "$HELP" prior "resume/$name/last.pt") \
            || { echo "cannot read resume/$name/last.pt: starting $name afresh"; prior_epoch=0; prior_s=0; }
        [ "$prior_epoch" -gt 0 ] && resume=(--resume "resume/$name/last.pt")
    fi
    mkdir -p "$name"
    printf '{"epoch": %s, "seconds": %s}\n' "$prior_epoch" "$prior_s" >"$name/prior.json"
    # the trainer's budget counts a resumed run's earlier epochs: add them
    local total
    total=$(( ${prior_s%.*} + budget ))
    echo; echo "## $name: ${budget} s of training (time_budget_s $total), limit ${limit} s, from epoch $prior_epoch ($(left) s left)"
    local t0 rc
    t0=$(now)
    # shellcheck disable=SC2046
    timeout -k 10 "$limit" "$PY" -m nem_study.cli train "$config" --out "$name" "${resume[@]}" \
        "${COMMON[@]}" $(data_sets "$data") --set train.time_budget_s="$total"
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "$name: stopped by its ${limit} s limit (last.pt holds its last finished epoch)"
    # nothing trained (a failure before the first epoch): keep the earlier checkpoint to resume from
    [ -f "$name/last.pt" ] || { [ -f "resume/$name/last.pt" ] && cp "resume/$name/last.pt" "$name/"; }
    printf '{"rc": %d, "wall_s": %d, "time_budget_s": %s, "limit_s": %d}\n' \
        "$rc" $(( $(now) - t0 )) "$budget" "$limit" >"$name/part.json"
}

rest=$(left)
part flying_shapes flying_shapes.yaml $((rest - 2 * STATIC_MIN - END_RESERVE)) "$FLY_MARGIN" "$FLY_DATA"
rest=$(left)
part static_nem static_nem.yaml $(((rest - END_RESERVE) / 2)) "$STATIC_MARGIN" "$STATIC_DATA"
rest=$(left)
part static_rnn_em static_rnn_em.yaml $((rest - END_RESERVE)) "$STATIC_MARGIN" "$STATIC_DATA"

echo; echo "## results -> $(basename "$OUT") ($(left) s left)"
members=()
for r in $RUNS; do [ -f "$r/last.pt" ] && members+=("$r/last.pt"); done
if [ "${#members[@]}" -gt 0 ]; then
    tar -cf checkpoints.tar "${members[@]}" && split -b 15M -d -a 2 checkpoints.tar "$OUT/checkpoints.tar."
fi
# shellcheck disable=SC2086
timeout -k 5 60 "$PY" "$HELP" collect "$WORK" "$OUT" $RUNS || echo "collect failed"
ls -l "$OUT"
echo "gpu_full_scale: done in $(( $(now) - START )) s (budget $BUDGET_S s)"
cd "$REPO" && rm -rf "$WORK"
