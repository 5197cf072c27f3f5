#!/usr/bin/env bash
# Real-data benchmark, T1 (labelled source) -> T2 (unlabelled target), on BraTS-style data.
#
#   benchmarks/real_data_t1_t2.sh [DATA_DIR] [OUT_DIR] [CONFIG] [extra key=value overrides...]
#
# Trains source-only, BiGL and target-only with the same network and config on the training cases,
# then evaluates them, and the no-learning baseline (source-only model on the T2 image after
# inverting it inside the brain and matching its histogram to the T1 images of the training cases),
# on the T2 images of the report cases. Report-case labels are read only by `bigl evaluate` at the
# end: they take part in no training, no checkpoint choice and no tuning. The report cases are fixed
# here, before any run.
set -euo pipefail

DATA=${1:-../shared/data/brats18}
OUT=${2:-runs/brats-t1-t2}
CONFIG=${3:-cpu}
shift $(( $# < 3 ? $# : 3 ))
EXTRA=("$@")
BIGL=${BIGL:-bigl}

# One case from each contributing group of the 21-case set, chosen before any training.
REPORT_CASES='["Brats18_2013_2_1","Brats18_CBICA_AQN_1","Brats18_TCIA01_425_1","Brats18_TCIA02_606_1","Brats18_TCIA10_639_1"]'
REPORT_LIST=$(python3 -c "import json,sys; print(','.join(json.loads(sys.argv[1])))" "$REPORT_CASES")

COMMON=("data.source_dir=$DATA" "data.target_dir=$DATA" "data.source_modality=t1" "data.target_modality=t2"
        "data.exclude=$REPORT_CASES" "${EXTRA[@]}")
mkdir -p "$OUT"
time_it() { local name=$1; shift; local start=$(date +%s); "$@"; echo "$name $(( $(date +%s) - start ))" >> "$OUT/wall_seconds.txt"; }

time_it source-only $BIGL train --config "$CONFIG" --out "$OUT/source-only" "${COMMON[@]}" adapt.method=source-only
time_it bigl        $BIGL train --config "$CONFIG" --out "$OUT/bigl" "${COMMON[@]}" adapt.method=bigl
time_it target-only $BIGL train --config "$CONFIG" --out "$OUT/target-only" "${COMMON[@]}" adapt.method=target-only data.target_labels=true

for method in source-only bigl target-only; do
  $BIGL evaluate --model "$OUT/$method/model.safetensors" --data "$DATA" --modality t2 \
    --cases "$REPORT_LIST" --out "$OUT/eval-$method" --no-save-predictions --threads 2
done
$BIGL evaluate --model "$OUT/source-only/model.safetensors" --data "$DATA" --modality t2 \
  --cases "$REPORT_LIST" --out "$OUT/eval-invert-histmatch" --no-save-predictions --threads 2 \
  --baseline invert-histmatch --reference-data "$DATA" --reference-modality t1 --reference-exclude "$REPORT_LIST"
echo "results in $OUT (eval-*/summary.md, wall_seconds.txt)"
