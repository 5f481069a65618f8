"""A run's lifecycle on the tiny model: earlier outputs are never overwritten, config.yaml and --dry-run,
the resume rule (refused changes, applied ones, a stretched schedule, whole-run summary), damaged and
half-deleted checkpoints, leftovers, non-finite losses and weights, and Ctrl-C."""

import hashlib
import json
import os
import shutil
import signal
import time

import pytest
import torch
import yaml

from codetune.cli import main
from codetune.config import build, to_dict
from codetune.metrics import read_metrics
from codetune.train import recipe
from codetune.train.interrupt import StopRequest
from codetune.train.optim import lr_factor
from codetune.train.state import DATA_KEY, PROCESSES_KEY

ARGS = ["--random-init", "--seq-len", "128", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2",
        "--no-progress", "--no-tensorboard", "--deterministic", "--eval-every", "0", "--eval-batches", "2"]
SECTIONS = ["model", "adapter", "data", "train"]


def _train(data, out, *extra):
    return main(["train", "--data-dir", str(data), "--out-dir", str(out), *ARGS, *extra])


def _tree(d):
    """Every file under d with its content hash: to show nothing changed."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _rows(out, key):
    return [r for r in read_metrics(out / "metrics.jsonl") if key in r]


def _stderr_line(capsys, needle):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if needle in ln]
    assert lines, err[-2000:]
    return lines[-1]  # (the error is the last line: a run says other things first)


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2, 3 and 4; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(tiny_data, out, "--steps", "4", "--save-every", "1", "--keep-last", "3") == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_earlier_outputs_are_never_overwritten(tiny_data, run_copy, tmp_path, capsys):
    # the case: a run whose checkpoints/ is gone still has its adapter, metrics and summary
    shutil.rmtree(run_copy / "checkpoints")
    before = _tree(run_copy)
    assert _train(tiny_data, run_copy, "--steps", "2") == 2
    line = _stderr_line(capsys, "codetune train: ")
    assert "--resume" in line and "--out-dir" in line and "\n" not in line
    assert _train(tiny_data, run_copy, "--steps", "2", "--resume") == 2
    assert "no complete checkpoint" in _stderr_line(capsys, "codetune train: ")
    assert _tree(run_copy) == before

    mine = tmp_path / "mine"  # a user's folder, resume or not
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--resume"]):
        assert _train(tiny_data, mine, "--steps", "2", *extra) == 2
        assert "not made by `codetune train`" in _stderr_line(capsys, "codetune train: ")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"

    for bad, says in ((mine / "notes.txt", "is a file"), (mine / "notes.txt" / "run", "which is a file")):
        assert _train(tiny_data, bad, "--steps", "2") == 2
        assert says in _stderr_line(capsys, "codetune train: ")


def test_config_yaml_is_the_resolved_configuration(finished):
    saved = yaml.safe_load((finished / "config.yaml").read_text())
    run_json = json.loads((finished / "checkpoints" / "step-000004" / "run.json").read_text())
    assert saved["model"]["precision"] == "fp32"  # resolved, not "auto"
    assert to_dict(build(SECTIONS, saved)) == {k: v for k, v in run_json.items() if k not in (DATA_KEY, PROCESSES_KEY)}
    assert run_json[PROCESSES_KEY] == 1


def test_dry_run_builds_everything_and_writes_nothing(tiny_data, run_copy, tmp_path, capsys):
    out = tmp_path / "new"
    assert _train(tiny_data, out, "--steps", "3", "--dry-run") == 0
    captured = capsys.readouterr()
    assert "peak allocated" in captured.err and "nothing was written" in captured.err
    assert json.loads(captured.out)["trainable_params"] > 0
    assert not out.exists()
    before = _tree(run_copy)  # a dry run of a resume checks it the way the real one would
    assert _train(tiny_data, run_copy, "--steps", "6", "--resume", "--dry-run", "--batch-size", "4") == 2
    assert "--batch-size 2" in _stderr_line(capsys, "codetune train: ")
    assert _tree(run_copy) == before


def test_a_set_prepared_before_whole_fim_samples_is_named_on_training(tiny_data, tmp_path, capsys):
    """Sets of PIPELINE_VERSION < 6 split long files' FIM samples across rows (docs/data.md, stage 8):
    training on one still works, with one line saying to re-prepare it; a current set says nothing."""
    assert _train(tiny_data, tmp_path / "a", "--steps", "1", "--dry-run") == 0
    assert "older codetune" not in capsys.readouterr().err
    old = tmp_path / "old-data"
    shutil.copytree(tiny_data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 5}))
    assert _train(old, tmp_path / "b", "--steps", "1", "--dry-run") == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "older codetune (format 5)" in ln]
    assert len(warned) == 1 and "re-run `codetune prepare`" in warned[0]


def test_resume_refuses_changes_to_the_run_so_far(tiny_data, run_copy, capsys):
    before = _tree(run_copy)
    for extra, says in ((["--rank", "8"], "--rank 16"), (["--seed", "1"], "--seed 0"),
                        (["--steps", "3"], "--steps 4 or more")):
        assert _train(tiny_data, run_copy, "--resume", "--steps", "4", *extra) == 2
        assert says in _stderr_line(capsys, "codetune train: ")
    assert _tree(run_copy) == before
    ckpt = run_copy / "checkpoints" / "step-000004" / "run.json"  # as if --data-dir had been re-prepared
    ckpt.write_text(json.dumps({**json.loads(ckpt.read_text()), DATA_KEY: "another set"}))
    assert _train(tiny_data, run_copy, "--resume", "--steps", "4") == 2
    assert "prepared data" in _stderr_line(capsys, "codetune train: ")


def test_resume_applies_lr_and_stretches_the_schedule(tiny_data, run_copy, capsys):
    first = torch.load(run_copy / "checkpoints" / "step-000004" / "state.pt", weights_only=False)["totals"]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert _train(tiny_data, run_copy, "--resume", "--steps", "6", "--lr", "1e-3") == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    err = capsys.readouterr().err
    assert "--lr 0.003 -> 0.001: applied from step 5 on" in err and "--steps 4 -> 6" in err
    cfg = build(["train"], flags={"train.steps": 6, "train.lr": 1e-3, "train.warmup_steps": 2})["train"]
    rows = _rows(run_copy, "loss")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # each row logs the lr the next step will use: the new peak, on a cosine that now ends at step 6
    assert [r["lr"] for r in rows[4:]] == pytest.approx([1e-3 * lr_factor(s, cfg) for s in (5, 6)])
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["seconds"] > first["seconds"] > 0 and summary["this_session"]["steps"] == 2
    assert [r["step"] for r in _rows(run_copy, "val_loss")] == [4, 6]

    # resuming the finished run again trains nothing and writes no second final row
    assert _train(tiny_data, run_copy, "--resume", "--steps", "6", "--lr", "1e-3") == 0
    assert [r["step"] for r in read_metrics(run_copy / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 6, 6]
    again = json.loads((run_copy / "summary.json").read_text())
    assert (again["steps"], again["tokens"], again["val_loss"]) == (6, summary["tokens"], summary["val_loss"])


def test_damaged_checkpoints_and_leftovers(tiny_data, run_copy, capsys):
    losses = [r["loss"] for r in _rows(run_copy, "loss")]
    ckpts = run_copy / "checkpoints"
    (ckpts / "step-000004" / "trainable.safetensors").unlink()  # a kill while pruning (older versions)
    opt = ckpts / "step-000003" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # a full disk
    leftovers = [ckpts / ".tmp-step-k1ll3d", ckpts / ".old-step-000001-4242", run_copy / ".adapter.tmp-4242"]
    for p in leftovers:
        p.mkdir()
        (p / "x").write_text("half")
    assert _train(tiny_data, run_copy, "--resume", "--steps", "4", "--save-every", "1", "--keep-last", "3") == 0
    err = capsys.readouterr().err
    assert "step-000004 is incomplete (no trainable.safetensors); falling back to step-000002" in err
    assert "step-000003/optimizer.pt is damaged or truncated (" in err
    assert not any(p.exists() for p in leftovers)
    # the run went on from step 2's full state: steps 3 and 4 come out exactly as the first time
    assert [r["loss"] for r in _rows(run_copy, "loss")] == pytest.approx(losses, rel=1e-6, abs=1e-6)
    assert [r["step"] for r in _rows(run_copy, "val_loss")] == [4]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003", "step-000004"]

    for c in ckpts.iterdir():  # nothing usable left: refused, not restarted over them
        (c / "state.pt").write_bytes(b"\x80\x02truncated")
    assert _train(tiny_data, run_copy, "--resume", "--steps", "4") == 2
    assert "no usable checkpoint" in _stderr_line(capsys, "codetune train: ")


def _wrap_train_step(monkeypatch, after):
    real = recipe.train_step

    def step(run, k):
        return after(run, k, real(run, k))

    monkeypatch.setattr(recipe, "train_step", step)


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys, where):
    def after(run, k, rec):
        if where == "loss" and k == 4:  # step 5
            rec["loss"] = float("nan")
        if where == "weights" and k == 3:  # step 4's update went wrong but its loss was still finite
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).fill_(float("inf"))
        return rec

    _wrap_train_step(monkeypatch, after)
    out = tmp_path / "r"
    assert _train(tiny_data, out, "--steps", "8", "--save-every", "2") == 2
    step, kept = (5, ["step-000002", "step-000004"]) if where == "loss" else (4, ["step-000002"])
    line = _stderr_line(capsys, "training diverged")
    assert f"at step {step}" in line and "--lr" in line and f"{kept[-1]}) is kept" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_infinite_lr_never_saves_nan_weights(tiny_data, tmp_path):
    out = tmp_path / "r"
    assert _train(tiny_data, out, "--steps", "3", "--save-every", "1", "--lr", "inf") == 2
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step-*"))


def test_signal_handlers_second_signal_aborts_and_restores():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with StopRequest() as stop:
            os.kill(os.getpid(), sig)
            deadline = time.time() + 5
            while not stop.requested and time.time() < deadline:
                time.sleep(0.01)
            assert stop.signum == sig
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(5)  # (the handler raises here, at once)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tiny_data, tmp_path, interrupted_train):
    out = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--out-dir", str(out), *ARGS, "--steps", "5000", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    err, done = interrupted_train(args, out, env)
    command = err.strip().splitlines()[-1].strip()
    assert command == "python -m codetune train " + " ".join(args) + " --resume"  # (flags as the user wrote them)
    # the printed command continues the run (here only two more steps)
    assert main(command.split()[3:] + ["--steps", str(done + 2)]) == 0
    assert [r["step"] for r in _rows(out, "loss")] == list(range(1, done + 3))


def test_metrics_log_keeps_rows_up_to_the_resume_step_once(tmp_path):
    from codetune.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=True)
    for s in range(1, 7):
        log.log({"step": s, "loss": float(s)})
    log.close()
    log = MetricsLog(tmp_path, tensorboard=True, resume_step=3)  # a session killed at 6, resumed from 3
    assert log.last("loss") == 3.0
    for s in range(4, 6):
        log.log({"step": s, "loss": 10.0 * s})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_a_second_run_on_a_folder_in_use_is_refused_and_touches_nothing(tiny_data, run_copy, capsys):
    from codetune.train.rundir import claim

    # the first run, mid-save: its temporary checkpoint folder looks like a leftover to anyone else
    saving = run_copy / "checkpoints" / ".tmp-step-inflight"
    saving.mkdir()
    (saving / "x").write_text("being written")
    before = _tree(run_copy)
    with claim(run_copy):
        assert _train(tiny_data, run_copy, "--resume", "--steps", "5") == 2
        assert "in use by another `codetune train`" in _stderr_line(capsys, "codetune train: ")
        assert _tree(run_copy) == before
    with claim(run_copy):  # released when the holder's block ends
        pass
