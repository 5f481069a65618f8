"""The remaining training features on the tiny model on CPU: schedules, weight-decay groups, adapter
variants, full fine-tuning of the last layers, early stopping, and the errors users hit."""

import pytest
import torch

from codetune.cli import main
from codetune.config import ConfigError, build
from codetune.metrics import read_metrics
from codetune.train.memory import explain_oom
from codetune.train.optim import build_optimizer, lr_factor, param_groups

BASE = ["--random-init", "--seq-len", "128", "--batch-size", "2", "--no-progress", "--no-tensorboard",
        "--eval-every", "0"]


def _train(data, out, *extra):
    return main(["train", "--data-dir", str(data), "--out-dir", str(out), *BASE, *extra])


def test_schedules():
    cfg = build(["train"], flags={"train.steps": 100, "train.warmup_steps": 10, "train.min_lr_ratio": 0.1})["train"]
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    cfg.schedule = "constant"
    assert lr_factor(99, cfg) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(m, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(m[0].weight)} and groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_paged_8bit_optimizer_needs_gpu():
    cfg = build(["train"], flags={"train.optimizer": "paged_adamw_8bit"})["train"]
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))


@pytest.mark.parametrize("extra", [["--rslora"], ["--dora"], ["--lora-dropout", "0.1", "--targets", "attention"],
                                   ["--method", "full", "--train-layers", "last:1"],
                                   ["--no-grad-checkpointing", "--train-layers", "last:1"],
                                   ["--schedule", "linear", "--weight-decay", "0.01", "--grad-accum", "2"]])
def test_variants_train(tiny_data, tmp_path, extra):
    assert _train(tiny_data, tmp_path / "r", "--steps", "4", *extra) == 0
    assert len([r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r]) == 4


def test_full_method_on_quantized_weights_is_refused():
    from codetune.config import AdapterConfig, ModelConfig
    from codetune.model.adapters import apply_adapters
    from codetune.model.load import load_model

    model, _ = load_model(ModelConfig(random_init=True), torch.device("cpu"), vocab_size=256)
    model.is_quantized = True  # what transformers sets on a bitsandbytes-loaded model
    with pytest.raises(ConfigError, match="cannot train quantized weights"):
        apply_adapters(model, AdapterConfig(method="full"))


def test_early_stopping(tiny_data, tmp_path):
    # lr 0 never improves: stop after 2 evaluations without improvement
    assert _train(tiny_data, tmp_path / "r", "--steps", "50", "--lr", "1e-12", "--eval-every", "2",
                  "--early-stopping", "2", "--eval-batches", "1", "--warmup-steps", "0") == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert max(steps) < 50


def test_oom_message_names_settings_and_fixes():
    cfgs = build(["model", "adapter", "data", "train"], flags={"train.batch_size": 4, "model.precision": "bf16"})
    msg = explain_oom(cfgs, torch.device("cpu"))
    for s in ("--batch-size 2 --grad-accum 2", "--precision nf4", "--train-layers last:8", "--cuda-graphs off",
              "checkpoint is untouched"):
        assert s in msg


def test_tokenizer_larger_than_embedding_is_refused():
    from codetune.model.load import check_vocab

    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(10, 2)
    with pytest.raises(ConfigError, match="tokenizer has 11 tokens but the model's embedding has 10 rows"):
        check_vocab(model, [0] * 11)


def test_alloc_conf_respects_users_value(monkeypatch):
    from codetune.train.memory import configure_allocator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert "yours, kept" in configure_allocator()
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert "expandable_segments:True" in configure_allocator()


def test_cpu_train_prints_no_cuda_allocator_line(monkeypatch, capsys):
    from codetune.train import recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(recipe, "main", lambda cfgs: {})  # the note is printed before any training
    from codetune.config import TrainConfig

    assert recipe.run({"train": TrainConfig()}, None) == 0
    err = capsys.readouterr().err
    assert "CUDA" not in err and "ALLOC_CONF" not in err
