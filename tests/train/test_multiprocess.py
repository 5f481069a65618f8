"""The same recipe on several processes through Accelerate (DDP; gloo on CPU here, NCCL on GPUs):
2 processes x batch 2 read exactly the sequences 1 process x batch 4 reads, and the globally
normalised loss makes the two runs' curves agree."""

import os
import subprocess
import sys

import pytest

from codetune.cli import main
from codetune.train.metrics import read_metrics

ARGS = ["--random-init", "--seq-len", "128", "--steps", "6", "--no-progress", "--no-tensorboard", "--eval-every", "3",
        "--eval-batches", "2", "--save-every", "3", "--lr", "3e-3", "--warmup-steps", "0"]


def test_two_processes_match_one(tiny_data, tmp_path):
    one = tmp_path / "one"
    assert main(["train", "--data-dir", str(tiny_data), "--out-dir", str(one), "--batch-size", "4", *ARGS]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun (what `accelerate launch` uses under the hood); on CPU it gives Accelerate a gloo group
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "codetune",
                        "train", "--data-dir", str(tiny_data), "--out-dir", str(two), "--batch-size", "2", *ARGS],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [x["loss"] for x in read_metrics(one / "metrics.jsonl") if "loss" in x]
    b = [x["loss"] for x in read_metrics(two / "metrics.jsonl") if "loss" in x]
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)
    va = [x["val_loss"] for x in read_metrics(one / "metrics.jsonl") if "val_loss" in x]
    vb = [x["val_loss"] for x in read_metrics(two / "metrics.jsonl") if "val_loss" in x]
    assert vb == pytest.approx(va, rel=1e-4)
    assert (two / "adapter" / "adapter_config.json").exists()
