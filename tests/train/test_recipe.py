"""`codetune train` end to end on the tiny model: it learns, checkpoints, refuses to clobber, resumes
exactly after SIGKILL, and rejects incompatible checkpoints and mismatched data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from codetune.cli import main
from codetune.metrics import read_metrics

ARGS = ["--random-init", "--seq-len", "128", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "5",
        "--no-progress", "--no-tensorboard", "--deterministic"]


def _train(data, out, *extra):
    return main(["train", "--data-dir", str(data), "--out-dir", str(out), *ARGS, *extra])


def test_train_learns_checkpoints_and_saves_adapter(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_data, out, "--steps", "40", "--eval-every", "20", "--save-every", "10", "--keep-last", "2") == 0
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert [r["val_loss"] for r in rows if "val_loss" in r]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000030", "step-000040"]  # keep_last=2
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "codetune.json").exists()
    assert (out / "loss.png").exists() and json.loads((out / "summary.json").read_text())["steps"] == 40
    from peft import PeftModel  # the adapter loads with plain PEFT

    from codetune.model.load import load_tuned

    model, tok, info = load_tuned(adapter, __import__("torch").device("cpu"))
    assert isinstance(model, PeftModel) and info["method"] == "lora"

    # a second run into the same folder must not clobber it
    assert _train(tiny_data, out, "--steps", "5") == 2
    # resuming with another LoRA rank is refused with a clear message
    assert _train(tiny_data, out, "--steps", "50", "--resume", "--rank", "8") == 2


def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(tiny_data, tmp_path):
    steps = ["--steps", "60", "--save-every", "10", "--eval-every", "0"]
    ref = tmp_path / "ref"
    assert _train(tiny_data, ref, *steps) == 0
    ref_losses = [r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "codetune", "train", "--data-dir", str(tiny_data), "--out-dir", str(out), *ARGS, *steps]
    env = {**os.environ, "OMP_NUM_THREADS": str(__import__("torch").get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000020").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _train(tiny_data, out, *steps, "--resume") == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 60
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)


def test_shards_from_another_tokenizer_are_refused(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    m = json.loads((data / "manifest.json").read_text())
    m["tokenizer"] = "0000000000000000"
    (data / "manifest.json").write_text(json.dumps(m))
    assert _train(data, tmp_path / "r", "--steps", "2") == 2


def test_seq_len_mismatch_with_shards_is_refused(tiny_data, tmp_path):
    assert main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "r"), "--random-init",
                 "--seq-len", "256", "--steps", "1"]) == 2


def test_unknown_lora_module_is_refused(tiny_data, tmp_path):
    assert _train(tiny_data, tmp_path / "r", "--steps", "1", "--targets", "q_proj,qkv_proj") == 2


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path / "nothing", tmp_path / "r", "--steps", "1") == 2
    assert "run `codetune prepare --sources" in capsys.readouterr().err


def test_resume_survives_a_half_written_metrics_line(tiny_data, tmp_path):
    """SIGKILL can cut metrics.jsonl mid-line; resume drops the torn line instead of crashing on it."""
    out = tmp_path / "run"
    assert _train(tiny_data, out, "--steps", "4", "--save-every", "2", "--eval-every", "0") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # torn write
    assert _train(tiny_data, out, "--steps", "6", "--resume", "--eval-every", "0") == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
