"""`codetune merge`: fold a trained adapter into the base weights and write a plain Hugging Face model
directory (safetensors, config, generation config, tokenizer, model card).

The base is reloaded from its original checkpoint in bf16/fp16 (fp32 or bf16 on the CPU), never from the
4-bit copy used for QLoRA: merging into dequantized NF4 weights would bake the quantization error into
every weight of the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from codetune.atomic import replace_dir
from codetune.config import ConfigError, ModelConfig
from codetune.export.card import find_eval_results, model_card
from codetune.model.load import RUN_INFO, pick_device

CLI_FLAGS = [
    (("--adapter",), dict(required=True, metavar="DIR", help="adapter directory saved by `codetune train` "
                                                               "(<run>/adapter or a checkpoint's adapter/)")),
    (("--out",), dict(required=True, metavar="DIR", help="where the merged model directory is written")),
    (("--force",), dict(action="store_true", help="replace an existing non-empty --out")),
    (("--device",), dict(default="auto", help="where to merge: auto (cuda if present), cpu, cuda, cuda:N")),
    (("--eval-results",), dict(action="append", default=[], metavar="JSON",
                               help="`codetune eval` results.json to quote in the model card (repeatable); "
                                    "<run>/eval/*.json is found on its own")),
]

MERGE_PRECISIONS = ("bf16", "fp16", "fp32")


def merge_precision(precision: str | None, device: torch.device) -> str:
    """bf16 on a GPU (fp16 if it lacks bf16), fp32 on the CPU unless asked; quantized precisions refused."""
    if precision in (None, "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in MERGE_PRECISIONS:
        raise ConfigError(f"precision={precision}: merging needs full-precision base weights; use one of "
                          f"{', '.join(MERGE_PRECISIONS)} (the adapter trained on nf4 merges fine into bf16)")
    return precision


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; remove it or choose another path")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"--out {out_dir} already exists and is not empty; choose another directory or "
                          "pass --force to replace it (the old one is removed only after the new one is written)")


def set_generation_defaults(model, tokenizer) -> None:
    """Make the saved generation_config stop at EOS and pad with it, as stable-code expects."""
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if gc.bos_token_id is None:
        gc.bos_token_id = model.config.bos_token_id
    model.config.use_cache = True  # training turned the KV cache off; inference wants it on


def merge_adapter(adapter_dir, out_dir, device: torch.device = torch.device("cpu"), precision: str | None = None,
                  force: bool = False, model_cfg=None, eval_results: list[Path] | None = None) -> Path:
    """Merge `adapter_dir` into its base and write a standard HF model directory at `out_dir`.
    `model_cfg` overrides where the base is read from (e.g. a local copy of the hub model);
    `eval_results` are extra results files for the model card."""
    from codetune.model.load import load_tuned, read_run_info

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_out_dir(out_dir, force)
    precision = merge_precision(precision, device)
    info = read_run_info(adapter_dir)
    try:  # read before the slow part, so a bad path fails fast
        scores = find_eval_results(adapter_dir, info, eval_results)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if model_cfg is None:
        # merging needs every weight materialised in one place: no CPU offload even if training used it
        model_cfg = dataclasses.replace(ModelConfig(**info["model"]), weights_max_vram=None)
    model, tok, info = load_tuned(adapter_dir, device, precision=precision, model_cfg=model_cfg)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # W + scale * B @ A, in the base's dtype; removes the PEFT wrappers
    set_generation_defaults(model, tok)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))  # safetensors, config.json, generation_config.json
        tok.save_pretrained(str(tmp))
        run_info = dict(info, merged_from=str(adapter_dir.resolve()), merge_precision=precision)
        (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(info, scores, precision))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    device = pick_device(ns.device)
    # --model given explicitly: read the base from there (e.g. a local copy when the run named a hub id)
    model_cfg = cfgs["model"] if hasattr(ns, "model.model") else None
    out = merge_adapter(ns.adapter, ns.out, device=device, precision=cfgs["model"].precision,
                        force=ns.force, model_cfg=model_cfg, eval_results=[Path(p) for p in ns.eval_results])
    print(f"merged model written to {out}", file=sys.stderr)
    return 0
