"""Typed settings: one dataclass per stage. The same fields make the YAML presets, the command-line
flags and the --help text, so the three cannot drift apart.

YAML is sectioned (`model:`, `adapter:`, `train:` ...); flags are flat (`--lr`, `--train-layers`), so
every field name is unique across sections (a test checks it). Validation runs before any heavy work
and every error names the key, the bad value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad setting: the message names the key and how to fix it."""


# --cuda-graphs auto graphs micro-batches up to this many tokens. Measured on an H200 (same call,
# bench/results/raw/s4c.*): 8k graphed 18,370 tok/s vs 17,620 eager (the MLP's sequence chunks made the
# eager 8k step CPU-bound) for +0.21 GiB; 16k graphed 14,494 vs 14,564 eager for +0.49 GiB: not worth it.
# Read by model/graphs.py and the planner.
CUDA_GRAPHS_AUTO_MAX_TOKENS = 8192

def opt(default, help: str, choices: tuple | None = None):
    """A field with its help text (and allowed values) kept next to its default."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def parse_size(text: str | None) -> int | None:
    """'10GiB', '6GB', '512MiB', '1.5G' -> bytes. None stays None."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), flags=re.I)
    if not m:
        raise ConfigError(f"cannot read size {text!r}: write it like 10GiB, 6GB or 512MiB")
    num, unit, ib = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if (ib.lower().startswith("i") or not ib) else 1000
    return int(num * base ** " KMGT".index(unit or " "))


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    model: str = opt("tiny-stablelm", "registry name (stable-code-3b, tiny-stablelm), hub id or local directory")
    random_init: bool = opt(False, "build the architecture with random weights instead of loading them (offline tests, benchmarks)")
    precision: str = opt("auto", "weights: nf4 (QLoRA), int8, bf16, fp16, fp32; auto = nf4 on a GPU, fp32 on CPU",
                         ("auto", "nf4", "int8", "bf16", "fp16", "fp32"))
    tokenizer: str | None = opt(None, "tokenizer directory or tokenizer.json; default: the model's own")
    attn: str = opt("sdpa", "attention kernel", ("sdpa", "eager", "flex_attention", "flash_attention_2"))
    weights_max_vram: str | None = opt(None, "GPU memory for weights; the rest is offloaded to CPU RAM through Accelerate (e.g. 6GiB)")
    trust_remote_code: bool = opt(False, "allow model code from the hub (stable-code-3b does not need it)")

    def validate(self) -> None:
        from codetune import registry

        if registry.lookup(self.model) is None:
            if self.random_init:
                raise ConfigError(f"model={self.model!r}: --random-init needs a registry name "
                                  f"({', '.join(registry.MODELS)}), not a hub id or path")
            looks_local = self.model.startswith((".", "/", "~")) or os.sep in self.model.strip("/").split("/", 1)[-1]
            if looks_local and not Path(self.model).expanduser().exists():
                raise ConfigError(f"model={self.model!r}: no such directory; give a local model directory, "
                                  f"a hub id like stabilityai/stable-code-3b, or one of {list(registry.MODELS)}")
        elif registry.lookup(self.model).hub_id is None and not self.random_init:
            # tiny-stablelm has no published weights: random init is the only way to build it
            self.random_init = True
        if self.tokenizer and not Path(self.tokenizer).expanduser().exists():
            raise ConfigError(f"tokenizer={self.tokenizer!r}: path does not exist; point it at a tokenizer.json "
                              "or a directory holding one, or leave it unset to use the model's own")
        parse_size(self.weights_max_vram)


@dataclass
class AdapterConfig:
    method: str = opt("lora", "what trains: lora adapters, or full weights of the trained layers", ("lora", "full"))
    targets: str = opt("all-linear", "LoRA modules: all-linear, attention, mlp, or comma-separated names (q_proj,v_proj)")
    rank: int = opt(16, "LoRA rank r")
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    rslora: bool = opt(False, "rank-stabilised LoRA scaling")
    dora: bool = opt(False, "weight-decomposed LoRA (DoRA); slower, not with nf4 fast paths")
    train_layers: str = opt("all", "which transformer layers train: all, or last:N (frozen prefix runs without autograd)")
    train_embeddings: bool = opt(False, "with method=full, also train the token embeddings, final norm and output layer "
                                 "(a model trained from scratch, e.g. the demo's random-init one)")

    def validate(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"rank={self.rank}: LoRA rank must be a positive integer (try 8, 16 or 64)")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha}: must be positive (commonly 2 x rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.train_embeddings and self.method != "full":
            raise ConfigError("train_embeddings needs method=full (LoRA keeps the embeddings frozen); add "
                              "--method full or drop --train-embeddings")
        self.last_n_layers()

    def last_n_layers(self) -> int | None:
        """None for all layers, else N from 'last:N'."""
        if self.train_layers == "all":
            return None
        m = re.fullmatch(r"last:(\d+)", self.train_layers)
        if not m or int(m.group(1)) == 0:
            raise ConfigError(f"train_layers={self.train_layers!r}: write 'all' or 'last:N' with N >= 1 (e.g. last:8)")
        return int(m.group(1))


@dataclass
class DataConfig:
    sources: list[str] = opt([], "inputs: directories, git trees, .jsonl/.parquet files, or hf:NAME datasets")
    data_dir: str = opt("runs/data", "where prepared token shards are written (prepare) and read (train, eval)")
    seq_len: int = opt(4096, "tokens per packed training sequence")
    languages: list[str] = opt([], "allowed languages; empty = stable-code-3b's 18 languages plus Markdown")
    content_column: str = opt("content", "text column of JSONL / Parquet / HF sources")
    fim_rate: float = opt(0.5, "probability that a document is rewritten for fill-in-the-middle")
    fim_spm_rate: float = opt(0.5, "of FIM documents, the fraction in SPM order instead of PSM")
    val_fraction: float = opt(0.05, "fraction of repositories held out for validation")
    dedup_threshold: float = opt(0.7, "MinHash Jaccard threshold for near-duplicates")
    decontaminate: bool = opt(True, "drop files containing HumanEval prompts or solutions")
    max_files: int | None = opt(None, "stop after this many input files (quick trials)")
    workers: int = opt(0, "worker processes for reading, cleaning and tokenizing; 0 = number of CPU cores")
    path_column: str | None = opt(None, "JSONL / Parquet / HF column with the file path (gives the language)")
    repo_column: str | None = opt(None, "JSONL / Parquet / HF column with the repository (keeps it in one split)")
    license_column: str | None = opt(None, "JSONL / Parquet / HF column with the license (recorded only)")
    min_file_bytes: int = opt(20, "drop files smaller than this")
    max_file_bytes: int = opt(1_000_000, "drop files larger than this (The Stack's 1 MB bound)")
    max_line_length: int = opt(1000, "drop files with a longer line (bigcode: 1000)")
    max_mean_line_length: float = opt(100.0, "drop files whose mean line length is larger (bigcode: 100)")
    min_alnum_fraction: float = opt(0.25, "drop files with a smaller fraction of alphanumeric characters (bigcode: 0.25)")
    redact_secrets: bool = opt(True, "replace secrets, e-mail and public IP addresses by placeholders")
    near_dedup: bool = opt(True, "drop near-duplicates (MinHash LSH) besides exact duplicates")
    minhash_perms: int = opt(256, "MinHash permutations for near-dedup")
    shingle_size: int = opt(5, "words per shingle for near-dedup")
    decontam_files: list[str] = opt([], "extra benchmark files to decontaminate against (.jsonl rows or source files)")
    data_seed: int = opt(0, "seed of the FIM choices (the split is by hash, not by seed)")
    write_report: bool = opt(True, "write report.md and PNG charts next to the shards")

    def validate(self) -> None:
        if self.seq_len < 16:
            raise ConfigError(f"seq_len={self.seq_len}: too short to train on; use 512 or more (4096 is the preset)")
        for key in ("fim_rate", "fim_spm_rate"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}={v}: a probability, must be within [0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction}: must be within [0, 1)")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError(f"dedup_threshold={self.dedup_threshold}: a Jaccard similarity in (0, 1] (0.7 is bigcode's)")
        if self.minhash_perms < 16 or self.shingle_size < 1:
            raise ConfigError(f"minhash_perms={self.minhash_perms}, shingle_size={self.shingle_size}: use at least "
                              "16 permutations (256 is the default) and 1 word per shingle (5 is the default)")
        if self.min_file_bytes > self.max_file_bytes:
            raise ConfigError(f"min_file_bytes={self.min_file_bytes} exceeds max_file_bytes={self.max_file_bytes}")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers}: 0 (all cores) or a positive number of processes")


@dataclass
class TrainConfig:
    out_dir: str = opt("runs/train", "run directory: checkpoints, metrics, adapter")
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(1, "packed sequences per micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    warmup_steps: int = opt(20, "linear warm-up steps")
    schedule: str = opt("cosine", "decay after warm-up", ("cosine", "linear", "constant"))
    min_lr_ratio: float = opt(0.1, "final lr as a fraction of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay (never on norms and biases)")
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 disables")
    optimizer: str = opt("adamw", "adamw (fused where available) or paged_adamw_8bit (bitsandbytes)",
                         ("adamw", "paged_adamw_8bit"))
    grad_checkpointing: bool = opt(True, "recompute each layer in backward instead of storing activations")
    offload_activations: str = opt("auto", "keep checkpointed layer inputs in pinned CPU RAM: auto (on for GPU), on, off",
                                   ("auto", "on", "off"))
    cpu_embeddings: bool = opt(True, "keep the frozen input-embedding table in CPU RAM and copy only each batch's rows "
                                     "to the GPU (stable-code-3b: -0.24 GiB; exact; one GPU process, untied weights)")
    max_vram: str | None = opt(None, "cap this process's GPU memory, e.g. 10GiB to emulate a 10 GB card")
    fast_lora: bool = opt(True, "fused LoRA linear (dequantize, matmul and adapter in one autograd node); off = PEFT's forward")
    fast_layers: bool = opt(True, "fused decoder-layer forward (q/k/v + rotary and gate/up + SwiGLU as one node each) "
                                  "where exact; off = transformers' layer forward")
    cuda_graphs: str = opt("auto", "replay each layer's training passes as CUDA graphs (fused layers, one process): "
                                   f"auto = micro-batches up to {CUDA_GRAPHS_AUTO_MAX_TOKENS} tokens, where steps are "
                                   "CPU-bound; on; off", ("auto", "on", "off"))
    eval_every: int = opt(100, "validate every N steps; 0 disables")
    eval_batches: int = opt(20, "validation batches per evaluation")
    early_stopping: int = opt(0, "stop after N evaluations without improvement; 0 disables")
    save_every: int = opt(100, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = opt(2, "checkpoints kept")
    resume: bool = opt(False, "continue from the newest checkpoint in out_dir")
    seed: int = opt(0, "random seed (data order, LoRA init, dropout)")
    deterministic: bool = opt(False, "deterministic kernels (bit-exact resume; slower)")
    log_every: int = opt(1, "log metrics every N steps")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: must be positive (2e-4 is typical for LoRA)")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last}: keep at least 1 checkpoint")
        parse_size(self.max_vram)


@dataclass
class EvalConfig:
    adapter_path: str | None = opt(None, "LoRA adapter directory to evaluate on top of the model")
    suites: list[str] = opt(["loss", "humaneval", "fim"], "what to run: loss, humaneval, fim")
    compare: bool = opt(False, "run the suites on the base model and on base + adapter, write report.md")
    eval_dir: str = opt("runs/eval", "where results and the report are written")
    n_samples: int = opt(1, "HumanEval samples per problem (1 = greedy pass@1)")
    temperature: float = opt(0.2, "HumanEval sampling temperature when n_samples > 1")
    max_new_tokens: int = opt(384, "generation budget per HumanEval / FIM completion")
    limit: int | None = opt(None, "only the first N problems (quick runs)")
    timeout: float = opt(10.0, "seconds of wall clock per executed completion")
    gen_batch_size: int = opt(8, "prompts generated together")
    fim_source: str | None = opt(None, "folder of held-out code files for FIM tasks; default: the prepared val split")
    fim_tasks: int = opt(100, "FIM tasks per kind (single-line, multi-line)")
    loss_batch_size: int = opt(4, "validation sequences per forward pass for the loss")
    loss_batches: int | None = opt(None, "only the first N validation batches (quick runs)")

    def validate(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"n_samples={self.n_samples}: must be at least 1")
        if self.adapter_path and not Path(self.adapter_path).exists():
            raise ConfigError(f"adapter_path={self.adapter_path!r}: no such directory; point it at a trained run's adapter/")
        unknown = [s for s in self.suites if s not in ("loss", "humaneval", "fim")]
        if unknown or not self.suites:
            raise ConfigError(f"suites={self.suites}: choose one or more of loss, humaneval, fim")
        if self.compare and not self.adapter_path:
            raise ConfigError("compare=true needs --adapter-path: the adapter to compare against its base model")
        if self.n_samples > 1 and self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} with n_samples={self.n_samples}: sampling needs a "
                              "temperature > 0 (0.2 for pass@1/10, 0.8 for pass@100 as in the Codex paper)")
        if self.timeout <= 0:
            raise ConfigError(f"timeout={self.timeout}: must be positive (seconds per executed completion)")
        for key in ("max_new_tokens", "gen_batch_size", "fim_tasks", "loss_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.fim_source and not Path(self.fim_source).is_dir():
            raise ConfigError(f"fim_source={self.fim_source!r}: not a directory; give a folder of held-out code files")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
}


# ----------------------------------------------------------------------------------------------
# Machinery: YAML + flags -> validated dataclasses


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(section: str, name: str, tp, value):
    """Check/convert one YAML value to the field's type, or raise a ConfigError naming it."""
    base, optional = _strip_optional(tp)
    where = f"{section}.{name}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be empty")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [str(v) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected text, got {type(value).__name__} {value!r}")
        return str(value)
    return value


def _unknown(kind: str, key: str, known) -> ConfigError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else f" Known: {', '.join(sorted(known))}."
    return ConfigError(f"unknown {kind} {key!r}.{hint}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_section_flags(parser: argparse.ArgumentParser, section: str) -> None:
    """One flag per field. Defaults are SUPPRESSed so we can tell 'given' from 'default' when merging."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{section} settings (YAML section '{section}:')")
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag_name(f.name), nargs="+", metavar="X", **kw)
        else:
            group.add_argument(flag_name(f.name), type=tp, choices=f.metadata.get("choices"),
                               metavar=f.name.upper() if not f.metadata.get("choices") else None, **kw)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; see configs/ for presets")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected sections like 'model:' and 'train:' at the top level")
    return data


def build(sections: list[str], yaml_data: dict | None = None, flags: dict | None = None, validate: bool = True):
    """Merge defaults <- YAML <- flags into one dataclass per section, then validate each."""
    yaml_data = dict(yaml_data or {})
    for key in yaml_data:
        if key not in SECTIONS:
            raise _unknown("config section", key, SECTIONS)
    out = {}
    for section in sections:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values = yaml_data.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r}: expected key: value pairs, got {values!r}")
        kwargs = {}
        for key, value in values.items():
            if key not in names:
                raise _unknown(f"key in section '{section}'", key, names)
            kwargs[key] = _coerce(section, key, hints[key], value)
        for dest, value in (flags or {}).items():
            sec, _, key = dest.partition(".")
            if sec == section:
                kwargs[key] = value
        out[section] = cls(**kwargs)
    if validate:
        for cfg in out.values():
            cfg.validate()
        validate_cross(out)
    return out


def validate_cross(cfgs: dict) -> None:
    """Checks that need two sections: context length against the model's maximum."""
    from codetune import registry

    model, data = cfgs.get("model"), cfgs.get("data")
    if model is None or data is None:
        return
    spec = registry.lookup(model.model)
    if spec is not None and data.seq_len > spec.max_positions:
        raise ConfigError(f"seq_len={data.seq_len} exceeds {spec.name}'s maximum context of {spec.max_positions} "
                          f"tokens; use --seq-len {spec.max_positions} or less")


def from_args(sections: list[str], ns: argparse.Namespace) -> dict:
    flags = {k: v for k, v in vars(ns).items() if "." in k}
    yaml_data = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    return build(sections, yaml_data, flags)


def to_dict(cfgs: dict) -> dict:
    return {name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()}
