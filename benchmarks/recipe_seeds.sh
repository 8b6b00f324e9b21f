#!/usr/bin/env bash
# One recipe trained with several seeds side by side (on one accelerator, or the CPU), then
# each run's final checkpoint scored on the eval images alone and with their mirror images
# (`config.aug.eval_flip` off and on): the seed-robustness figures of a Results row.
#
#   bash benchmarks/recipe_seeds.sh CONFIG DIR "SEEDS" [FLAGS...]
#
# e.g. configs/fashion_mnist.py:best's two seeds on one GPU (docs/fashion_mnist.md):
#   bash benchmarks/recipe_seeds.sh configs/fashion_mnist.py:best workdirs/best "0 1" \
#       --config.manual_dir=../shared/data/fashion_mnist --config.compute_dtype=bfloat16
#
# Writes DIR/seedS/ (each run's workdir), DIR/seedS.log (its console) and DIR/summary.txt:
# the command, the wall time of the training (all seeds together: compiles, evaluations and
# checkpoints included), each run's eval top-1 by step as it trained, and both scores of
# its final checkpoint. Each process gets 1/N of the accelerator's memory
# (XLA_PYTHON_CLIENT_MEM_FRACTION), so N runs fit on one GPU; rerunning resumes them.
# PYTHON picks the interpreter (default python3).
set -u -o pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash $0 CONFIG DIR \"SEEDS\" [FLAGS...]" >&2
  exit 2
fi
CONFIG=$1 DIR=$2 SEEDS=$3
shift 3
PY=${PYTHON:-python3}
N=$(echo $SEEDS | wc -w)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(
  "$PY" -c "print(round(0.9 / $N, 3))")}
mkdir -p "$DIR"
SUMMARY=$DIR/summary.txt
echo "bash $0 $CONFIG $DIR \"$SEEDS\" $*" > "$SUMMARY"

start=$(date +%s)
pids=()
for s in $SEEDS; do
  "$PY" main.py --config="$CONFIG" --workdir="$DIR/seed$s" --config.seed="$s" "$@" \
      > "$DIR/seed$s.log" 2>&1 &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
echo "training: $(( $(date +%s) - start )) s for $N seed(s) side by side" | tee -a "$SUMMARY"
if [ $failed -ne 0 ]; then
  echo "a training run failed: see $DIR/seed*.log" | tee -a "$SUMMARY"
  exit 1
fi

for s in $SEEDS; do
  W=$DIR/seed$s
  curve=$("$PY" -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(', '.join(f\"{r['step']}: {r['eval/top1']:.2%}\" for r in rows if 'eval/top1' in r))
" "$W/metrics.jsonl")
  echo "seed $s eval top-1 by step: $curve" | tee -a "$SUMMARY"
  for flip in False True; do
    # The last line of --mode=eval is its JSON result.
    result=$("$PY" main.py --mode=eval --config="$CONFIG" --workdir="$W" --config.seed="$s" \
        --checkpoint=latest "$@" --config.aug.eval_flip=$flip 2>>"$DIR/seed$s.log" | tail -1)
    echo "$result" | "$PY" -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"seed $s step {r['step']} eval_flip=$flip: top-1 {r['eval/top1']:.2%}, \"
      f\"top-5 {r['eval/top5']:.2%} of {r['eval/num_examples']:,}\")
" | tee -a "$SUMMARY" || { echo "seed $s eval_flip=$flip failed: $result" | tee -a "$SUMMARY"; }
  done
done
