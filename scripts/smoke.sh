#!/usr/bin/env bash
# make smoke: the whole pipeline on the embedded corpus, on a CPU, in a few minutes (nanochat's
# runcpu.sh idea): train a tiny teacher -> evaluate it -> fine-tune it with LoRA on text ->
# distil it into a GLA student -> evaluate the student -> generate from both -> plot -> one
# final comparison table. Every step is the command a user types; any failure stops the script
# with that command's exit status. Runs land in $SMOKE_DIR (default: a fresh temporary folder).
set -euo pipefail
PY=${PY:-python3}
DIR=${SMOKE_DIR:-$(mktemp -d -t lmtk-smoke-XXXXXX)}
export LMTK_RUNS="$DIR/runs" LMTK_CACHE="${LMTK_CACHE:-$DIR/cache}"
lmtk() { echo "+ lmtk $*" >&2; "$PY" -m lmtk "$@"; }
t0=$(date +%s)
SMALL=(data.max_chars=1000000 tokenizer.vocab_size=1024 model.d_model=64 model.n_layers=2 model.n_heads=2
       model.d_ff=null data.seq_len=64 train.batch_size=16 train.micro_batch_size=16 val.tokens=8192 logger.every=50)

lmtk train "${SMALL[@]}" budget.hours=null budget.steps=300 train.lr=3e-3 run.name=teacher
lmtk eval teacher suite=ppl
lmtk finetune base=teacher peft=lora data=embedded data.max_chars=1000000 data.seq_len=64 budget.epochs=null \
    budget.steps=50 train.lr=2e-3 val.tokens=8192 logger.every=25 run.name=teacher-lora
lmtk distill teacher=teacher model/mixer=gla budget.hours=null budget.steps=150 train.lr=3e-3 train.batch_size=16 \
    train.micro_batch_size=16 logger.every=50 run.name=student-gla
lmtk eval student-gla suite=ppl
for run in teacher student-gla; do lmtk generate "$run" -p "def main(" -n 24 --temperature 0; done
if "$PY" -c "import matplotlib" 2>/dev/null; then
    lmtk plot teacher teacher-lora student-gla --out "$DIR/plots"
else
    echo "(plots skipped: matplotlib is not installed; pip install 'lmtk[plot]')" >&2
fi
lmtk runs
lmtk eval teacher teacher-lora student-gla suite=ppl   # the comparison: the three runs side by side
echo "smoke: the whole pipeline ran in $(( $(date +%s) - t0 )) s; runs in $LMTK_RUNS" >&2
