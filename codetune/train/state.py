"""Checkpoints that a crash can't corrupt: each is written to a temporary folder and renamed into
place, the newest K are kept, and a checkpoint from an incompatible configuration is refused.

checkpoints/step-000120/
    trainable.safetensors   every trainable tensor (LoRA A/B, or full layer weights)
    optimizer.pt            optimizer state
    state.pt                step, scheduler, data position, RNG states, whole-run totals (tokens, seconds)
    run.json                the settings that must match on resume
    adapter/                the adapter in its exportable form (PEFT format + tokenizer + codetune.json)

A checkpoint missing one of the resume files (a kill while an older version pruned it) does not count;
one whose file is damaged (truncated by a full disk) is reported by name, and resume falls back to the
previous one (train/resume.maybe_resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from codetune.atomic import is_leftover, replace_dir, write_error
from codetune.config import ConfigError, flag_name
from codetune.model.adapter_files import trained_state_dict

RESUME_FILES = ("trainable.safetensors", "optimizer.pt", "state.pt", "run.json")
# The resume rule. Settings that change the math of the run so far: a checkpoint made with other values
# is refused (naming the key). run.json also records the prepared set's run_key as DATA_KEY and the number
# of processes as PROCESSES_KEY: what must match is the global batch (--batch-size x processes), so a
# run saved on 2 GPUs with --batch-size 2 continues on 1 with --batch-size 4 — the same sequences per
# micro-step in the same order (train/batches.py), the same token-normalised loss.
MUST_MATCH = {"model": ["model", "precision", "random_init"],
              "adapter": ["method", "targets", "rank", "alpha", "lora_dropout", "rslora", "dora", "train_layers"],
              "data": ["seq_len"], "train": ["grad_accum", "seed", "optimizer"]}
DATA_KEY = "data_key"
PROCESSES_KEY = "processes"
# Settings applied from the resume point on (with a notice): the lr schedule is a function of the step and
# these, recomputed with the current values, so more --steps stretch the decay to the new end. Anything
# else (eval/save cadence, logging, engine switches that are exact) may change freely.
APPLIED_ON_RESUME = {"train": ["steps", "lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay",
                               "max_grad_norm"]}
# this module's own temporary names inside checkpoints/ (atomic.py's writers name theirs: is_leftover)
_SAVING, _PRUNING = ".tmp-step-", ".old-"


@dataclasses.dataclass(frozen=True)
class CheckpointDir:
    path: Path
    step: int
    missing: tuple[str, ...]  # resume files it lacks; empty = complete


@dataclasses.dataclass(frozen=True)
class Change:
    key: str  # section.key
    old: object
    new: object

    @property
    def flag(self) -> str:
        return flag_name(self.key.partition(".")[2])


@dataclasses.dataclass
class CheckpointData:
    """Everything a checkpoint holds, read into memory before any of it is applied."""
    path: Path
    run_cfg: dict
    tensors: dict
    optimizer: dict
    state: dict


class DamagedCheckpoint(Exception):
    def __init__(self, path: Path, file: str, reason: str):
        self.path, self.file = Path(path), file
        super().__init__(f"{self.path / file} is damaged or truncated ({reason})")


class Diverged(ConfigError):
    """A non-finite loss or weights: the run stops, and nothing after the last good checkpoint is saved."""

    def __init__(self, step: int, what: str, out_dir: Path):
        good = list_checkpoints(out_dir)
        kept = (f"the last good checkpoint ({good[-1]}) is kept; continue from it with --resume and a lower --lr"
                if good else "no checkpoint had been written yet")
        super().__init__(f"training diverged: {what} at step {step}. Nothing was saved after it; {kept}. "
                         "Fix: lower --lr (3-10x), keep --max-grad-norm on, or check the data")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step-{step:06d}"


def scan_checkpoints(out_dir: Path) -> list[CheckpointDir]:
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    found = [CheckpointDir(p, int(p.name.split("-")[1]), tuple(f for f in RESUME_FILES if not (p / f).is_file()))
             for p in d.iterdir() if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda c: c.step)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [c.path for c in scan_checkpoints(out_dir) if not c.missing]


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Temporary folders and files of saves a kill interrupted (checkpoints, adapter, atomic files) and
    checkpoints renamed aside for pruning. Only names our own writers make; returns what was removed."""
    out, ckpts = Path(out_dir), checkpoint_dir(out_dir)
    found = [p for p in (ckpts.iterdir() if ckpts.is_dir() else ())
             if p.name.startswith((_SAVING, _PRUNING + "step-")) or is_leftover(p.name)]
    found += [p for p in (out.iterdir() if out.is_dir() else ()) if is_leftover(p.name)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def _remove(ckpt: Path) -> None:
    # renamed first (atomic), so a kill halfway through the delete leaves a leftover, not a checkpoint
    # that lacks its weights yet still looks like one
    aside = ckpt.with_name(f"{_PRUNING}{ckpt.name}-{os.getpid()}")
    os.replace(ckpt, aside)
    shutil.rmtree(aside, ignore_errors=True)


def prune(out_dir: Path, keep_last: int) -> None:
    found = scan_checkpoints(out_dir)
    keep = [c for c in found if not c.missing][-keep_last:]
    for c in found:
        if keep and c not in keep and c.step < keep[-1].step:
            _remove(c.path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def nonfinite_check(model, step: int, out_dir: Path) -> None:
    """Diverged if a trained tensor holds NaN/inf: such weights must never replace a good checkpoint."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise Diverged(step, f"{len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]})", out_dir)


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, data_pos: dict, run_cfg: dict,
                    keep_last: int, write_adapter=None, totals: dict | None = None) -> Path:
    """`optimizer`: the optimizer, or its state dict with whole tensors (train/distributed.optimizer_state,
    gathered under FSDP2)."""
    nonfinite_check(model, step, out_dir)  # (on the device, before anything is copied or written)
    tensors = trained_state_dict(model)
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_SAVING, dir=root))
    try:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_pos, "rng": rng_state(),
                    "totals": totals or {}}, tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps(run_cfg, indent=1, default=str))
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        final = checkpoint_path(out_dir, step)
        replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(root, e, elsewhere="choose another --out-dir") if isinstance(e, Exception) else None
        if err is not None:  # a full or read-only disk: one line naming it; the earlier checkpoints are intact
            raise err from None
        raise
    prune(out_dir, keep_last)
    return final


def changes(saved: dict, current: dict, keys: dict) -> list[Change]:
    """Settings of `keys` (section -> names) whose saved value differs; a key the checkpoint predates is skipped."""
    out = []
    for section, names in keys.items():
        for k in names:
            s = saved.get(section, {})
            if k in s and s[k] != current.get(section, {}).get(k):
                out.append(Change(f"{section}.{k}", s[k], current[section][k]))
    return out


def global_batch(run_cfg: dict) -> tuple[int, int]:
    """(--batch-size, processes) of a run.json; one that predates PROCESSES_KEY ran one process."""
    return int(run_cfg.get("train", {}).get("batch_size", 1)), int(run_cfg.get(PROCESSES_KEY) or 1)


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    (b0, p0), (b1, p1) = global_batch(saved), global_batch(current)
    if b0 * p0 != b1 * p1:
        fix = (f"pass --batch-size {b0 * p0 // p1}" if (b0 * p0) % p1 == 0 else
               f"run it on {p0} process{'es' if p0 > 1 else ''} with --batch-size {b0}")
        raise ConfigError(f"cannot resume {where}: it was trained with a global batch of {b0 * p0} (--batch-size {b0} "
                          f"x {p0} process{'es' if p0 > 1 else ''}), now {b1 * p1} (--batch-size {b1} x {p1}), which "
                          f"would change the run so far; {fix}, or a new --out-dir to start fresh")
    for c in changes(saved, current, MUST_MATCH):
        raise ConfigError(f"cannot resume {where}: it was trained with {c.flag} {c.old}, now {c.new}, which would "
                          f"change the run so far; pass {c.flag} {c.old}, or a new --out-dir to start fresh")
    if saved.get(DATA_KEY) not in (None, current.get(DATA_KEY)):
        raise ConfigError(f"cannot resume {where}: the prepared data in --data-dir is not the set this run trained "
                          "on (it was re-prepared or another one); use that data, or a new --out-dir to start fresh")


def check_steps(data: CheckpointData, steps: int) -> None:
    step = int(data.state["step"])
    if steps < step:
        raise ConfigError(f"--steps {steps} is before the checkpoint's step {step} ({data.path}); pass --steps {step} "
                          "or more")


def resume_notices(data: CheckpointData, current: dict, tcfg, lr_now: float) -> list[str]:
    """What resuming with changed APPLIED_ON_RESUME settings does, one line each."""
    step = int(data.state["step"])
    applied = changes(data.run_cfg, current, APPLIED_ON_RESUME)
    lines = [f"{c.flag} {c.old} -> {c.new}: applied from step {step + 1} on" for c in applied]
    if applied and step < tcfg.steps:
        end = "" if tcfg.schedule == "constant" else f", decaying to {tcfg.lr * tcfg.min_lr_ratio:.3g} at step {tcfg.steps}"
        lines.append(f"the {tcfg.schedule} schedule is recomputed for the current settings: lr {lr_now:.3g} at step "
                     f"{step + 1}{end}")
    return lines


def _read(path: Path, name: str, reader):
    try:
        return reader(path / name)
    except Exception as e:  # whatever the reader says (could not find MARK, incomplete metadata, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DamagedCheckpoint(path, name, reason) from None


def read_checkpoint(path: Path) -> CheckpointData:
    """Read (not apply) a checkpoint; DamagedCheckpoint names the first file that cannot be read."""
    path = Path(path)
    pt = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    data = CheckpointData(path, _read(path, "run.json", lambda p: json.loads(p.read_text())),
                          _read(path, "trainable.safetensors", lambda p: load_file(str(p))),
                          _read(path, "optimizer.pt", pt), _read(path, "state.pt", pt))
    if not all(k in data.state for k in ("step", "scheduler", "rng")):
        raise DamagedCheckpoint(path, "state.pt", "step, scheduler or RNG state missing")
    return data


def newest_usable(out_dir: Path, say) -> CheckpointData | None:
    """The newest checkpoint that is complete and readable, read; `say` is told about each one skipped.
    None when there is no checkpoint at all; a ConfigError when there are some but none is usable."""
    found, skipped = scan_checkpoints(out_dir), []
    for c in reversed(found):
        if c.missing:
            skipped.append(f"{c.path} is incomplete (no {', '.join(c.missing)})")
            continue
        try:
            data = read_checkpoint(c.path)
        except DamagedCheckpoint as e:
            skipped.append(str(e))
            continue
        for why in skipped:
            say(f"skipping a checkpoint: {why}; falling back to {c.path.name}")
        return data
    for why in skipped:
        say(f"skipping a checkpoint: {why}")
    if found:
        raise ConfigError(f"no usable checkpoint in {checkpoint_dir(out_dir)} (see above); choose a new --out-dir "
                          "to start over (nothing was touched)")
    return None


def apply_checkpoint(data: CheckpointData, model, optimizer, scheduler, run_cfg: dict) -> dict:
    """Load weights, optimizer moments, schedule position and RNG; the hyperparameters stay the current
    settings' (APPLIED_ON_RESUME). Returns state.pt's dict."""
    check_compatible(data.run_cfg, run_cfg, data.path)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in data.tensors]
    if missing:
        raise ConfigError(f"checkpoint {data.path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                          "it belongs to another configuration")
    from codetune.train.distributed import like_param, reshard_optimizer_state

    with torch.no_grad():
        for n, t in data.tensors.items():
            params[n].copy_(like_param(t, params[n]))  # (FSDP2: this process's shard; bumps version counters, so cached adapter casts go stale)
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(data.optimizer)  # (it restores the saved lr, weight decay, ... too)
    reshard_optimizer_state(optimizer)
    for group, hyper in zip(optimizer.param_groups, current):
        group.update(hyper)
    scheduler.load_state_dict({**data.state["scheduler"], "base_lrs": list(scheduler.base_lrs)})
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # what the next step uses, from the current schedule
    set_rng_state(data.state["rng"])
    return data.state
