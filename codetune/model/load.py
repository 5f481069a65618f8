"""Loading a model: registry name, hub id or local directory; random init of a known shape; NF4 / int8
quantization through bitsandbytes; Accelerate placement with optional CPU offload of weights.

Random-init models go through the same loader as real ones: they are initialised once, saved to the
cache as a normal checkpoint, and loaded back — so tests and benchmarks exercise the real path.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
from pathlib import Path

import torch

from codetune import registry
from codetune.config import ConfigError, ModelConfig, parse_size
from codetune.model.tokenizer import cache_root


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-file "Loading weights" / "Writing model shards" bars off for the block, through
    its own switch (transformers.utils.logging), and back to the caller's setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 (with loss scaling); fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_device(name: str = "auto") -> torch.device:
    """--device: auto = the GPU if there is one, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_precision(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        if cfg.precision in ("nf4", "int8") and device.type != "cuda":
            raise ConfigError(f"precision={cfg.precision} needs a CUDA GPU (bitsandbytes); on the CPU use "
                              "--precision fp32 or bf16")
        return cfg.precision
    return "nf4" if device.type == "cuda" else "fp32"


def random_init_checkpoint(name: str, vocab_size: int | None = None, seed: int = 0,
                           device: torch.device | None = None) -> Path:
    """Build `name` with random weights (deterministic in `seed`) and save it once; return its directory."""
    from transformers import AutoModelForCausalLM

    spec = registry.lookup(name)
    if spec is None:
        raise ConfigError(f"{name!r} is not in the registry; random init needs one of {list(registry.MODELS)}")
    config = spec.hf_config(vocab_size)
    path = cache_root() / "random-init" / f"{name}-v{config.vocab_size}-s{seed}"
    if (path / "config.json").exists():
        return path
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # built in its final dtype: an fp32 copy of the 3B shape is 11 GB, over a 10 GB cap
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with quiet_transformers():
        model.save_pretrained(tmp)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # else the 5 GB init copy stays reserved and skews memory readings
    try:
        os.replace(tmp, path)  # atomic; same seed gives the same weights, so whoever lands first wins
    except OSError:  # another process of a multi-GPU run got there first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_source(cfg: ModelConfig, vocab_size: int | None = None, seed: int = 0,
                 device: torch.device | None = None) -> registry.Source:
    """Where from_pretrained reads: a cached random-init checkpoint, a hub id, or a local directory. A hub
    id that cannot be had (not cached, hub offline or unreachable) fails here, at once, in one line."""
    if cfg.random_init:
        return registry.Source(str(random_init_checkpoint(cfg.model, vocab_size, seed, device)), local=True,
                               cache_only=False)
    return registry.resolve(cfg.model)


def quantization_config(precision: str, dtype: torch.dtype, cpu_offload: bool):
    from transformers import BitsAndBytesConfig

    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    return None


def load_model(cfg: ModelConfig, device: torch.device, vocab_size: int | None = None, seed: int = 0):
    """Return (model, precision). `vocab_size` sizes random-init tiny models to their tokenizer."""
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(cfg, device)
    cdtype = compute_dtype(device)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision, cdtype)
    src = model_source(cfg, vocab_size, seed, device)
    kw: dict = dict(dtype=weight_dtype, attn_implementation=cfg.attn, trust_remote_code=cfg.trust_remote_code,
                    local_files_only=src.cache_only)
    cap = parse_size(cfg.weights_max_vram)
    if device.type == "cuda":
        if cap:
            # Accelerate fills the GPU up to the cap and keeps the rest of the weights in CPU RAM.
            kw["device_map"] = "auto"
            kw["max_memory"] = {device.index or 0: cap, "cpu": parse_size("1TiB")}
        else:
            kw["device_map"] = {"": device.index or 0}
    q = quantization_config(precision, cdtype, cpu_offload=bool(cap))
    if q is not None:
        kw["quantization_config"] = q
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(src.path, **kw)
    except OSError as e:
        # transformers' message spans lines (and for a hub id that does not exist, names the repo lookup)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "a model directory" if src.local else "a model on the Hugging Face Hub (or in its cache)"
        raise ConfigError(f"cannot load model {cfg.model!r} from {src.path!r}: {first}. Is it {what}? Pass "
                          "--model with a local model directory, a hub id, or a registry name") from None
    if device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    return model, precision


def check_vocab(model, tokenizer) -> None:
    """A tokenizer with ids past the embedding table would crash mid-run (or train garbage): stop now."""
    n_model = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_model:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_model} rows; "
                          "use the model's own tokenizer (or --tokenizer matching it)")


def padded_vocab(tokenizer, multiple: int = 64) -> int:
    """Embedding rows for a tiny model built around a tokenizer (rounded up like stable-code's 50,304)."""
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


RUN_INFO = "codetune.json"  # written beside a saved adapter: how to rebuild its base model exactly


def read_run_info(adapter_dir: str | Path) -> dict:
    import json

    p = Path(adapter_dir) / RUN_INFO
    if not p.exists():
        raise ConfigError(f"{adapter_dir} has no {RUN_INFO}: not an adapter saved by `codetune train` "
                          "(expected <run>/adapter or <run>/checkpoints/step-N/adapter)")
    try:
        info = json.loads(p.read_text())
    except ValueError as e:  # (a copy cut short, or hand-edited)
        raise ConfigError(f"{p} is not valid JSON ({e}); copy the adapter folder again") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{p} is not a codetune adapter description (a JSON object); copy the adapter folder again")
    return info


def load_tuned(adapter_dir: str | Path, device: torch.device, precision: str | None = None,
               model_cfg: ModelConfig | None = None):
    """Base model + trained adapter, unmerged, ready for generation/eval. Returns (model, tokenizer, info).
    The base is rebuilt from the adapter's codetune.json (same registry name / path, vocab, init seed)
    unless `model_cfg` overrides it; `precision` overrides how base weights are held (e.g. bf16 to merge)."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoTokenizer

    from codetune.model.tokenizer import ensure_special_tokens

    info = read_run_info(adapter_dir)
    base_cfg = model_cfg or ModelConfig(**info["model"])
    if precision:
        base_cfg = dataclasses.replace(base_cfg, precision=precision)
    model, prec = load_model(base_cfg, device, vocab_size=info.get("vocab_size"), seed=info.get("init_seed", 0))
    tok = ensure_special_tokens(AutoTokenizer.from_pretrained(str(adapter_dir)))
    check_vocab(model, tok)
    if info.get("method", "lora") == "lora":
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(adapter_dir) / "trained_weights.safetensors")), strict=False)
    model.eval()
    return model, tok, info
