"""The second model family end to end on the CPU: `codetune prepare` and `codetune train --model tiny-qwen2
--random-init`. No hub in tests, so tiny-qwen2's tokenizer is the GPT-NeoX fixture with Qwen's FIM tokens
added (model/tokenizer.load_tokenizer asks registry.special_tokens for the family's: docs/training.md, Model families)."""

import json

import torch

from codetune import registry
from codetune.cli import main
from codetune.data.shards import PackedDataset
from codetune.metrics import read_metrics


def test_tiny_qwen2_prepares_with_qwen_fim_tokens_and_trains(stdlib, shared_tokenizer_path, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    common = ["--model", "tiny-qwen2", "--random-init", "--data-dir", str(data), "--seq-len", "64"]
    assert main(["prepare", *common, "--tokenizer", str(shared_tokenizer_path), "--sources", str(stdlib / "json"), "--fim-rate", "1.0",
                 "--val-fraction", "0.3"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    qwen = registry.lookup("tiny-qwen2").tokens
    ids = {t: tok.convert_tokens_to_ids(t) for t in qwen.all()}
    assert all(isinstance(i, int) and i != tok.unk_token_id for i in ids.values())
    assert "<fim_prefix>" not in tok.get_vocab()  # stable-code's tokens were not added alongside
    seen = set(PackedDataset(data, "train").tokens[:].reshape(-1).tolist())
    assert ids[qwen.fim_prefix] in seen and ids[qwen.fim_middle] in seen  # FIM data in Qwen's tokens

    assert main(["train", *common, "--out-dir", str(out), "--steps", "3", "--batch-size", "1", "--lr", "3e-3",
                 "--eval-every", "0", "--no-progress", "--no-tensorboard"]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    info = json.loads((out / "adapter" / "codetune.json").read_text())
    assert info["model"]["model"] == "tiny-qwen2"
