"""codetune merge: the merged model computes what base + adapter computes, and is a plain HF directory."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from codetune.cli import main
from codetune.config import ConfigError, ModelConfig
from codetune.export.merge import merge_adapter
from codetune.model.load import load_model, load_tuned, read_run_info

CPU = torch.device("cpu")


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def merged(lora_adapter, tmp_path_factory):
    return merge_adapter(lora_adapter, tmp_path_factory.mktemp("m") / "merged")


def test_merged_logits_equal_base_plus_adapter(lora_adapter, merged):
    from transformers import AutoModelForCausalLM

    tuned, tok, info = load_tuned(lora_adapter, CPU)
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()  # plain transformers, no codetune/peft
    base, _ = load_model(ModelConfig(**info["model"]), CPU, vocab_size=info["vocab_size"])
    x = _ids(len(tok))
    with torch.no_grad():
        want, got, before = tuned(x).logits, plain(x).logits, base.eval()(x).logits
    assert (want - before).abs().max() > 1e-2, "the test adapter must change the output"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merged_directory_is_complete(merged):
    from transformers import AutoTokenizer, GenerationConfig

    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    tok = AutoTokenizer.from_pretrained(str(merged))
    gc = GenerationConfig.from_pretrained(str(merged))
    assert gc.eos_token_id == tok.eos_token_id
    assert json.loads((merged / "config.json").read_text())["use_cache"] is True
    card = (merged / "README.md").read_text()
    assert "## Training configuration" in card and "| rank | 4 |" in card and "| tokens | 34567 |" in card


def test_model_card_includes_eval_results(lora_adapter, tmp_path):
    eval_dir = lora_adapter.parent / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "humaneval.json").write_text(json.dumps({"pass@1": 0.25}))
    (eval_dir / "broken.json").write_text("{not json")  # tolerated, skipped
    try:
        out = merge_adapter(lora_adapter, tmp_path / "m")
    finally:
        for f in eval_dir.iterdir():
            f.unlink()
        eval_dir.rmdir()
    assert "| humaneval.pass@1 | 0.25 |" in (out / "README.md").read_text()


def test_full_method_merges(full_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    assert (full_adapter / "trained_weights.safetensors").exists()
    tuned, tok, _ = load_tuned(full_adapter, CPU)
    out = merge_adapter(full_adapter, tmp_path / "m")
    x = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(out))(x).logits, tuned(x).logits)


def test_force_replaces_only_a_merged_model(lora_adapter, merged, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for force in (False, True):  # a folder merge did not write is never replaced, --force or not
        with pytest.raises(ConfigError, match="did not write"):
            merge_adapter(lora_adapter, out, force=force)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    shutil.copytree(merged, tmp_path / "ours")
    with pytest.raises(ConfigError, match="--force"):
        merge_adapter(lora_adapter, tmp_path / "ours")
    (tmp_path / "ours" / "stale.bin").write_text("old")
    merge_adapter(lora_adapter, tmp_path / "ours", force=True)
    assert not (tmp_path / "ours" / "stale.bin").exists() and (tmp_path / "ours" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp/old directories left behind"


def test_quantized_precision_merges_in_full_precision(lora_adapter, tmp_path, capsys):
    out = merge_adapter(lora_adapter, tmp_path / "m", precision="nf4")
    assert read_run_info(out)["merge_precision"] == "fp32"
    note = capsys.readouterr().err
    assert "loading the base in fp32" in note and "precision nf4 applies to training" in note


def test_cli_merge_with_the_nf4_preset(lora_adapter, tmp_path, capsys):
    """The 10 GB preset trains in nf4; merge reads it and still merges into full-precision weights."""
    preset = Path(__file__).resolve().parents[2] / "configs" / "stable-code-3b-10gb.yaml"
    assert "precision: nf4" in preset.read_text()
    out = tmp_path / "m"
    assert main(["merge", "--config", str(preset), "--adapter", str(lora_adapter), "--out", str(out),
                 "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("merge: ")]
    assert len(err) == 1 and "in fp32" in err[0] and "nf4" in err[0]
    assert read_run_info(out)["merge_precision"] == "fp32"


def test_cli_merge(lora_adapter, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["merge", "--adapter", str(lora_adapter), "--out", str(out), "--device", "cpu"]) == 0
    assert read_run_info(out)["merge_precision"] == "fp32"
    assert main(["merge", "--adapter", str(lora_adapter), "--out", str(out), "--device", "cpu"]) == 2
    assert "already holds a merged model" in capsys.readouterr().err


def test_eval_results_file_from_codetune_eval(lora_adapter, tmp_path):
    results = tmp_path / "results.json"  # the shape `codetune eval` writes
    results.write_text(json.dumps({"models": {"base": {"loss": {"val_loss": 3.5}}, "tuned": {"loss": {"val_loss": 2.5}}},
                                   "config": {"eval": {}}, "seconds": 1.0}))
    out = merge_adapter(lora_adapter, tmp_path / "m", eval_results=[results])
    card = (out / "README.md").read_text()
    assert "| tuned.loss.val_loss | 2.5 |" in card and "seconds" not in card
    with pytest.raises(ConfigError, match="eval-results"):
        merge_adapter(lora_adapter, tmp_path / "m2", eval_results=[tmp_path / "missing.json"])


def test_generate_from_merged_directory(lora_adapter, merged, capsys):
    from codetune.export.generate import complete

    tuned, tok, _ = load_tuned(lora_adapter, CPU)
    want = complete(tuned, tok, "def main():", 6)
    assert main(["generate", "--model", str(merged), "--prompt", "def main():", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"
