"""Held-out loss and perplexity on the prepared validation split. The output projection is fused with
the cross-entropy in chunks (codetune.model.loss), so no (tokens x vocab) logits tensor is ever kept:
at stable-code-3b's vocabulary one 4k-token sequence of fp32 logits alone would be 0.8 GiB."""

from __future__ import annotations

import math

import torch

from codetune.data.shards import IGNORE, PackedDataset, read_manifest
from codetune.model.adapters import causal_lm
from codetune.model.loss import linear_cross_entropy


def check_tokenizer(data_dir, tok) -> None:
    """Shards made with another tokenizer would give a meaningless loss: refuse them."""
    from codetune.config import ConfigError
    from codetune.model.tokenizer import tokenizer_fingerprint

    want = read_manifest(data_dir).get("tokenizer")
    if want and want != tokenizer_fingerprint(tok):
        raise ConfigError(f"{data_dir} was prepared with another tokenizer (fingerprint {want}); "
                          "re-run `codetune prepare` with this model's tokenizer or point --data-dir elsewhere")


@torch.no_grad()
def evaluate(model, data_dir, batch_size: int = 4, max_batches: int | None = None) -> dict:
    """Mean token cross-entropy (nats) over the val split, its perplexity, the token count, and each
    sequence's summed nats and target count (the report's bootstrap resamples sequences)."""
    ds = PackedDataset(data_dir, "val")
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    total, count, batches, seqs = 0.0, 0, 0, 0
    per_seq: dict[str, list] = {"nats": [], "tokens": []}
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            hidden = lm.model(input_ids=batch["input_ids"].to(device),
                              position_ids=batch["position_ids"].to(device)).last_hidden_state
            labels = batch["labels"].to(device)
            for h, y in zip(hidden, labels):
                per_seq["nats"].append(float(linear_cross_entropy(h, lm.lm_head.weight, y)))
                per_seq["tokens"].append(int((y != IGNORE).sum()))
            total += sum(per_seq["nats"][-len(labels):])
            count += sum(per_seq["tokens"][-len(labels):])
            batches += 1
            seqs += len(labels)
            del hidden
    finally:
        lm.train(was_training)
    if count == 0:
        raise ValueError(f"the val split in {data_dir} has no target tokens; prepare with a larger val_fraction")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "sequences": seqs,
            "per_sequence": per_seq}
