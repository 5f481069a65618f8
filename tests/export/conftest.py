import pytest
import torch

# beside this file; pytest puts this folder on sys.path
from tiny_adapter import build_tiny_adapter, codetune_cache  # noqa: F401 (codetune_cache is a fixture)


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory):  # after the autouse codetune_cache
    return build_tiny_adapter(tmp_path_factory.mktemp("run") / "adapter", method="lora")


@pytest.fixture(scope="session")
def full_adapter(tmp_path_factory):
    return build_tiny_adapter(tmp_path_factory.mktemp("run-full") / "adapter", method="full")


@pytest.fixture(scope="session")
def merged_model(lora_adapter, tmp_path_factory):
    from codetune.export.merge import merge_adapter

    return merge_adapter(lora_adapter, tmp_path_factory.mktemp("merged") / "model")


@pytest.fixture(scope="session")
def tiny_gguf(merged_model, tmp_path_factory):
    """The merged tiny model exported in each type the gguf package writes: {quant: path}."""
    from codetune.export.gguf_export import export_gguf

    d = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(d / f"tiny-{q}.gguf", q, model_dir=merged_model).gguf for q in ("f32", "f16", "bf16", "q8_0")}


@pytest.fixture(scope="module")
def tuned(lora_adapter):
    """(model, tokenizer): the tiny trained adapter on its base, on the CPU."""
    from codetune.model.load import load_tuned

    model, tok, _ = load_tuned(lora_adapter, torch.device("cpu"))
    return model, tok
