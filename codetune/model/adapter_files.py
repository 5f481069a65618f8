"""The one writer of a trained adapter directory, used by the trainer's checkpoints and final save.

A directory holds what `codetune.model.load.load_tuned` needs to rebuild base + adapter offline:
- method "lora": PEFT's own files (adapter_config.json, adapter_model.safetensors), so
  `PeftModel.from_pretrained(base, dir)` works without codetune;
- method "full": only the trained tensors, in trained_weights.safetensors (the frozen rest is the base);
- the tokenizer files, and codetune.json (base model settings, vocab size, init seed, training setup, and
  under "base" the shape and tokenizer of the base it trained on, which `codetune merge` checks).

It is written to a temporary directory beside the target and moved into place, so a crash mid-save
never leaves a half-written adapter where a good one was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from codetune.atomic import replace_dir, temp_dir_beside
from codetune.model.load import RUN_INFO

FULL_WEIGHTS = "trained_weights.safetensors"


@dataclass(frozen=True)
class BaseShape:
    """What an adapter needs of its base: a different one fails to load (shape) or computes garbage
    (tokenizer: the same ids meaning other text). None = not known."""
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    tokenizer: str | None = None  # codetune.model.tokenizer.tokenizer_fingerprint

    def differences(self, other: BaseShape) -> list[str]:
        """Fields known on both sides that differ."""
        return [f.name for f in dataclasses.fields(self)
                if None not in (getattr(self, f.name), getattr(other, f.name))
                and getattr(self, f.name) != getattr(other, f.name)]

    def describe(self, fields: list[str]) -> str:
        return ", ".join(f"{name} {getattr(self, name)}" for name in fields)


def base_shape(hf_config, tokenizer=None) -> BaseShape:
    """The BaseShape of a transformers config (read from config.json, no weights needed) and tokenizer."""
    from codetune.model.tokenizer import tokenizer_fingerprint

    return BaseShape(getattr(hf_config, "hidden_size", None), getattr(hf_config, "num_hidden_layers", None),
                     getattr(hf_config, "vocab_size", None),
                     tokenizer_fingerprint(tokenizer) if tokenizer is not None else None)


def trained_state_dict(model) -> dict:
    """The tensors that training changed (requires_grad), under the base model's own parameter names,
    which is what load_tuned's `load_state_dict(strict=False)` expects."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, tokenizer, info: dict, out_dir: Path) -> Path:
    """Write adapter weights, tokenizer and codetune.json (`info`) to `out_dir` atomically; return it."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    info = dict(info, base=dataclasses.asdict(base_shape(base.config, tokenizer)))
    tmp = temp_dir_beside(out_dir)
    try:
        if info.get("method", "lora") == "full":
            tensors = trained_state_dict(model)
            if not tensors:
                raise ValueError("method 'full' but the model has no trainable parameters to save")
            save_file(tensors, str(tmp / FULL_WEIGHTS), metadata={"format": "pt"})
        else:
            if not hasattr(model, "peft_config"):
                raise ValueError("method 'lora' needs a PEFT model (from apply_adapters); got "
                                 f"{type(model).__name__}")
            # the trained tensors as named_parameters gives them: whole even where model.state_dict() would
            # give FSDP2's shards (a run on several GPUs saves inside train/distributed.whole_parameters)
            model.save_pretrained(str(tmp), state_dict=trained_state_dict(model))
        tokenizer.save_pretrained(str(tmp))
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
