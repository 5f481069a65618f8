"""The same recipe on several processes through Accelerate (gloo on the CPU here, NCCL on GPUs):
`codetune train --num-gpus 2` re-runs itself through `accelerate launch`; 2 processes x batch 2 read
exactly the sequences 1 process x batch 4 reads, the globally normalised loss makes the two runs' curves
agree, and a checkpoint saved on 2 processes continues on 1 or on 2 as if never interrupted. FSDP2 runs
on GPUs only through Accelerate; its path (Accelerate's prepare, the gather and scatter of checkpoints)
is run here over gloo by tests/train/fsdp_cpu_worker.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codetune.cli import main
from codetune.data.shards import PackedDataset
from codetune.metrics import read_metrics
from codetune.train.batches import BatchStream, eval_batches
from codetune.train.launch import launched

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--random-init", "--seq-len", "128", "--steps", "6", "--no-progress", "--no-tensorboard", "--eval-every", "3",
        "--eval-batches", "2", "--save-every", "3", "--lr", "3e-3", "--warmup-steps", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _train(data, out, *extra):
    return main(["train", "--data-dir", str(data), "--out-dir", str(out), *ARGS, *extra])


def _losses(out, key="loss"):
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def one(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert _train(tiny_data, out, "--batch-size", "4") == 0
    return out


@pytest.fixture(scope="module")
def two(tiny_data, tmp_path_factory):
    """Saved on 2 processes (checkpoints at steps 3 and 6), through `codetune train --num-gpus 2`."""
    out = tmp_path_factory.mktemp("two") / "run"
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")  # (the launched workers inherit it)
    assert _train(tiny_data, out, "--batch-size", "2", "--num-gpus", "2") == 0
    return out


def _interrupted_at_3(run, tmp_path, name):
    """A copy of a finished run as if it had stopped right after its step-3 checkpoint."""
    out = tmp_path / name
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    return out


def test_two_processes_match_one(one, two):
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)
    assert _losses(two, "val_loss") == pytest.approx(_losses(one, "val_loss"), rel=1e-4)
    assert "num_gpus: 2" in (two / "config.yaml").read_text()  # (how many processes the run had)
    assert json.loads((two / "checkpoints" / "step-000006" / "run.json").read_text())["processes"] == 2


def test_the_adapter_is_saved_once_in_peft_format(two):
    from peft import PeftModel

    from codetune.model.load import load_tuned

    model, _, info = load_tuned(two / "adapter", torch.device("cpu"))
    assert isinstance(model, PeftModel) and info["method"] == "lora"
    saved = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(two / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert len(saved) == len(trained) > 0  # every adapter tensor, whole (not one process's share)
    for name, t in trained.items():
        peft_name = name.replace(".default.", ".")
        assert torch.equal(saved[peft_name], t), name
    leftovers = [p for p in two.rglob("*") if ".tmp" in p.name or p.name.startswith(".old-")]
    assert not leftovers


def test_a_run_saved_on_two_processes_resumes_on_one_and_on_two(one, two, tiny_data, tmp_path, capsys):
    ref = _losses(one)
    on_one = _interrupted_at_3(two, tmp_path, "on-one")
    assert _train(tiny_data, on_one, "--batch-size", "2", "--resume") == 2  # global batch 4 -> 2: refused
    line = [ln for ln in capsys.readouterr().err.splitlines() if "cannot resume" in ln][-1]
    assert "global batch of 4 (--batch-size 2 x 2 processes)" in line and "pass --batch-size 4" in line
    assert _train(tiny_data, on_one, "--batch-size", "4", "--resume") == 0
    assert _losses(on_one) == pytest.approx(ref, rel=1e-4)  # (steps 1-3 from the 2-process run, 4-6 on one)

    on_two = _interrupted_at_3(two, tmp_path, "on-two")
    assert _train(tiny_data, on_two, "--batch-size", "2", "--num-gpus", "2", "--resume") == 0
    assert _losses(on_two) == pytest.approx(ref, rel=1e-4)


def _fsdp(data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(REPO / "tests" / "train" / "fsdp_cpu_worker.py"), "train", "--data-dir", str(data), "--out-dir",
           str(out), *ARGS, "--batch-size", "2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]


def test_fsdp2_path_matches_ddp_and_its_checkpoints_resume(one, tiny_data, tmp_path):
    ref = _losses(one)
    out = tmp_path / "fsdp"
    _fsdp(tiny_data, out)
    assert _losses(out) == pytest.approx(ref, rel=1e-4)
    trained = load_file(str(out / "checkpoints" / "step-000006" / "trainable.safetensors"))
    params = sum(t.numel() for t in trained.values())
    assert params == json.loads((out / "summary.json").read_text())["trainable_params"]  # whole, not a shard
    # its step-3 checkpoint: scattered back into shards on 2 processes, and read whole on one
    again = _interrupted_at_3(out, tmp_path, "fsdp-again")
    _fsdp(tiny_data, again, "--resume")
    assert _losses(again) == pytest.approx(ref, rel=1e-4)
    on_one = _interrupted_at_3(out, tmp_path, "fsdp-on-one")
    assert _train(tiny_data, on_one, "--batch-size", "4", "--resume") == 0
    assert _losses(on_one) == pytest.approx(ref, rel=1e-4)


def test_processes_read_disjoint_sequences_that_together_are_one_process_s(tiny_data):
    ds = PackedDataset(tiny_data, "train")
    single, halves = BatchStream(ds, 4, seed=3), [BatchStream(ds, 2, seed=3, rank=r, world=2) for r in range(2)]
    key = lambda b: [tuple(row.tolist()) for row in b["input_ids"]]  # noqa: E731
    for k in range(single.per_epoch * 2 + 1):  # (over an epoch boundary: a new order)
        mine = [key(h.batch(k)) for h in halves]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(key(single.batch(k)))
    val = PackedDataset(tiny_data, "val")
    both = [key(b) for r in range(2) for b in eval_batches(val, 2, 3, r, 2)]
    flat = [row for rows in both for row in rows]
    assert len(flat) == len(set(map(tuple, flat))) and sorted(flat) == sorted(
        row for b in eval_batches(val, 4, 3) for row in key(b))


def test_launched_is_read_from_the_launchers_variables():
    assert not launched({})
    assert launched({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) and launched({"ACCELERATE_PROCESS_INDEX": "1"})


def test_wrong_counts_and_fsdp_on_the_cpu_are_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert _train(tiny_data, out, "--num-gpus", "2", "--distributed", "fsdp") == 2
    assert "--distributed fsdp runs on CUDA GPUs only" in capsys.readouterr().err
    assert _train(tiny_data, out, "--distributed", "fsdp") == 2  # (one process: nothing to shard)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _train(tiny_data, out, "--num-gpus", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("codetune train: --num-gpus 2: this machine has 1 visible CUDA GPU; pass --num-gpus 1 or "
                       "less (CUDA_VISIBLE_DEVICES decides which are visible)")
    assert not out.exists()


def test_a_workers_error_is_its_one_line_and_exit_code(tiny_data, tmp_path, capfd):
    # the shards are packed to 128: every worker refuses --seq-len 256 after the launch
    assert main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "r"), "--random-init",
                 "--seq-len", "256", "--steps", "2", "--num-gpus", "2"]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and "kernels" not in ln]
    assert err == [f"codetune train: shards in {tiny_data} are packed to seq_len=128, but --seq-len is 256; pass "
                   "--seq-len 128 or re-run prepare"], err  # (said once; no launcher traceback)


def test_ctrl_c_reaches_every_process_once_and_they_checkpoint(tiny_data, tmp_path, interrupted_train):
    out = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--out-dir", str(out), *ARGS, "--batch-size", "2", "--steps", "5000",
            "--save-every", "0", "--eval-every", "0", "--num-gpus", "2"]
    err, done = interrupted_train(args, out, ENV, cwd=REPO)
    lines = err.splitlines()
    command = lines[next(i for i, ln in enumerate(lines) if "Continue with:" in ln) + 1].strip()
    assert "--num-gpus 2" in command and command.endswith("--resume")  # (it continues on 2 processes)


def test_the_fsdp_plugin_is_fsdp2_per_decoder_layer():
    from torch.distributed.fsdp import StateDictType

    from codetune.train.distributed import fsdp_plugin

    p = fsdp_plugin("StableLmDecoderLayer")
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.transformer_cls_names_to_wrap == ["StableLmDecoderLayer"]
    assert p.state_dict_type == StateDictType.FULL_STATE_DICT and not p.cpu_ram_efficient_loading
