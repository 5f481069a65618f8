"""The whole `codetune eval` suite end to end on the tiny model on CPU, through the command line."""

import dataclasses
import json

import pytest
import torch

from codetune.cli import main
from codetune.config import ModelConfig


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer, shared_tokenizer_path):
    """A LoRA adapter saved the way `codetune train` saves one (PEFT files, tokenizer, codetune.json), with
    non-zero weights so base and tuned differ; its run folder holds a metrics.jsonl."""
    from peft import LoraConfig, get_peft_model

    from codetune.model.load import RUN_INFO, load_model, padded_vocab

    run = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path))
    model, _ = load_model(cfg, torch.device("cpu"), vocab_size=padded_vocab(tokenizer), seed=0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = run / "adapter"
    peft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RUN_INFO).write_text(json.dumps({"model": dataclasses.asdict(cfg), "vocab_size": padded_vocab(tokenizer),
                                            "init_seed": 0, "method": "lora"}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5 - s / 4}) for s in range(1, 9)))
    return out


def test_compare_end_to_end(adapter_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    rc = main(["eval", "--compare", "--adapter-path", str(adapter_dir), "--data-dir", str(data_dir),
               "--eval-dir", str(out), "--limit", "2", "--max-new-tokens", "8", "--fim-tasks", "2",
               "--gen-batch-size", "4", "--n-samples", "2", "--temperature", "0.8", "--timeout", "5"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    base, tuned = res["models"]["base"], res["models"]["tuned"]
    assert base["loss"]["loss"] != pytest.approx(tuned["loss"]["loss"])  # the adapter was really switched off
    for r in (base, tuned):
        assert r["humaneval"]["greedy"]["problems"] == 2 and "pass@1" in r["humaneval"]["sampled"]
        assert r["humaneval"]["sandbox"]["python"]
        assert set(r["fim"]) == {"single_line", "multi_line"}
    # the teacher-forced FIM loss too runs on the base with the adapter off
    assert base["fim"]["multi_line"]["middle_loss"] != pytest.approx(tuned["fim"]["multi_line"]["middle_loss"])
    for label in ("base", "tuned"):
        assert len((out / label / "humaneval_greedy.jsonl").read_text().splitlines()) == 2
        rows = [json.loads(x) for x in (out / label / "humaneval_sampled.jsonl").read_text().splitlines()]
        assert all(r["n"] == 2 and len(r["samples"]) == 2 for r in rows)
        assert (out / label / "fim.jsonl").exists()
    text = (out / "report.md").read_text()
    assert "| metric | n | base [95% CI] | tuned [95% CI] | change [95% CI] | verdict |" in text
    assert "not tested" not in text  # every row paired through the per-model files
    assert "| FIM single-line middle loss (nats/token) | 2 tasks |" in text and "| FIM multi-line suffix gain" in text
    assert (out / "metrics.png").exists() and (out / "loss_curves.png").exists()


def test_base_model_humaneval_only_needs_no_data(tmp_path, shared_tokenizer_path):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--suites", "humaneval",
               "--data-dir", str(tmp_path / "none"), "--eval-dir", str(out), "--limit", "2",
               "--max-new-tokens", "8"])
    assert rc == 0
    assert json.loads((out / "results.json").read_text())["models"]["base"]["humaneval"]["greedy"]["problems"] == 2
    assert (out / "report.md").exists()
    # a second eval may replace eval's own earlier results; a folder of the user's is refused, untouched
    assert main(["eval", "--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--suites",
                 "humaneval", "--data-dir", str(tmp_path / "none"), "--eval-dir", str(out), "--limit", "1",
                 "--max-new-tokens", "4"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    assert main(["eval", "--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--suites",
                 "humaneval", "--eval-dir", str(mine), "--limit", "1"]) == 2
    assert (mine / "report.md").read_text() == "my own notes" and sorted(p.name for p in mine.iterdir()) == ["report.md"]


def test_missing_validation_split_is_a_clear_error(tmp_path, capsys, shared_tokenizer_path):
    rc = main(["eval", "--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--suites", "loss",
               "--data-dir", str(tmp_path / "none"), "--eval-dir", str(tmp_path / "eval")])
    assert rc == 2 and "codetune prepare" in capsys.readouterr().err


def test_compare_needs_an_adapter(capsys):
    assert main(["eval", "--compare"]) == 2
    assert "--adapter-path" in capsys.readouterr().err


def test_gpu_trained_adapter_is_evaluated_in_fp32_on_cpu(tmp_path):
    from codetune.eval.run import adapter_precision

    (tmp_path / "codetune.json").write_text(json.dumps({"model": {"model": "tiny-stablelm", "precision": "nf4"}}))
    cpu = torch.device("cpu")
    assert adapter_precision(ModelConfig(), str(tmp_path), cpu) == "fp32"
    assert adapter_precision(ModelConfig(precision="bf16"), str(tmp_path), cpu) == "bf16"
    (tmp_path / "codetune.json").write_text(json.dumps({"model": {"model": "tiny-stablelm", "precision": "fp32"}}))
    assert adapter_precision(ModelConfig(), str(tmp_path), cpu) is None
