"""The stages, each skipped where its outputs exist and each running what it needs first:

pretrain:  corpus + tasks -> `codetune prepare` (5 sets) -> `codetune train --random-init --method full
           --train-embeddings` -> `codetune merge` (a plain model folder: what the fine-tunes start from)
finetune:  `codetune train --model PRETRAINED` once per variant (QLoRA needs CUDA: skipped elsewhere)
eval:      `codetune eval --suites loss fim` on the domain and general held-out sets for the base and every
           variant, and the execution tasks (execution.py); then report.py writes the tables and plots.

Every output is written beside its final path and renamed into place, so a stage killed at the time
limit leaves nothing half-made where a finished output would be looked for.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import corpus as corpus_mod
from . import tasks as tasks_mod
from .runner import Runner
from .scale import DATASETS, VARIANTS, Scale, Variant

TASK_SETS = ("domain", "general")
DECONTAM = "decontam.jsonl"


@dataclass(frozen=True)
class Context:
    out: Path
    scale: Scale
    seed: int
    cuda: bool
    nf4: str | None       # why QLoRA cannot run here, or None
    tokenizer: Path
    runner: Runner

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def precision(self, wanted: str) -> str:
        """bf16 on a GPU; a CPU trains and evaluates in fp32 (no fast bf16 path there)."""
        return wanted if self.cuda else "fp32"

    def variants(self) -> list[Variant]:
        return [v for v in VARIANTS if v.precision != "nf4" or self.nf4 is None]

    def skipped(self) -> list[dict]:
        return [{"variant": v.name, "why": self.nf4} for v in VARIANTS if v.precision == "nf4" and self.nf4]


def tmp_beside(final: Path) -> Path:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


LEFTOVER_GLOBS = ("corpus.tmp-*", "pretrained.tmp-*", "data/*.tmp-*", "evals/*/*.tmp-*")  # what tmp_beside makes


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary folders that a stopped run of this script left (its own names, inside its --out only;
    codetune's commands clean up their own)."""
    gone = []
    for pattern in LEFTOVER_GLOBS:
        for p in out.glob(pattern):
            pid = p.name.rsplit(".tmp-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


# ----------------------------------------------------------------------------------------------
# pretrain


def read_files(files) -> Iterator[tuple[str, str]]:
    """(key, text) of each readable file, read only when the task generator gets to it."""
    for f in files:
        try:
            yield f.key, f.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def build_corpus(ctx: Context) -> corpus_mod.Corpus:
    root = ctx.path("corpus")
    if (root / corpus_mod.CORPUS_JSON).exists():
        return corpus_mod.load(root)
    ctx.runner.check_time("corpus")
    spec = ctx.scale.corpus
    domain, general = corpus_mod.choose(spec)
    kept, _ = corpus_mod.general_files(domain, general)
    by_rank = lambda fs: sorted(fs, key=lambda f: corpus_mod.rank(f.key))  # noqa: E731
    made = {"domain": tasks_mod.generate(read_files(by_rank(domain.files)), "domain", ctx.scale.exec_tasks),
            "general": tasks_mod.generate(read_files(by_rank(kept)), "general", ctx.scale.exec_tasks)}
    forced = frozenset(t.source for ts in made.values() for t in ts)
    extra = {f"tasks-{name}.jsonl": "".join(json.dumps(t.problem()) + "\n" for t in ts) for name, ts in made.items()}
    extra[DECONTAM] = "".join(tasks_mod.decontam_rows(ts) for ts in made.values())
    return corpus_mod.build(spec, root, domain, general, forced, extra)


def tasks_file(ctx: Context, name: str) -> Path:
    return ctx.path("corpus", f"tasks-{name}.jsonl")


def prepare(ctx: Context, corpus: corpus_mod.Corpus, name: str) -> Path:
    final = ctx.path("data", name)
    if (final / "manifest.json").exists():
        return final
    split, fim_rate, val = DATASETS[name]
    tmp = tmp_beside(final)
    args = ["prepare", "--model", ctx.scale.model, "--random-init", "--tokenizer", str(ctx.tokenizer),
            "--sources", *corpus.sources(split), "--data-dir", str(tmp), "--seq-len", str(ctx.scale.seq_len),
            "--fim-rate", str(fim_rate), "--val-fraction", str(val), "--data-seed", str(ctx.seed),
            "--workers", str(ctx.scale.workers), "--no-write-report"]
    if not name.startswith("eval-"):  # training sets lose any file holding a task's function
        args += ["--decontam-files", str(ctx.path("corpus", DECONTAM))]
    final.parent.mkdir(parents=True, exist_ok=True)
    ctx.runner.codetune(f"prepare-{name}", args)
    os.replace(tmp, final)
    return final


def train_args(ctx: Context, settings, data: Path, out_dir: Path) -> list[str]:
    return ["train", "--data-dir", str(data), "--seq-len", str(ctx.scale.seq_len), "--out-dir", str(out_dir),
            "--resume", "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
            "--lr", str(settings.lr), "--warmup-steps", str(settings.warmup_steps),
            "--weight-decay", str(settings.weight_decay), "--eval-every", str(settings.eval_every),
            "--eval-batches", str(settings.eval_batches), "--save-every", str(settings.save_every),
            "--seed", str(ctx.seed), "--no-progress", "--no-tensorboard", *settings.extra]


def pretrained_dir(ctx: Context) -> Path:
    return ctx.path("pretrained")


def stage_pretrain(ctx: Context) -> Path:
    corpus = build_corpus(ctx)
    for name in DATASETS:
        prepare(ctx, corpus, name)
    final = pretrained_dir(ctx)
    if (final / "config.json").exists():
        return final
    run = ctx.path("runs", "pretrain")
    if not (run / "summary.json").exists():
        ctx.runner.codetune("train-pretrain", [
            *train_args(ctx, ctx.scale.pretrain, ctx.path("data", "pretrain"), run), "--model", ctx.scale.model,
            "--random-init", "--precision", ctx.precision("bf16"), "--method", "full", "--train-embeddings"],
            training=True)
    tmp = tmp_beside(final)
    ctx.runner.codetune("merge-pretrain", ["merge", "--adapter", str(run / "adapter"), "--out", str(tmp)])
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------
# finetune


def adapter_dir(ctx: Context, v: Variant) -> Path:
    return ctx.path("runs", v.name, "adapter")


def stage_finetune(ctx: Context, parallel: Callable[[str], None] | None = None) -> None:
    """`parallel(stage)`, where given (run.py --jobs), runs the stage's pending steps at once once what they
    need is made; the loop after it then finds them made."""
    stage_pretrain(ctx)
    if parallel:
        parallel("finetune")
    for v in ctx.variants():
        finetune(ctx, v)


def finetuned(ctx: Context, v: Variant) -> bool:
    return (ctx.path("runs", v.name) / "summary.json").exists()


def finetune(ctx: Context, v: Variant) -> None:
    if finetuned(ctx, v):
        return
    run = ctx.path("runs", v.name)
    s = ctx.scale
    layers = f"last:{s.last_layers}" if v.last_layers else "all"
    ctx.runner.codetune(f"train-{v.name}", [
        *train_args(ctx, s.finetune, ctx.path("data", v.data), run), "--model", str(pretrained_dir(ctx).resolve()),
        "--precision", ctx.precision(v.precision) if v.precision != "nf4" else "nf4", "--method", "lora",
        "--rank", str(s.lora_rank), "--alpha", str(s.lora_alpha), "--train-layers", layers], training=True)


# ----------------------------------------------------------------------------------------------
# eval


def models(ctx: Context) -> list[str]:
    return ["base", *(v.name for v in ctx.variants())]


def eval_dir(ctx: Context, model: str, what: str) -> Path:
    """what: "domain" / "general" (codetune eval: loss + FIM) or "exec-domain" / "exec-general"."""
    return ctx.path("evals", model, what)


def evaluated(ctx: Context, model: str, what: str) -> bool:
    return (eval_dir(ctx, model, what) / "results.json").exists()


def codetune_eval(ctx: Context, model: str, held_out: str) -> None:
    if evaluated(ctx, model, held_out):
        return
    final = eval_dir(ctx, model, held_out)
    s = ctx.scale
    # every model is scored on full-width weights: QLoRA's adapter over the bf16 base, as `codetune merge` ships it
    who = (["--model", str(pretrained_dir(ctx).resolve())] if model == "base"
           else ["--adapter-path", str(ctx.path("runs", model, "adapter").resolve())])
    tmp = tmp_beside(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    ctx.runner.codetune(f"eval-{model}-{held_out}", [
        "eval", *who, "--precision", ctx.precision("bf16"), "--data-dir", str(ctx.path("data", f"eval-{held_out}")),
        "--suites", "loss", "fim", "--fim-source", str(ctx.path("corpus", f"{held_out}-test")),
        "--fim-tasks", str(s.fim_tasks), "--fim-context-chars", str(s.fim_context_chars),
        "--loss-batches", str(s.loss_batches),
        "--loss-batch-size", str(s.loss_batch_size), "--gen-batch-size", str(s.gen_batch_size),
        "--max-new-tokens", str(s.fim_new_tokens), "--eval-dir", str(tmp)])
    os.replace(tmp, final)


def exec_eval(ctx: Context, model: str, held_out: list[str]) -> None:
    """Execution pass@1 of one model on the task sets not yet scored, with one model load."""
    from . import execution

    todo = [name for name in held_out if not evaluated(ctx, model, f"exec-{name}")]
    if not todo:
        return
    name = f"exec-{model}-{'+'.join(todo)}"
    adapter = None if model == "base" else ctx.path("runs", model, "adapter")
    t0 = time.monotonic()
    with ctx.runner.in_time(name):  # (in this process: a codetune command's limit is its runner's)
        execution.run_exec(pretrained_dir(ctx), adapter, ctx.precision("bf16"),
                           {n: (tasks_file(ctx, n), eval_dir(ctx, model, f"exec-{n}")) for n in todo}, ctx.scale)
    ctx.runner.record(name, time.monotonic() - t0, 0)


def stage_eval(ctx: Context, parallel: Callable[[str], None] | None = None) -> dict:
    from . import report

    stage_finetune(ctx, parallel)
    if parallel:
        parallel("eval")
    for model in models(ctx):
        for held_out in TASK_SETS:
            codetune_eval(ctx, model, held_out)
        exec_eval(ctx, model, list(TASK_SETS))
    return report.write(ctx)


# ----------------------------------------------------------------------------------------------
# the same steps as independent jobs, for run.py --jobs: each runs in its own process (`run.py --job
# NAME`), so several share one GPU. A small model leaves most of an H200 and of the CPU cores idle while
# one of them decodes; the order of the jobs changes none of their outputs.


def pending_jobs(ctx: Context, stage: str) -> list[str]:
    """Names of the steps of `stage` ("finetune" or "eval") not yet made, all independent of each other:
    "train:VARIANT", "eval:MODEL:SET" (loss + FIM) and "exec:MODEL:SET" (execution pass@1)."""
    if stage == "finetune":
        return [f"train:{v.name}" for v in ctx.variants() if not finetuned(ctx, v)]
    todo = []
    for model in models(ctx):
        for held_out in TASK_SETS:
            if not evaluated(ctx, model, held_out):
                todo.append(f"eval:{model}:{held_out}")
            if not evaluated(ctx, model, f"exec-{held_out}"):
                todo.append(f"exec:{model}:{held_out}")
    return todo


def run_job(ctx: Context, job: str) -> None:
    """One of pending_jobs' names, run in this process."""
    kind, *what = job.split(":")
    variants = {v.name: v for v in ctx.variants()}
    if kind == "train" and len(what) == 1 and what[0] in variants:
        finetune(ctx, variants[what[0]])
    elif kind == "eval" and len(what) == 2 and what[1] in TASK_SETS:
        codetune_eval(ctx, *what)
    elif kind == "exec" and len(what) == 2 and what[1] in TASK_SETS:
        exec_eval(ctx, what[0], [what[1]])
    else:
        raise ValueError(f"no such job: {job!r}")
