"""save_adapter writes PEFT's own format (usable without codetune) and replaces an old save atomically."""

import json

import torch
from safetensors.torch import load_file

from codetune.config import ModelConfig
from codetune.model.adapter_files import save_adapter
from codetune.model.load import load_model, load_tuned, read_run_info


def test_peft_loads_the_adapter_without_codetune(lora_adapter):
    from peft import PeftConfig, PeftModel

    info = read_run_info(lora_adapter)
    assert info["method"] == "lora" and PeftConfig.from_pretrained(str(lora_adapter)).r == 4
    base, _ = load_model(ModelConfig(**info["model"]), torch.device("cpu"), vocab_size=info["vocab_size"])
    peft_model = PeftModel.from_pretrained(base, str(lora_adapter)).eval()
    tuned, _, _ = load_tuned(lora_adapter, torch.device("cpu"))
    x = torch.arange(16).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, tuned(x).logits)


def test_base_shape_is_recorded(lora_adapter):
    """What merge compares with the base it loads: the shape and the tokenizer training used."""
    from transformers import AutoTokenizer

    from codetune import registry
    from codetune.model.tokenizer import ensure_special_tokens, tokenizer_fingerprint

    info = read_run_info(lora_adapter)
    arch = registry.MODELS["tiny-stablelm"].arch
    tok = ensure_special_tokens(AutoTokenizer.from_pretrained(str(lora_adapter)))
    assert info["base"] == {"hidden_size": arch["hidden_size"], "num_layers": arch["num_hidden_layers"],
                            "vocab_size": info["vocab_size"], "tokenizer": tokenizer_fingerprint(tok)}


def test_full_method_saves_only_trained_tensors(full_adapter):
    tensors = load_file(str(full_adapter / "trained_weights.safetensors"))
    assert tensors and all(name.startswith("model.layers.") for name in tensors)
    assert not (full_adapter / "adapter_config.json").exists()


def test_save_replaces_existing_adapter(lora_adapter, tmp_path):
    tuned, tok, info = load_tuned(lora_adapter, torch.device("cpu"))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    save_adapter(tuned, tok, dict(info, train={"steps": 9}), out)
    assert not (out / "stale.bin").exists()
    assert json.loads((out / "codetune.json").read_text())["train"] == {"steps": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
