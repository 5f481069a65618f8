"""Checkpoints that a crash can't corrupt: each is written to a temporary folder and renamed into
place, the newest K are kept, and a checkpoint from an incompatible configuration is refused.

checkpoints/step-000120/
    trainable.safetensors   every trainable tensor (LoRA A/B, or full layer weights)
    optimizer.pt            optimizer state
    state.pt                step, scheduler, data position, RNG states (python, numpy, torch, cuda)
    run.json                the settings that must match on resume
    adapter/                the adapter in its exportable form (PEFT format + tokenizer + codetune.json)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from codetune.atomic import replace_dir
from codetune.config import ConfigError
from codetune.export.adapter import trained_state_dict

# settings that change what the trainable tensors mean; anything else (lr, steps, eval cadence) may change
MUST_MATCH = {"model": ["model", "precision"], "adapter": ["method", "targets", "rank", "alpha", "rslora", "dora",
                                                            "train_layers"], "data": ["seq_len"],
              "train": ["batch_size", "grad_accum", "seed"]}


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    d = checkpoint_dir(out_dir)
    if not d.exists():
        return []
    found = [p for p in d.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, data_pos: dict, run_cfg: dict,
                    keep_last: int, write_adapter=None) -> Path:
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    try:
        save_file(trained_state_dict(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_pos, "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps(run_cfg, indent=1, default=str))
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        final = root / f"step-{step:06d}"
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    for section, keys in MUST_MATCH.items():
        for k in keys:
            a, b = saved.get(section, {}).get(k), current.get(section, {}).get(k)
            if a != b:
                raise ConfigError(f"cannot resume from {where}: it was trained with {section}.{k}={a!r}, now {b!r}. "
                                  f"Use the same setting, or a new --out-dir to start fresh")


def load_checkpoint(path: Path, model, optimizer, scheduler, run_cfg: dict) -> dict:
    check_compatible(json.loads((path / "run.json").read_text()), run_cfg, path)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                          "it belongs to another configuration")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device))
    from codetune.model.lora_fast import adapters_changed

    adapters_changed()  # (copy_ bumps version counters too; this says it outright)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
