"""The held-out-domain experiment in one command (docs/quality.md): pretrain a small StableLM-shaped code
model from random init on the installed packages' Python, fine-tune it on one library it never saw
(several ways), and measure before/after with 95% intervals.

    python3 bench/quality/run.py --out DIR [--smoke] [--seed 0] [--stage pretrain|finetune|eval|all]
                                 [--time-limit SECONDS] [--domain sympy]

Stages are resumable: an output that exists is not made again, a training run stopped at --time-limit
continues from its checkpoint, and `--stage eval` (= all) first runs whatever earlier stage is missing.
Exit codes: 0 done, 2 a setting or folder to fix (one line), 1 a step failed (its log is named),
3 the time limit came first (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# this checkout's codetune and the bench/quality package; not this folder itself, whose module names
# (report, tasks, ...) would shadow libraries' own
sys.path[:] = [str(ROOT), str(ROOT / "bench")] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from codetune.config import ConfigError  # noqa: E402
from quality import pipeline  # noqa: E402
from quality.runner import Runner, StepFailed, TimeUp, child_env  # noqa: E402
from quality.scale import FULL, SMOKE  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "gpt-neox-20b.json"
RUN_JSON = "run.json"
STAGES = ("pretrain", "finetune", "eval", "all")
EXIT_TIME_UP = 3


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/quality/run.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder of this run (made if missing; resumed if ours)")
    ap.add_argument("--smoke", action="store_true", help="toy scale: tiny model, a few MB of code, tens of steps (CPU)")
    ap.add_argument("--seed", type=int, default=0, help="data order and FIM choices of every stage (default: 0)")
    ap.add_argument("--stage", choices=STAGES, default="all", help="stop after this stage (default: all)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop cleanly after this long, keeping what finished (default: no limit)")
    ap.add_argument("--domain", default=None, help="the held-out library (default: sympy)")
    ap.add_argument("--in-process", action="store_true",
                    help="run each codetune command through codetune.cli.main in this process instead of a new "
                         "interpreter: the same CLI without ~4 s of start-up per command (the smoke test's "
                         "mode); not with --time-limit")
    ap.add_argument("--jobs", type=int, default=1,
                    help="fine-tunes, then evaluations, run this many at once, each in its own process (default: "
                         "1); a small model leaves most of a GPU and the CPU cores idle while one of them decodes")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # one of them: what --jobs' processes run
    return ap.parse_args(argv)


def claim_out(out: Path, identity: dict) -> None:
    """A new folder, or one this script made for the same scale, seed and domain; anything else is refused."""
    marker = out / RUN_JSON
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise ConfigError(f"--out {out} is not empty and was not made by bench/quality/run.py; choose a new folder")
        had = json.loads(marker.read_text())
        if had != identity:
            raise ConfigError(f"--out {out} holds a run of {had}, not {identity}; choose another --out (nothing was "
                              "changed)")
        return
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity) + "\n")


def identity(scale, seed: int) -> dict:
    """What an --out folder is the run of: another preset (an edited scale.py too), seed or domain is another run."""
    settings = json.dumps(dataclasses.asdict(scale), sort_keys=True)
    return {"scale": scale.name, "seed": seed, "domain": scale.corpus.domain,
            "settings": hashlib.sha256(settings.encode()).hexdigest()[:12]}


def nf4_unavailable(cuda: bool) -> str | None:
    if not cuda:
        return "NF4 needs a CUDA GPU (bitsandbytes); this machine has none, so QLoRA was skipped"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # (an import that fails in any way means no QLoRA here)
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e}), so QLoRA was skipped"
    return None


def context(a: argparse.Namespace) -> pipeline.Context:
    import torch

    scale = SMOKE if a.smoke else FULL
    if a.domain:
        scale = dataclasses.replace(scale, corpus=dataclasses.replace(scale.corpus, domain=a.domain))
    if a.seed < 0:
        raise ConfigError(f"--seed {a.seed}: give a seed >= 0")
    if a.time_limit is not None and a.time_limit <= 0:
        raise ConfigError(f"--time-limit {a.time_limit}: give a number of seconds > 0")
    if a.in_process and a.time_limit is not None:
        raise ConfigError("--in-process cannot stop a training run at --time-limit (that needs its own process); "
                          "drop one of them")
    if a.jobs < 1:
        raise ConfigError(f"--jobs {a.jobs}: give 1 or more")
    if a.in_process and a.jobs > 1:
        raise ConfigError("--in-process runs one command at a time; --jobs needs a process for each: drop one of them")
    out = a.out.resolve()
    claim_out(out, identity(scale, a.seed))
    for p in ([] if a.job else pipeline.remove_leftovers(out)):  # (a job runs beside the others' temp folders)
        print(f"[quality] removed {p}, left by a stopped run", file=sys.stderr)
    cuda = torch.cuda.is_available()
    deadline = None if a.time_limit is None else time.monotonic() + a.time_limit
    env = child_env(out / "cache")
    if a.in_process:  # (this script's own environment is then the commands')
        os.environ.update(env)
    runner = Runner(ROOT, out / "logs", env, deadline, in_process=a.in_process)
    return pipeline.Context(out, scale, a.seed, cuda, nf4_unavailable(cuda), TOKENIZER, runner)


def parallel(a: argparse.Namespace, ctx: pipeline.Context):
    """The stages' `parallel` hook for --jobs N > 1 (None for one step at a time)."""
    return (lambda stage: run_jobs(a, ctx, stage)) if a.jobs > 1 else None


def run_jobs(a: argparse.Namespace, ctx: pipeline.Context, stage: str) -> None:
    """The steps of `stage` still to do, a.jobs at a time, each `run.py --job NAME` in its own process under
    what is left of the time limit. Running ones finish before a failure or the limit ends the stage; the
    sequential loop that follows then finds them made."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = pipeline.pending_jobs(ctx, stage)
    if not jobs:
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(ctx.out), "--seed", str(a.seed)]
    cmd += ["--smoke"] if a.smoke else []
    cmd += ["--domain", a.domain] if a.domain else []
    env = dict(os.environ)  # N processes share the cores: each gets its part for its CPU work
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // min(a.jobs, len(jobs)))))

    def one(job: str) -> int:
        left = ctx.runner.left()
        if left is not None and left < ctx.runner.min_start_s:
            return EXIT_TIME_UP
        limit = ["--time-limit", f"{left:.0f}"] if left is not None else []
        with open(log(job), "a") as f:
            return subprocess.run([*cmd, *limit, "--job", job], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT).returncode

    def log(job: str) -> Path:
        return ctx.runner.logs / f"job-{job.replace(':', '-')}.log"

    print(f"[quality] {stage}: {len(jobs)} steps, {a.jobs} at a time", file=sys.stderr)
    ctx.runner.logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        codes = dict(zip(jobs, pool.map(one, jobs)))
    failed = [job for job, rc in codes.items() if rc not in (0, EXIT_TIME_UP)]
    if failed:
        raise StepFailed(failed[0], codes[failed[0]], log(failed[0]))
    if EXIT_TIME_UP in codes.values():
        raise TimeUp(f"time limit reached during the {stage} jobs")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    t0 = time.monotonic()
    try:
        ctx = context(a)
        if a.job:
            pipeline.run_job(ctx, a.job)
            return 0
        if a.stage == "pretrain":
            pipeline.stage_pretrain(ctx)
        elif a.stage == "finetune":
            pipeline.stage_finetune(ctx, parallel(a, ctx))
        else:
            result = pipeline.stage_eval(ctx, parallel(a, ctx))
            for e in result["expectations"]:
                print(f"[quality] {'holds' if e['holds'] else 'not measured' if e['holds'] is None else 'DOES NOT HOLD'}: "
                      f"{e['claim']}", file=sys.stderr)
            print(f"[quality] report: {ctx.path('report', 'results.md')}", file=sys.stderr)
    except ConfigError as e:
        print(f"bench/quality/run.py: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"bench/quality/run.py: {e}", file=sys.stderr)
        return 1
    except TimeUp as e:
        print(f"bench/quality/run.py: {e} after {time.monotonic() - t0:.0f} s; what finished is kept: run the same "
              "command again to continue", file=sys.stderr)
        return EXIT_TIME_UP
    print(f"[quality] stage {a.stage} done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
