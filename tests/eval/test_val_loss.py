import pytest
import torch

from codetune.data.shards import IGNORE, PackedDataset
from codetune.eval import loss


def test_matches_full_logits_reference(tiny_model, data_dir):
    got = loss.evaluate(tiny_model, data_dir, batch_size=2)
    ds = PackedDataset(data_dir, "val")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            logits = tiny_model(input_ids=item["input_ids"][None], position_ids=item["position_ids"][None]).logits
            total += float(torch.nn.functional.cross_entropy(logits[0].float(), item["labels"], ignore_index=IGNORE,
                                                             reduction="sum"))
            count += int((item["labels"] != IGNORE).sum())
    assert got["tokens"] == count and got["sequences"] == len(ds)
    assert got["loss"] == pytest.approx(total / count, rel=1e-4)
    assert got["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / count)).item(), rel=1e-4)


def test_max_batches_and_peft_wrapper(tiny_model, data_dir):
    from peft import LoraConfig, get_peft_model

    part = loss.evaluate(tiny_model, data_dir, batch_size=1, max_batches=1)
    assert part["sequences"] == 1
    wrapped = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        # fresh LoRA B is zero: the wrapped model must give the same loss as the plain one
        assert loss.evaluate(wrapped, data_dir, batch_size=1, max_batches=1)["loss"] == pytest.approx(part["loss"])
    finally:
        wrapped.unload()


def test_foreign_tokenizer_data_is_refused(tmp_path, tokenizer):
    from codetune.config import ConfigError

    (tmp_path / "manifest.json").write_text('{"tokenizer": "0000000000000000"}')
    with pytest.raises(ConfigError, match="another tokenizer"):
        loss.check_tokenizer(tmp_path, tokenizer)
