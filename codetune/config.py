"""Typed settings: one dataclass per stage. The same fields make the YAML presets, the command-line
flags and the --help text, so the three cannot drift apart.

YAML is sectioned (`model:`, `adapter:`, `train:` ...); flags are flat (`--lr`, `--train-layers`), so
every field name is unique across sections (a test checks it). Each field declares (fields.opt) its
allowed values, its range and the commands that read it: a command has flags for those fields alone,
and a shared preset's keys for other commands are skipped. Validation runs before any heavy work and
every error names the key, the bad value and the fix. The argparse side is in cli_flags.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from codetune.fields import ConfigError, Section, opt, parse_size, read_value, spec_of

__all__ = ["ConfigError", "parse_size", "SECTIONS", "build", "load_yaml", "to_dict", "dump_yaml",
           "sections_for", "reads", "validate_cross", "ModelConfig", "AdapterConfig", "DataConfig", "TrainConfig",
           "EvalConfig", "CUDA_GRAPHS_AUTO_MAX_TOKENS"]

# --cuda-graphs auto graphs micro-batches up to this many tokens. Measured on an H200 (same call,
# bench/results/raw/s4c.*): 8k graphed 18,370 tok/s vs 17,620 eager (the MLP's sequence chunks made the
# eager 8k step CPU-bound) for +0.21 GiB; 16k graphed 14,494 vs 14,564 eager for +0.49 GiB: not worth it.
# Read by model/graphs.py and the planner.
CUDA_GRAPHS_AUTO_MAX_TOKENS = 8192

# Which commands read a field (fields.Spec.used_by).
PREPARE = ("prepare",)
TRAIN = ("train",)
TRAIN_PLAN = ("train", "plan")
EVAL = ("eval",)
LOADS_MODEL = ("train", "eval", "merge", "generate", "serve")  # build the model from its weights


@dataclass
class ModelConfig(Section):
    model: str = opt("tiny-stablelm", "registry name (stable-code-3b, qwen2.5-coder-1.5b, tiny-stablelm, tiny-qwen2), hub id or local directory",
                     used_by=("prepare", "plan", *LOADS_MODEL))
    random_init: bool = opt(False, "build the architecture with random weights instead of loading them (offline tests, benchmarks)",
                            used_by=("prepare", *LOADS_MODEL))
    precision: str = opt("auto", "weights: nf4 (QLoRA), int8, bf16, fp16, fp32; auto = nf4 on a GPU, fp32 on CPU",
                         used_by=("plan", *LOADS_MODEL), choices=("auto", "nf4", "int8", "bf16", "fp16", "fp32"))
    tokenizer: str | None = opt(None, "tokenizer directory or tokenizer.json; default: the model's own",
                                used_by=("prepare", "eval", "generate", "serve"))
    attn: str = opt("sdpa", "attention kernel", used_by=("train", "eval", "plan", "generate", "serve"),
                    choices=("sdpa", "eager", "flex_attention", "flash_attention_2"))
    weights_max_vram: str | None = opt(None, "GPU memory for weights; the rest is offloaded to CPU RAM through Accelerate (e.g. 6GiB)",
                                       used_by=("train", "eval", "generate", "serve"))
    trust_remote_code: bool = opt(False, "allow model code from the hub (stable-code-3b does not need it)",
                                  used_by=("prepare", *LOADS_MODEL))

    def cross_checks(self) -> None:
        from codetune import registry

        if registry.lookup(self.model) is None:
            if self.random_init:
                raise ConfigError(f"model={self.model!r}: --random-init needs a registry name "
                                  f"({', '.join(registry.MODELS)}), not a hub id or path")
            registry.check_local_path(self.model)
        elif registry.lookup(self.model).hub_id is None and not self.random_init:
            # tiny-stablelm has no published weights: random init is the only way to build it
            self.random_init = True
        if self.tokenizer and not Path(self.tokenizer).expanduser().exists():
            raise ConfigError(f"tokenizer={self.tokenizer!r}: path does not exist; point it at a tokenizer.json "
                              "or a directory holding one, or leave it unset to use the model's own")
        parse_size(self.weights_max_vram)


@dataclass
class AdapterConfig(Section):
    method: str = opt("lora", "what trains: lora adapters, or full weights of the trained layers",
                      used_by=TRAIN_PLAN, choices=("lora", "full"))
    targets: str = opt("all-linear", "LoRA modules: all-linear, attention, mlp, or comma-separated names (q_proj,v_proj)",
                       used_by=TRAIN_PLAN)
    rank: int = opt(16, "LoRA rank r", used_by=TRAIN_PLAN, ge=1, hint="try 8, 16 or 64")
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)", used_by=TRAIN, gt=0,
                       hint="commonly 2 x rank")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", used_by=TRAIN_PLAN, ge=0, lt=1)
    rslora: bool = opt(False, "rank-stabilised LoRA scaling", used_by=TRAIN)
    dora: bool = opt(False, "weight-decomposed LoRA (DoRA); slower, not with nf4 fast paths", used_by=TRAIN_PLAN)
    train_layers: str = opt("all", "which transformer layers train: all, or last:N (frozen prefix runs without autograd)",
                            used_by=TRAIN_PLAN)
    train_embeddings: bool = opt(False, "with method=full, also train the token embeddings, final norm and output layer "
                                 "(a model trained from scratch, e.g. the demo's random-init one)", used_by=TRAIN_PLAN)

    def cross_checks(self) -> None:
        self.last_n_layers()
        if self.train_embeddings and self.method != "full":
            raise ConfigError("train_embeddings needs method=full (LoRA keeps the embeddings frozen); add "
                              "--method full or drop --train-embeddings")

    def last_n_layers(self) -> int | None:
        """None for all layers, else N from 'last:N'."""
        if self.train_layers == "all":
            return None
        m = re.fullmatch(r"last:(\d+)", self.train_layers)
        if not m or int(m.group(1)) == 0:
            raise ConfigError(f"train_layers={self.train_layers!r}: write 'all' or 'last:N' with N >= 1 (e.g. last:8)")
        return int(m.group(1))


@dataclass
class DataConfig(Section):
    sources: list[str] = opt([], "inputs: directories, git trees, .jsonl/.parquet files, or hf:NAME datasets "
                                 "(also as positional arguments: codetune prepare ~/code/repo)",
                             used_by=PREPARE, positional=True)
    data_dir: str = opt("runs/data", "where prepared token shards are written (prepare) and read (train, eval)",
                        used_by=("prepare", "train", "eval"))
    seq_len: int = opt(4096, "tokens per packed training sequence", used_by=("prepare", "train", "plan"), ge=16,
                       hint="use 512 or more; 4096 is the preset")
    languages: list[str] = opt([], "allowed languages; empty = stable-code-3b's 18 languages plus Markdown", used_by=PREPARE)
    content_column: str = opt("content", "text column of JSONL / Parquet / HF sources", used_by=PREPARE)
    fim_rate: float = opt(0.5, "probability that a document is rewritten for fill-in-the-middle", used_by=PREPARE, ge=0, le=1)
    fim_spm_rate: float = opt(0.5, "of FIM documents, the fraction in SPM order instead of PSM", used_by=PREPARE, ge=0, le=1)
    val_fraction: float = opt(0.05, "share of kept tokens held out for validation, whole repositories (else directories, "
                                    "else files) at a time; 0 = no validation", used_by=PREPARE, ge=0, lt=1)
    dedup_threshold: float = opt(0.7, "MinHash Jaccard threshold for near-duplicates", used_by=PREPARE, gt=0, le=1,
                                 hint="0.7 is bigcode's")
    decontaminate: bool = opt(True, "drop files containing HumanEval prompts or solutions", used_by=PREPARE)
    max_files: int | None = opt(None, "stop after this many input files (quick trials)", used_by=PREPARE, ge=1)
    workers: int = opt(0, "worker processes for reading, cleaning and tokenizing; 0 = number of CPU cores",
                       used_by=PREPARE, ge=0)
    path_column: str | None = opt(None, "JSONL / Parquet / HF column with the file path (gives the language)", used_by=PREPARE)
    repo_column: str | None = opt(None, "JSONL / Parquet / HF column with the repository (keeps it in one split)",
                                  used_by=PREPARE)
    license_column: str | None = opt(None, "JSONL / Parquet / HF column with the license (recorded only)", used_by=PREPARE)
    min_file_bytes: int = opt(20, "drop files smaller than this", used_by=PREPARE, ge=0)
    max_file_bytes: int = opt(1_000_000, "drop files larger than this (The Stack's 1 MB bound)", used_by=PREPARE, ge=1)
    max_line_length: int = opt(1000, "drop files with a longer line (bigcode: 1000)", used_by=PREPARE, ge=1)
    max_mean_line_length: float = opt(100.0, "drop files whose mean line length is larger (bigcode: 100)",
                                      used_by=PREPARE, gt=0)
    min_alnum_fraction: float = opt(0.25, "drop files with a smaller fraction of alphanumeric characters (bigcode: 0.25)",
                                    used_by=PREPARE, ge=0, le=1)
    redact_secrets: bool = opt(True, "replace secrets, e-mail and public IP addresses by placeholders", used_by=PREPARE)
    near_dedup: bool = opt(True, "drop near-duplicates (MinHash LSH) besides exact duplicates", used_by=PREPARE)
    minhash_perms: int = opt(256, "MinHash permutations for near-dedup", used_by=PREPARE, ge=16, hint="256 is the default")
    shingle_size: int = opt(5, "words per shingle for near-dedup", used_by=PREPARE, ge=1, hint="5 is the default")
    decontam_files: list[str] = opt([], "extra benchmark files to decontaminate against (.jsonl rows or source files)",
                                    used_by=PREPARE)
    data_seed: int = opt(0, "seed of the FIM choices (the split is by hash, not by seed)", used_by=PREPARE, ge=0)
    write_report: bool = opt(True, "write report.md and PNG charts next to the shards", used_by=PREPARE)
    data_format: str = opt("auto", "row shape of JSONL / Parquet / HF sources: auto (from the columns), code (text "
                                   "column), messages (OpenAI chat), prompt-completion, instruction (+input, output); "
                                   "folders are always code", used_by=PREPARE,
                           choices=("auto", "code", "messages", "prompt-completion", "instruction"))
    chat_template: str = opt("auto", "how chat rows are rendered: auto = the tokenizer's chat template if it has one, "
                                     "else plain (docs/data.md); plain = always codetune's plain template",
                             used_by=PREPARE, choices=("auto", "plain"))
    mix: str | None = opt(None, "token shares of code and chat in the train split, e.g. code=0.7,chat=0.3 (the "
                                "smaller kind is repeated to reach its share); default: as found", used_by=PREPARE)

    def cross_checks(self) -> None:
        if self.min_file_bytes > self.max_file_bytes:
            raise ConfigError(f"min_file_bytes={self.min_file_bytes} exceeds max_file_bytes={self.max_file_bytes}")
        if self.mix is not None:
            from codetune.data.mix import parse_mix

            parse_mix(self.mix)


@dataclass
class TrainConfig(Section):
    out_dir: str = opt("runs/train", "run directory: checkpoints, metrics, adapter", used_by=TRAIN)
    steps: int = opt(1000, "optimizer steps", used_by=TRAIN, ge=1)
    batch_size: int = opt(1, "packed sequences per micro-step", used_by=TRAIN_PLAN, ge=1)
    grad_accum: int = opt(1, "micro-steps per optimizer step", used_by=TRAIN_PLAN, ge=1)
    lr: float = opt(2e-4, "peak learning rate", used_by=TRAIN, gt=0, hint="2e-4 is typical for LoRA")
    warmup_steps: int = opt(20, "linear warm-up steps", used_by=TRAIN, ge=0)
    schedule: str = opt("cosine", "decay after warm-up", used_by=TRAIN, choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = opt(0.1, "final lr as a fraction of the peak", used_by=TRAIN, ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay (never on norms and biases)", used_by=TRAIN, ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 disables", used_by=TRAIN, ge=0)
    optimizer: str = opt("adamw", "adamw (fused where available) or paged_adamw_8bit (bitsandbytes)",
                         used_by=TRAIN_PLAN, choices=("adamw", "paged_adamw_8bit"))
    grad_checkpointing: bool = opt(True, "recompute each layer in backward instead of storing activations",
                                   used_by=TRAIN_PLAN)
    offload_activations: str = opt("auto", "keep checkpointed layer inputs in pinned CPU RAM: auto (on for GPU), on, off",
                                   used_by=TRAIN_PLAN, choices=("auto", "on", "off"))
    cpu_embeddings: bool = opt(True, "keep the frozen input-embedding table in CPU RAM and copy only each batch's rows "
                                     "to the GPU (stable-code-3b: -0.24 GiB; exact; one GPU process, untied weights)",
                               used_by=TRAIN_PLAN)
    num_gpus: int | None = opt(None, "train on N GPUs of this host: re-runs itself through `accelerate launch` "
                                     "(docs/training.md); default: one process, or as many as an outside launcher "
                                     "started", used_by=TRAIN, ge=1)
    distributed: str = opt("ddp", "how several processes split the work: ddp (each holds the whole model, the "
                                  "data is split) or fsdp (FSDP2: parameters, gradients and optimizer state "
                                  "sharded too; CUDA GPUs only)", used_by=TRAIN, choices=("ddp", "fsdp"))
    max_vram: str | None = opt(None, "cap this process's GPU memory, e.g. 10GiB to emulate a 10 GB card", used_by=TRAIN)
    fast_lora: bool = opt(True, "fused LoRA linear (dequantize, matmul and adapter in one autograd node); off = PEFT's forward",
                          used_by=TRAIN_PLAN)
    fast_layers: bool = opt(True, "fused decoder-layer forward (q/k/v + rotary and gate/up + SwiGLU as one node each) "
                                  "where exact; off = transformers' layer forward", used_by=TRAIN_PLAN)
    cuda_graphs: str = opt("auto", "replay each layer's training passes as CUDA graphs (fused layers, one process): "
                                   f"auto = micro-batches up to {CUDA_GRAPHS_AUTO_MAX_TOKENS} tokens, where steps are "
                                   "CPU-bound; on; off", used_by=TRAIN_PLAN, choices=("auto", "on", "off"))
    eval_every: int = opt(100, "validate every N steps; 0 disables", used_by=TRAIN, ge=0)
    eval_batches: int = opt(20, "validation batches per evaluation", used_by=TRAIN, ge=1)
    early_stopping: int = opt(0, "stop after N evaluations without improvement; 0 disables", used_by=TRAIN, ge=0)
    save_every: int = opt(100, "checkpoint every N steps; 0 = only at the end", used_by=TRAIN, ge=0)
    keep_last: int = opt(2, "checkpoints kept", used_by=TRAIN, ge=1)
    resume: bool = opt(False, "continue from the newest checkpoint in out_dir", used_by=TRAIN)
    seed: int = opt(0, "random seed (data order, LoRA init, dropout)", used_by=TRAIN, ge=0)
    deterministic: bool = opt(False, "deterministic kernels (bit-exact resume; slower)", used_by=TRAIN)
    log_every: int = opt(1, "log metrics every N steps", used_by=TRAIN, ge=1)
    tensorboard: bool = opt(True, "write TensorBoard event files", used_by=TRAIN)
    progress: bool = opt(True, "show a progress bar", used_by=TRAIN)
    dry_run: bool = opt(False, "build everything (data, model, optimizer), print the memory plan, then stop: "
                               "no step runs and nothing is written", used_by=TRAIN)

    def cross_checks(self) -> None:
        parse_size(self.max_vram)


@dataclass
class EvalConfig(Section):
    adapter_path: str | None = opt(None, "LoRA adapter directory to evaluate on top of the model", used_by=EVAL)
    suites: list[str] = opt(["loss", "humaneval", "fim"], "what to run: loss, humaneval, fim", used_by=EVAL,
                            choices=("loss", "humaneval", "fim"))
    compare: bool = opt(False, "run the suites on the base model and on base + adapter, write report.md", used_by=EVAL)
    eval_dir: str = opt("runs/eval", "where results and the report are written", used_by=EVAL)
    n_samples: int = opt(1, "HumanEval samples per problem (1 = greedy pass@1)", used_by=EVAL, ge=1)
    temperature: float = opt(0.2, "HumanEval sampling temperature when n_samples > 1", used_by=EVAL, ge=0)
    max_new_tokens: int = opt(384, "generation budget per HumanEval / FIM completion", used_by=EVAL, ge=1)
    limit: int | None = opt(None, "only the first N problems (quick runs)", used_by=EVAL, ge=1)
    timeout: float = opt(10.0, "seconds of wall clock per executed completion", used_by=EVAL, gt=0)
    gen_batch_size: int = opt(8, "prompts generated together", used_by=EVAL, ge=1)
    eval_decode: str = opt("auto", "how completions are decoded: batched (greedy runs through a static KV cache, "
                           "CUDA-graphed on a GPU; same ids as eager), eager (transformers' generate, the reference; "
                           "sampled runs always use it), auto (batched on the CPU where the model takes a static cache; "
                           "eager on a GPU: batched gives eager's scores, not always its text, docs/eval.md)",
                           used_by=EVAL, choices=("auto", "batched", "eager"))
    fim_source: str | None = opt(None, "folder of held-out code files for FIM tasks; default: the prepared val split",
                                 used_by=EVAL)
    fim_tasks: int = opt(100, "FIM tasks per kind (single-line, multi-line)", used_by=EVAL, ge=1)
    fim_context_chars: int = opt(4000, "characters of prefix and of suffix kept around each FIM task's middle; keep "
                                 "both sides and the new tokens within the length the model was trained on",
                                 used_by=EVAL, ge=100)
    loss_batch_size: int = opt(4, "validation sequences per forward pass for the loss", used_by=EVAL, ge=1)
    loss_batches: int | None = opt(None, "only the first N validation batches (quick runs)", used_by=EVAL, ge=1)

    def cross_checks(self) -> None:
        if self.adapter_path and not Path(self.adapter_path).exists():
            raise ConfigError(f"adapter_path={self.adapter_path!r}: no such directory; point it at a trained run's adapter/")
        if not self.suites:
            raise ConfigError("suites=[]: choose one or more of loss, humaneval, fim")
        if self.compare and not self.adapter_path:
            raise ConfigError("compare=true needs --adapter-path: the adapter to compare against its base model")
        if self.n_samples > 1 and self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} with n_samples={self.n_samples}: sampling needs a "
                              "temperature > 0 (0.2 for pass@1/10, 0.8 for pass@100 as in the Codex paper)")
        if self.fim_source and not Path(self.fim_source).is_dir():
            raise ConfigError(f"fim_source={self.fim_source!r}: not a directory; give a folder of held-out code files")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
}


# ----------------------------------------------------------------------------------------------
# Which command reads what


def reads(command: str, section: str) -> list[dataclasses.Field]:
    """The fields of `section` that `command` reads, in declaration order."""
    return [f for f in dataclasses.fields(SECTIONS[section]) if command in spec_of(f).used_by]


def sections_for(command: str) -> list[str]:
    """The sections holding at least one field that `command` reads."""
    return [s for s in SECTIONS if reads(command, s)]


# ----------------------------------------------------------------------------------------------
# YAML + flags -> validated dataclasses


def _unknown(kind: str, key: str, known) -> ConfigError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else f" Known: {', '.join(sorted(known))}."
    return ConfigError(f"unknown {kind} {key!r}.{hint}")


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


def _yaml_sections(yaml_data: dict) -> dict[str, dict]:
    """Every section and key checked for typos, whichever command runs: a misspelt key in a shared preset
    is a mistake for all of them."""
    for key, values in yaml_data.items():
        if key not in SECTIONS:
            raise _unknown("config section", key, SECTIONS)
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"section {key!r}: expected key: value pairs, got {values!r}")
        names = {f.name for f in dataclasses.fields(SECTIONS[key])}
        for name in values or {}:
            if name not in names:
                raise _unknown(f"key in section '{key}'", name, names)
    return {k: v or {} for k, v in yaml_data.items()}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def build(sections: list[str], yaml_data: dict | None = None, flags: dict | None = None, validate: bool = True,
          command: str | None = None):
    """Merge defaults <- YAML <- flags ({"train.lr": value}) into one dataclass per section, then validate.
    With `command`, YAML keys of fields that command does not read are skipped (presets serve several)."""
    yaml_sections = _yaml_sections(dict(yaml_data or {}))
    out = {}
    for section in sections:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        wanted = {f.name for f in reads(command, section)} if command else set(fields)
        kwargs = {}
        for key, value in yaml_sections.get(section, {}).items():
            if key in wanted:
                kwargs[key] = read_value(f"{section}.{key}", key, fields[key], hints[key], value)
        for dest, value in (flags or {}).items():
            sec, _, key = dest.partition(".")
            if sec == section:
                if key not in fields:
                    raise _unknown(f"key in section '{section}'", key, fields)
                kwargs[key] = read_value(flag_name(key), key, fields[key], hints[key], value)
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


def to_dict(cfgs: dict) -> dict:
    return {name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()}


def dump_yaml(cfgs: dict, command: str | None = None) -> str:
    """The resolved settings as a YAML config that `--config` reads back to the same values. With
    `command`, only the fields that command reads (what --print-config shows)."""
    out = {}
    for section, cfg in cfgs.items():
        names = [f.name for f in (reads(command, section) if command else dataclasses.fields(cfg))]
        if names:
            out[section] = {n: getattr(cfg, n) for n in names}
    return yaml.safe_dump(out, sort_keys=False, default_flow_style=False)
