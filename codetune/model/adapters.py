"""What trains: LoRA adapters through PEFT (saved in PEFT's format), or the full weights of chosen
layers; and which layers train at all (`last:N`)."""

from __future__ import annotations

import torch

from codetune.config import AdapterConfig, ConfigError
from codetune.model.layers import decoder_layers

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PRESETS = {"all-linear": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}


def target_modules(cfg: AdapterConfig, model) -> list[str]:
    names = PRESETS.get(cfg.targets) or [t.strip() for t in cfg.targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               or type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ConfigError(f"targets: no module named {unknown} in this model; linear modules are "
                          f"{sorted(present - {'lm_head'})} (or use all-linear / attention / mlp)")
    return names


def trained_layer_ids(cfg: AdapterConfig, n_layers: int) -> list[int]:
    n = cfg.last_n_layers()
    if n is None:
        return list(range(n_layers))
    if n > n_layers:
        raise ConfigError(f"train_layers=last:{n} but the model has {n_layers} layers; use last:{n_layers} or fewer")
    return list(range(n_layers - n, n_layers))


def apply_adapters(model, cfg: AdapterConfig, seed: int = 0):
    """Freeze everything, then make trainable what `cfg` asks for. Returns the (maybe PEFT-wrapped) model."""
    n_layers = len(decoder_layers(model))
    layer_ids = trained_layer_ids(cfg, n_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "full":
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            raise ConfigError("method=full cannot train quantized weights; use --precision bf16 (or fp32 on CPU) "
                              "or --method lora")
        layers = decoder_layers(model)
        for i in layer_ids:
            for p in layers[i].parameters():
                p.requires_grad_(True)
        if cfg.train_embeddings:  # what sits outside the blocks: embeddings, final norm, output layer
            in_blocks = {id(p) for layer in layers for p in layer.parameters()}
            for p in model.parameters():
                if id(p) not in in_blocks:
                    p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=target_modules(cfg, model), use_rslora=cfg.rslora, use_dora=cfg.dora,
                      layers_to_transform=None if cfg.train_layers == "all" else layer_ids,
                      task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # same LoRA init for the same seed (resume, parity checks)
    return get_peft_model(model, lcfg)


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (its LoRA layers stay active in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
