"""bench/quality/runner.py and run.py's checks: the time limit stops a training run through SIGTERM (the
signal codetune train checkpoints on) and is reported as such; a failed step names its log's last line;
an --out the script did not make, or made for another run, is refused in one line."""

import json
import runpy
import sys
import textwrap
import time
from pathlib import Path

import pytest
from quality.runner import Runner, StepFailed, TimeUp

RUN = Path(__file__).resolve().parents[2] / "bench" / "quality" / "run.py"

# stands in for `codetune train`: writes a checkpoint on SIGTERM and exits 128 + 15, as train does
FAKE_TRAIN = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    def stop(*_):
        Path(sys.argv[1]).write_text("checkpoint")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("training", flush=True)
    time.sleep(60)
""")


def runner(tmp_path, script: str, limit: float | None) -> Runner:
    deadline = None if limit is None else time.monotonic() + limit
    return Runner(tmp_path, tmp_path / "logs", {}, deadline, command=(sys.executable, "-c", script), min_start_s=0.2)


def test_the_time_limit_stops_a_training_run_with_sigterm(tmp_path):
    r = runner(tmp_path, FAKE_TRAIN, limit=1.5)
    t0 = time.monotonic()
    with pytest.raises(TimeUp, match="during train-x"):
        r.codetune("train-x", [str(tmp_path / "ckpt")], training=True)
    assert time.monotonic() - t0 < 10
    assert (tmp_path / "ckpt").read_text() == "checkpoint"  # it was asked to stop, not killed
    rec = [json.loads(ln) for ln in (tmp_path / "logs" / "timings.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == "train-x" and rec[-1]["returncode"] is None


def test_no_step_starts_without_time_left(tmp_path):
    r = runner(tmp_path, "print('never')", limit=0.1)
    with pytest.raises(TimeUp, match="before prepare-x"):
        r.codetune("prepare-x", [])
    assert not (tmp_path / "logs" / "prepare-x.log").exists()


def test_a_failed_step_names_its_exit_code_and_last_line(tmp_path):
    r = runner(tmp_path, "import sys; print('codetune prepare: --sources x: no such folder'); sys.exit(2)", None)
    with pytest.raises(StepFailed) as e:
        r.codetune("prepare-x", [])
    assert "prepare-x failed (exit 2): codetune prepare: --sources x: no such folder" in str(e.value)
    assert runner(tmp_path, "print('ok')", None).codetune("eval-x", []) >= 0


@pytest.fixture
def run_main():
    return runpy.run_path(str(RUN), run_name="quality_run")["main"]


def test_an_out_folder_that_is_not_ours_is_refused(tmp_path, run_main, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert run_main(["--out", str(tmp_path), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "is not empty and was not made by bench/quality/run.py" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_an_out_folder_of_another_run_is_refused(tmp_path, run_main, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"scale": "full", "seed": 0, "domain": "sympy"}))
    assert run_main(["--out", str(tmp_path), "--smoke", "--stage", "pretrain"]) == 2
    assert "holds a run of {'scale': 'full'" in capsys.readouterr().err


def test_in_process_runs_cannot_have_a_time_limit(tmp_path, run_main, capsys):
    assert run_main(["--out", str(tmp_path / "o"), "--smoke", "--in-process", "--time-limit", "60"]) == 2
    assert "--in-process cannot stop a training run" in capsys.readouterr().err


def test_jobs_must_be_positive_and_need_their_own_processes(tmp_path, run_main, capsys):
    assert run_main(["--out", str(tmp_path / "a"), "--smoke", "--jobs", "0"]) == 2
    assert "--jobs 0: give 1 or more" in capsys.readouterr().err
    assert run_main(["--out", str(tmp_path / "b"), "--smoke", "--in-process", "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--jobs needs a process for each" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is made


@pytest.fixture
def run_jobs(monkeypatch, tmp_path):
    """run.py's --jobs hook (what the stages call) over three pending steps, with `subprocess.run` replaced: each
    "process" writes a line to its log and exits with the code given for its job. Returns (call it, the
    commands it ran)."""
    import argparse
    import subprocess
    from types import SimpleNamespace

    g = runpy.run_path(str(RUN), run_name="quality_run")
    jobs = ["train:lora-bf16", "eval:base:domain", "exec:base:general"]
    monkeypatch.setattr(g["pipeline"], "pending_jobs", lambda ctx, stage: list(jobs))
    ran = []

    def call(codes: dict, n_jobs: int = 2, limit: float | None = 60):
        def fake_run(cmd, cwd, env, stdout, stderr):
            ran.append(cmd)
            stdout.write(f"last line of {cmd[-1]}\n")
            return subprocess.CompletedProcess(cmd, codes.get(cmd[-1], 0))

        monkeypatch.setattr(subprocess, "run", fake_run)
        a = argparse.Namespace(jobs=n_jobs, seed=7, smoke=True, domain=None)
        ctx = SimpleNamespace(out=tmp_path / "q", runner=Runner(tmp_path, tmp_path / "logs", {},
                                                                  None if limit is None else time.monotonic() + limit))
        hook = g["parallel"](a, ctx)
        if hook is not None:
            hook("eval")

    return call, ran


def test_jobs_run_each_pending_step_in_its_own_process(run_jobs, tmp_path):
    call, ran = run_jobs
    call({})
    assert sorted(cmd[-1] for cmd in ran) == ["eval:base:domain", "exec:base:general", "train:lora-bf16"]
    for cmd in ran:
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / "q") and cmd[cmd.index("--seed") + 1] == "7"
        assert "--smoke" in cmd and cmd[-2] == "--job"
        assert 0 < float(cmd[cmd.index("--time-limit") + 1]) <= 60  # what is left of the limit, passed down
    assert (tmp_path / "logs" / "job-exec-base-general.log").read_text() == "last line of exec:base:general\n"
    ran.clear()
    call({}, n_jobs=1)
    assert ran == []  # one at a time: the sequential stage does them, in this process


def test_a_failed_job_names_itself_and_its_log_and_the_limit_is_a_time_up(run_jobs):
    call, ran = run_jobs
    with pytest.raises(StepFailed, match=r"eval:base:domain failed \(exit 1\): last line of eval:base:domain"):
        call({"eval:base:domain": 1, "train:lora-bf16": 3})
    assert len(ran) == 3  # the others ran to their end
    with pytest.raises(TimeUp, match="time limit reached during the eval jobs"):
        call({"train:lora-bf16": 3})
    ran.clear()
    with pytest.raises(TimeUp):
        call({}, limit=0.01)  # no time left: nothing starts
    assert ran == []


def test_python_work_in_this_process_stops_at_the_limit(tmp_path):
    """Execution scoring runs in run.py's own process (no child to SIGTERM): SIGALRM raises TimeUp inside it,
    and the alarm is gone afterwards; without a limit nothing is armed."""
    import signal

    r = runner(tmp_path, "", 0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeUp, match="during exec-base-domain"):
        with r.in_time("exec-base-domain"):
            time.sleep(5)
    assert time.monotonic() - t0 < 2 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with runner(tmp_path, "", None).in_time("exec"):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(TimeUp, match="before exec"):
        with runner(tmp_path, "", 0.1).in_time("exec"):  # less than min_start_s (0.2 s here) left
            pass
