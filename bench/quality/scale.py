"""The experiment's settings, in one place: the full run (one H200, a few device calls) and the smoke
run (the same pipeline at toy size, on one CPU core in about a minute), and the fine-tuning variants."""

from __future__ import annotations

from dataclasses import dataclass

from .corpus import CorpusSpec


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    save_every: int  # checkpoints are what a run stopped at the time limit resumes from
    weight_decay: float = 0.0
    extra: tuple[str, ...] = ()  # more `codetune train` flags


@dataclass(frozen=True)
class Scale:
    name: str
    model: str                # registry name of the shape pretrained from random init
    corpus: CorpusSpec
    exec_tasks: int           # per task set (domain, general)
    seq_len: int
    pretrain: TrainSettings
    finetune: TrainSettings
    lora_rank: int
    lora_alpha: float
    last_layers: int          # N of the --train-layers last:N variant
    fim_tasks: int            # per kind (single-line, multi-line) and per set
    loss_batches: int
    loss_batch_size: int
    gen_batch_size: int
    exec_new_tokens: int
    fim_new_tokens: int       # codetune eval caps it at 64 (single-line) and 256 (multi-line)
    fim_context_chars: int    # of prefix and of suffix per FIM task: both sides and the new tokens within seq_len
    workers: int              # prepare's; 0 = every core


FULL = Scale(
    name="full", model="stablelm-114m",
    corpus=CorpusSpec(domain="sympy", min_package_bytes=1_000_000, max_package_bytes=80_000_000,
                      max_domain_bytes=None, domain_parts=(),
                      max_general_bytes=500_000_000, general_test_fraction=0.02, domain_test_fraction=0.15),
    exec_tasks=150, seq_len=1024,
    # ~49M tokens; bf16 weights (no fp32 master copy: at lr 1e-3 an update is ~10x bf16's resolution)
    pretrain=TrainSettings(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, eval_every=250, eval_batches=20,
                           save_every=250, weight_decay=0.1,
                           # 11 GiB of activations kept instead of one forward more per step (codetune plan)
                           extra=("--no-grad-checkpointing", "--offload-activations", "off")),
    # ~4.9M tokens, about one pass over the domain's training files
    finetune=TrainSettings(steps=300, batch_size=16, lr=5e-4, warmup_steps=20, eval_every=100, eval_batches=10,
                           save_every=100),
    lora_rank=16, lora_alpha=32.0, last_layers=3,
    fim_tasks=100, loss_batches=50, loss_batch_size=8, gen_batch_size=32, exec_new_tokens=256, fim_new_tokens=256,
    # ~370 tokens a side at about 3 characters a token, + 256 new: within the 1024 positions pretraining saw (eval's
    # default of 4,000 a side makes prompts of well over 1024 tokens, positions this model never trained on)
    fim_context_chars=1100,
    workers=0)

SMOKE = Scale(
    name="smoke", model="tiny-stablelm",
    corpus=CorpusSpec(domain="sympy", min_package_bytes=100_000, max_package_bytes=200_000,
                      # (the sub-packages richest in self-contained functions: the smoke gets a few tasks)
                      max_domain_bytes=600_000, domain_parts=("polys", "utilities"),
                      max_general_bytes=800_000, general_test_fraction=0.1, domain_test_fraction=0.2),
    exec_tasks=4, seq_len=128,
    pretrain=TrainSettings(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=6, eval_batches=1,
                           save_every=6),
    finetune=TrainSettings(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=1,
                           save_every=0),
    lora_rank=8, lora_alpha=16.0, last_layers=1,
    fim_tasks=3, loss_batches=2, loss_batch_size=4, gen_batch_size=8, exec_new_tokens=16, fim_new_tokens=12,
    fim_context_chars=200,
    workers=1)

SCALES = {s.name: s for s in (FULL, SMOKE)}


@dataclass(frozen=True)
class Variant:
    """One way of fine-tuning the pretrained model on the domain."""
    name: str
    data: str          # which prepared domain set: "ft-fim50" or "ft-fim0"
    precision: str     # "nf4" (QLoRA, CUDA only) or "bf16" (fp32 on a CPU)
    last_layers: bool  # LoRA on the last N layers only (--train-layers last:N)
    what: str


VARIANTS = (
    Variant("qlora", "ft-fim50", "nf4", False, "rank-{rank} LoRA on every linear layer over NF4 base weights (QLoRA), FIM 0.5"),
    Variant("lora-bf16", "ft-fim50", "bf16", False, "rank-{rank} LoRA on every linear layer over bf16 weights, FIM 0.5"),
    Variant("lora-last", "ft-fim50", "bf16", True, "as lora-bf16 on the last {last} layers only (--train-layers last:{last})"),
    Variant("lora-fim0", "ft-fim0", "bf16", False, "as lora-bf16, on the domain data without FIM rewriting"),
)
REFERENCE = "lora-bf16"  # what the other variants are compared with, beside the base
DATASETS = {  # prepared set -> (corpus split, FIM rate, validation share)
    "pretrain": ("pretrain", 0.5, 0.01),
    "ft-fim50": ("domain-train", 0.5, 0.02),
    "ft-fim0": ("domain-train", 0.0, 0.02),
    # the held-out sets: loss is measured on their val split, which is nearly all of them (prepare keeps a
    # few files on the train side, unused)
    "eval-domain": ("domain-test", 0.0, 0.95),
    "eval-general": ("general-test", 0.0, 0.95),
}
