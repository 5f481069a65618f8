"""What a checkpoint records of its run (run.json: the resolved configuration and the prepared set's
identity) and `--resume`, which compares a checkpoint's record with this run's under train/state.py's
resume rule before continuing from it. Read by train/recipe.py; `run` is its Run."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from codetune.config import to_dict

if TYPE_CHECKING:
    from codetune.train.recipe import Run


def run_config(run: Run) -> dict:
    """The settings a checkpoint records (run.json) and a resume compares: the resolved configuration plus
    the prepared set's identity."""
    from codetune.train.state import DATA_KEY, PROCESSES_KEY

    return {**to_dict(run.cfgs), DATA_KEY: run.run_info["data_manifest"].get("run_key"),
            PROCESSES_KEY: run.accelerator.num_processes}


def maybe_resume(run: Run) -> None:
    """--resume: continue from the newest usable checkpoint under the resume rule (train/state.py:
    MUST_MATCH refuses, APPLIED_ON_RESUME takes effect from the resume point on)."""
    from codetune.train.state import apply_checkpoint, check_steps, newest_usable, resume_notices

    tcfg = run.cfgs["train"]
    if not tcfg.resume:
        return
    main_proc = run.accelerator.is_main_process

    def say(text):
        if main_proc:
            print(f"--resume: {text}", file=sys.stderr)

    data = newest_usable(run.out_dir, say)
    if data is None:
        say(f"no checkpoint in {run.out_dir}; starting from step 0")
        return
    current = run_config(run)
    check_steps(data, tcfg.steps)
    apply_checkpoint(data, run.model, run.optimizer, run.scheduler, current)
    run.start_step, run.start_totals = int(data.state["step"]), dict(data.state.get("totals") or {})
    say(f"resuming from {data.path} (step {run.start_step} of {tcfg.steps})")
    for line in resume_notices(data, current, tcfg, run.optimizer.param_groups[0]["lr"]):
        say(line)
