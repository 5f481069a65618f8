"""Optimizer and learning-rate schedule. Weight decay never touches norms or biases (decaying a
LayerNorm gain toward zero is not regularisation, it's damage)."""

from __future__ import annotations

import math

import torch

from codetune.config import ConfigError, TrainConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    """AdamW (fused on CUDA) or bitsandbytes' paged 8-bit AdamW. (Both update weights without bumping their
    version counters; the fused LoRA path's adapter cache sees their steps by itself, through torch's
    global step hook: model/engine_state.AdapterCasts.)"""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("nothing to train: no parameter requires a gradient (check --method / --targets / --train-layers)")
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("optimizer=paged_adamw_8bit needs a CUDA GPU (bitsandbytes); use --optimizer adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999))
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                          for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused or None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
