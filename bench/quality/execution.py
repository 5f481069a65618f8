"""Execution pass@1 of one model on the generated tasks (tasks.py), through codetune's own pieces: the
model loaded as `codetune eval` loads it, greedy completion with HumanEval's stop sequences, and
codetune.eval.humaneval.score (the sandbox and its judge). `codetune eval` runs only the 164 HumanEval
problems, so this one suite goes through the Python API; its files have the same shape as eval's
(results.json + humaneval_greedy.jsonl), so codetune.eval.report reads and pairs them like any other."""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

from .tasks import read_jsonl


def load(pretrained: Path, adapter: Path | None, precision: str):
    """(model, tokenizer) as `codetune eval --model PRETRAINED` or `--adapter-path ADAPTER` loads them."""
    from codetune.config import ModelConfig
    from codetune.eval.run import load_base
    from codetune.model.load import load_tuned, pick_device

    device = pick_device("auto")
    if adapter is not None:
        model, tok, _ = load_tuned(adapter, device, precision)
        return model, tok
    return load_base(ModelConfig(model=str(pretrained), precision=precision), str(pretrained), device)


def score_tasks(model, tok, problems: list[dict], scale, out_dir: Path) -> dict:
    """Generate one greedy completion per problem, execute, write humaneval_greedy.jsonl + results.json."""
    from codetune.eval import humaneval
    from codetune.eval.generation import GenSettings, GenStats, generate
    from codetune.eval.sandbox import Limits, detect

    settings = GenSettings(max_new_tokens=scale.exec_new_tokens, stop=humaneval.STOP_SEQUENCES,
                           batch_size=scale.gen_batch_size)
    stats = GenStats()
    records, summary = [], {"problems": 0}
    if problems:  # (a machine where no task qualified still gets a results file saying so)
        completions = generate(model, tok, [p["prompt"] for p in problems], settings, stats)
        records, summary = humaneval.score(problems, [[c] for c in completions], Limits(timeout_s=10.0))
    humaneval.write_jsonl(humaneval.items_file(out_dir, "greedy"), records)
    results = {"humaneval": {"greedy": {**summary, "temperature": 0.0, "generation": stats.as_dict()},
                             "sandbox": detect().summary()}}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def run_exec(pretrained: Path, adapter: Path | None, precision: str, jobs: dict[str, tuple[Path, Path]], scale) -> None:
    """jobs: task set -> (tasks JSONL, output folder). One model load for all of them."""
    import torch

    model, tok = load(pretrained, adapter, precision)
    try:
        for tasks_path, final in jobs.values():
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            score_tasks(model, tok, [t.problem() for t in read_jsonl(tasks_path)], scale, tmp)
            os.replace(tmp, final)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
