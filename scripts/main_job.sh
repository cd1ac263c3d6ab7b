#!/usr/bin/env bash
# The main job end to end on the bundled real model (SmolLM2-135M-Instruct, 30 layers):
#   1. convert it to sandwich:2 (3 of 30 layers cache KVs: 90 % smaller KV cache),
#   2. repair it with recipes/smollm2-135m-sandwich2-distill.yaml (LoRA, distillation from the original model),
#   3. evaluate base / converted / fine-tuned perplexity on alice29.txt (never trained on) and the serving cost.
# Usage: bash scripts/main_job.sh [--quick] [--dry-run] [RUN_DIR]
#   full:      200 LoRA steps, 4096 tokens of alice29, bench with a 4 GB max-batch search (< 45 min on 2 idle cores)
#   --quick:   12 steps, 1024 tokens, a small bench grid (< 5 min on 2 idle cores); the perplexity still falls
#   --dry-run: print the commands without running them
# Re-running continues: the conversion is kept and fine-tuning resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0; DRY=0; RUN=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "main_job.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) RUN=$arg ;;
  esac
done
if [ -z "$RUN" ]; then RUN=runs/main-job; if [ $QUICK = 1 ]; then RUN=runs/main-job-quick; fi; fi
run() { if [ $DRY = 1 ]; then echo "+ $*"; else "$@"; fi; }
# 2 threads on an idle 2-core machine; on a busy one set OMP_NUM_THREADS=1 (OpenMP threads that wait for a
# busy core made a step 10x slower in our runs)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
SRC=bundled:smollm2-135m
if [ $QUICK = 1 ]; then
  EVAL_TOKENS=1024; PPL=(--kv-windows 0)
  FT_EXTRA=(train.max_steps=12 train.save_steps=6 eval.before=false eval.steps=null eval.report=false)
  BENCH=(--batch-sizes 1,4 --lengths 256 --prompt-len 128 --repeats 1 --skip maxbatch --ttft-modes iterative)
else
  EVAL_TOKENS=4096; PPL=(--kv-windows 1)
  FT_EXTRA=(eval.report=false)
  BENCH=(--batch-sizes 1,8 --lengths 256 --budget-gb 4 --budget-length 1024 --prompt-len 512 --repeats 1)
fi

echo "== 1/4 convert $SRC -> $RUN/converted (sandwich:2)"
if [ ! -d "$RUN/converted" ]; then run lckv-convert "$SRC" --warmup sandwich:2 -o "$RUN/converted" --no-check; fi

echo "== 2/4 fine-tune (recipes/smollm2-135m-sandwich2-distill.yaml)"
run python finetune/run.py recipes/smollm2-135m-sandwich2-distill.yaml \
  model.path="$RUN/converted" model.warmup=null model.kv_init=null output.dir="$RUN/finetuned" "${FT_EXTRA[@]}"

echo "== 3/4 perplexity on alice29.txt (held out): base vs converted vs fine-tuned"
run lckv-eval ppl "$RUN/finetuned/model" --base "$SRC" --converted "$RUN/converted" \
  --data tests/data/alice29.txt --max-tokens $EVAL_TOKENS --modes iterative "${PPL[@]}" --out "$RUN/ppl" --overwrite

echo "== 4/4 serving cost: KV bytes/token, decode throughput, max batch in 4 GB, TTFT"
run lckv-eval bench "$SRC" "$RUN/finetuned/model" --out "$RUN/bench" --overwrite "${BENCH[@]}"

echo "== results: $RUN/ppl and $RUN/bench (Markdown tables above)"
