#!/usr/bin/env bash
# The rehearsal knob measurements of issue 17, one T = N eval per setting on ZsRE dev records 0-N,
# each against the preset (only the named flags change). Resumable: every run checkpoints, and a
# setting whose JSON exists is skipped, so rerunning the same command picks up where it stopped.
#
#   bash tools/rehearsal_knobs.sh OUT_DIR CORE EDITS [NAME ...]
#       OUT_DIR  where each setting's JSON, report and checkpoint go (OUT_DIR/NAME/...)
#       CORE     the CPU core to pin to (two runs side by side: one per core, OMP_NUM_THREADS=1)
#       EDITS    T (100 or 250)
#       NAME     settings to run (default: all, in the order below)
#
# Example, both cores of this machine:  bash tools/rehearsal_knobs.sh knobs 0 100 r2 r8 recent floor05 &
#                                       bash tools/rehearsal_knobs.sh knobs 1 100 weight05 weight2 prefixes wd0 &
set -euo pipefail
out=$1 core=$2 edits=$3; shift 3
PY=${PY:-python}

# The faithful recipe (the reference's MEMOIR: no rehearsal, no end label, no chat row, 30 steps,
# the reference's stop), for the decay settings measured without rehearsal.
FAITHFUL="--rehearse 0 --answer-end none --train-chat off --n-iter 30 --early-stop-delta 1e-4"
declare -A FLAGS=(
    [preset]=""
    [r2]="--rehearse 2"
    [r8]="--rehearse 8"
    [recent]="--rehearse-select recent"
    [floor05]="--rehearse-min-overlap 0.5"
    [weight05]="--rehearse-weight 0.5"
    [weight2]="--rehearse-weight 2"
    [prefixes]="--rehearse-prefixes"
    [masked]="--decay-scope masked"
    [wd0]="--weight-decay 0"
    [faithful_masked]="$FAITHFUL --decay-scope masked"
    [faithful_wd0]="$FAITHFUL --weight-decay 0"
    [r8_wd0]="--rehearse 8 --weight-decay 0"
)
ORDER=(preset r2 r8 recent floor05 weight05 weight2 prefixes masked wd0 faithful_masked faithful_wd0 r8_wd0)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")

for name in "${names[@]}"; do
    [ -n "${FLAGS[$name]+set}" ] || { echo "unknown setting $name (known: ${ORDER[*]})" >&2; exit 2; }
    dir=$out/$name
    if [ -f "$dir/t$edits.json" ]; then echo "$name: done ($dir/t$edits.json)"; continue; fi
    mkdir -p "$dir"
    echo "$name: $PY -m memoir eval --edits $edits ${FLAGS[$name]}"
    # shellcheck disable=SC2086  # the flags are meant to split
    OMP_NUM_THREADS=1 taskset -c "$core" $PY -m memoir eval --edits "$edits" ${FLAGS[$name]} --quiet \
        --curve-points 4 --checkpoint "$dir/ckpt_t$edits" --checkpoint-every 10 \
        --out "$dir/t$edits.json" --report "$dir/report_t$edits" > "$dir/log_t$edits" 2>&1
    $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], 'Rel %.3f Gen %.3f Loc %.3f' % (d['rel'], d['gen'], d['loc']), 'steps %.1f median s %.1f' % (d['mean_iterations'], d['median_sec_per_edit']), 'by age', [round(x, 2) for x in d['rel_by_age_quarter']])" "$dir/t$edits.json" "$name"
done
