"""`codetune merge`: fold a trained adapter into the base weights and write a plain Hugging Face model
directory (safetensors, config, generation config, tokenizer, model card).

The base is reloaded from its original checkpoint in bf16/fp16 (fp32 or bf16 on the CPU), never from the
4-bit copy used for QLoRA, whatever precision the adapter trained on or a preset names: merging into
dequantized NF4 weights would bake the quantization error into every weight of the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.atomic import ensure_free_space, replace_dir, temp_dir_beside, write_error
from codetune.config import ConfigError, ModelConfig
from codetune.export.card import find_eval_results, model_card
from codetune.export.preflight import check_adapter, check_base, check_out
from codetune.model.load import RUN_INFO, pick_device

CLI_FLAGS = [
    (("--adapter",), dict(required=True, metavar="DIR", help="adapter directory saved by `codetune train` "
                                                               "(<run>/adapter or a checkpoint's adapter/)")),
    (("--out",), dict(required=True, metavar="DIR", help="where the merged model directory is written (a new or "
                                                          "empty folder)")),
    (("--force",), dict(action="store_true", help="replace a model that codetune merge wrote at --out earlier "
                                                  "(any other non-empty folder is refused)")),
    (("--ignore-base-mismatch",), dict(action="store_true",
                                       help="merge even if the base's shape or tokenizer differs from the one "
                                            "the adapter trained on")),
    (("--device",), dict(default="auto", help="where to merge: auto (cuda if present), cpu, cuda, cuda:N")),
    (("--eval-results",), dict(action="append", default=[], metavar="JSON",
                               help="`codetune eval` results.json to quote in the model card (repeatable); "
                                    "<run>/eval/*.json is found on its own")),
]

MERGE_PRECISIONS = ("bf16", "fp16", "fp32")
ELSEWHERE = "choose --out on another disk or folder"
WRITE_MARGIN = 16 * 2**20  # tokenizer, configs and card beside the weights


@dataclass(frozen=True)
class MergePrecision:
    precision: str  # what the base weights are loaded in: one of MERGE_PRECISIONS
    note: str  # the one line that tells the user so


def merge_precision(requested: str | None, trained: str | None, device: torch.device) -> MergePrecision:
    """The requested full precision, else bf16 on a GPU (fp16 if it lacks bf16) and fp32 on the CPU. A
    quantized precision (nf4/int8, e.g. from a training preset) names how the adapter trained, not how to
    merge: the base is always reloaded in full precision."""
    if requested in MERGE_PRECISIONS:
        chosen = requested
    elif device.type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        chosen = "fp32"
    why = []
    if trained and trained not in MERGE_PRECISIONS + ("auto",):
        why.append(f"the adapter trained on {trained} weights")
    if requested and requested not in MERGE_PRECISIONS + ("auto",):
        why.append(f"precision {requested} applies to training, not to merging")
    note = (f"merge: loading the base in {chosen} from its original checkpoint; adapters are always merged into "
            f"full-precision weights{' (' + '; '.join(why) + ')' if why else ''}")
    return MergePrecision(chosen, note)


def set_generation_defaults(model, tokenizer) -> None:
    """Make the saved generation_config stop at EOS and pad with it, as stable-code expects."""
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if gc.bos_token_id is None:
        gc.bos_token_id = model.config.bos_token_id
    model.config.use_cache = True  # training turned the KV cache off; inference wants it on


def merge_adapter(adapter_dir, out_dir, device: torch.device = torch.device("cpu"), precision: str | None = None,
                  force: bool = False, model_cfg=None, eval_results: list[Path] | None = None,
                  ignore_base_mismatch: bool = False) -> Path:
    """Merge `adapter_dir` into its base and write a standard HF model directory at `out_dir`.
    `model_cfg` overrides where the base is read from (e.g. a local copy of the hub model);
    `eval_results` are extra results files for the model card. Everything that can be checked without
    the weights is checked first (see preflight.py)."""
    from codetune.model.load import load_tuned, read_run_info

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise ConfigError(f"--adapter {adapter_dir}: no such folder; give a run's adapter/ (runs/<run>/adapter) "
                          "or a checkpoint's (runs/<run>/checkpoints/step-N/adapter)")
    info = read_run_info(adapter_dir)
    check_adapter(adapter_dir, info)
    check_out(out_dir, force)
    try:  # read before the slow part, so a bad path fails fast
        scores = find_eval_results(adapter_dir, info, eval_results)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # merging needs every weight materialised in one place: no CPU offload even if training used it
    base_cfg = dataclasses.replace(model_cfg or ModelConfig(**info["model"]), weights_max_vram=None)
    if not ignore_base_mismatch:
        check_base(adapter_dir, info, base_cfg,
                   f"--model {base_cfg.model}" if model_cfg is not None else f"{base_cfg.model} as it is now")
    try:
        tmp = temp_dir_beside(out_dir)
    except OSError as e:
        raise (write_error(out_dir, e, ELSEWHERE) or e) from None
    chosen = merge_precision(precision, info.get("model", {}).get("precision"), device)
    print(chosen.note, file=sys.stderr)
    try:
        model, tok, info = load_tuned(adapter_dir, device, precision=chosen.precision, model_cfg=base_cfg)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # W + scale * B @ A, in the base's dtype; removes the PEFT wrappers
        set_generation_defaults(model, tok)
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + WRITE_MARGIN
        ensure_free_space(tmp, need, ELSEWHERE)
        try:
            model.save_pretrained(str(tmp))  # safetensors, config.json, generation_config.json
            tok.save_pretrained(str(tmp))
            run_info = dict(info, merged_from=str(adapter_dir.resolve()), merge_precision=chosen.precision)
            (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
            (tmp / "README.md").write_text(model_card(info, scores, chosen.precision))
            replace_dir(tmp, out_dir)
        except Exception as e:  # a full or read-only disk is the user's to fix: say so; anything else is a bug
            err = write_error(out_dir, e, ELSEWHERE)
            if err is None:
                raise
            raise ConfigError(f"{err} (the partial copy was removed; nothing was written to {out_dir})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once it was renamed into place
    return out_dir


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    device = pick_device(ns.device)
    # --model given explicitly: read the base from there (e.g. a local copy when the run named a hub id)
    model_cfg = cfgs["model"] if hasattr(ns, "model.model") else None
    out = merge_adapter(ns.adapter, ns.out, device=device, precision=cfgs["model"].precision,
                        force=ns.force, model_cfg=model_cfg, eval_results=[Path(p) for p in ns.eval_results],
                        ignore_base_mismatch=ns.ignore_base_mismatch)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0
