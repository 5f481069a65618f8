"""`codetune train --num-gpus 2` on two CUDA GPUs (NCCL): DDP against one GPU, FSDP2 and its checkpoints.
NOT RUN YET: written for the first session with the two-GPU machine (bench/suites/multi-gpu.txt runs it);
skipped wherever fewer than two GPUs are visible. The CPU tests over gloo (test_multiprocess.py) check
the same rules on the same code paths; what only GPUs have is NCCL, the NF4 base (bitsandbytes), bf16
compute with fp32 adapters in one FSDP group, and the fused kernels."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from codetune.cli import main
from codetune.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (nvidia-h200-x2)")]

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--random-init", "--seq-len", "128", "--steps", "6", "--no-progress", "--no-tensorboard", "--eval-every", "3",
        "--eval-batches", "2", "--save-every", "3", "--lr", "3e-3", "--warmup-steps", "0", "--deterministic"]


@pytest.fixture(autouse=True)
def _launch_env(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the machine's rule)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "4"))
    monkeypatch.chdir(REPO)  # (the launched workers import codetune from here)


def _train(data, out, *extra):
    return main(["train", "--data-dir", str(data), "--out-dir", str(out), *ARGS, *extra])


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("precision", ["nf4", "bf16"])
def test_ddp_on_two_gpus_matches_one(tiny_data, tmp_path, precision):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(tiny_data, one, "--batch-size", "4", "--precision", precision) == 0
    assert _train(tiny_data, two, "--batch-size", "2", "--precision", precision, "--num-gpus", "2") == 0
    # bf16 compute: the sums of 2 x 2 sequences and of 4 round differently
    assert _losses(two) == pytest.approx(_losses(one), rel=2e-3)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    assert _train(tiny_data, resumed, "--batch-size", "4", "--precision", precision, "--resume") == 0
    assert _losses(resumed) == pytest.approx(_losses(two), rel=2e-3)


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_fsdp_on_two_gpus_trains_saves_and_resumes(tiny_data, tmp_path, precision):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert _train(tiny_data, ddp, "--batch-size", "2", "--precision", precision, "--num-gpus", "2") == 0
    assert _train(tiny_data, fsdp, "--batch-size", "2", "--precision", precision, "--num-gpus", "2",
                  "--distributed", "fsdp") == 0
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=2e-3)
    for n, extra in ((2, ["--num-gpus", "2", "--distributed", "fsdp"]), (1, [])):
        again = tmp_path / f"again-{n}"
        shutil.copytree(fsdp, again)
        shutil.rmtree(again / "checkpoints" / "step-000006")
        assert _train(tiny_data, again, "--batch-size", str(4 // n), "--precision", precision, "--resume", *extra) == 0
        assert _losses(again) == pytest.approx(_losses(fsdp), rel=2e-3)


def test_more_gpus_than_visible_is_one_line(tiny_data, tmp_path, capsys):
    n = torch.cuda.device_count() + 1
    assert _train(tiny_data, tmp_path / "r", "--num-gpus", str(n)) == 2
    assert f"this machine has {n - 1} visible CUDA GPUs" in capsys.readouterr().err
