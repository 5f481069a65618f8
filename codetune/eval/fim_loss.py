"""Teacher-forced FIM loss: the nats per token the model pays for each FIM task's reference middle, given the
prompt the generation got. Generation metrics are coarse for a weak model (bench/quality's 114M base filled
in 0% of lines exactly); a loss moves by small amounts that paired intervals still resolve (docs/eval.md).
The control asks the same middle with the suffix left out: "suffix gain" = loss without the suffix - loss
with it, positive when the model reads the suffix, i.e. when it infills rather than just continues.

The scored tokens are those training puts after `<fim_middle>` (data/fim.py, data/pipeline.py): the middle,
encoded on its own as plain text, then the EOS that ends every FIM middle since PIPELINE_VERSION 6, which is
how the model says where the middle stops. The prompt's ids are the generation's (`tok(prompt)`), truncated
alike by --fim-context-chars (the tasks already are). Each item costs two forward passes, no generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codetune.eval import stats
from codetune.model.adapters import causal_lm


@dataclass(frozen=True)
class MiddleLoss:
    """One task's teacher-forced loss of its reference middle (+ EOS), in nats per token."""
    tokens: int            # the middle's tokens and the closing EOS
    nats: float            # mean over them, prompt = prefix and suffix (the generation's prompt)
    nats_no_suffix: float  # the same, prompt = prefix only (suffix empty, same FIM format)

    @property
    def suffix_gain(self) -> float:
        return self.nats_no_suffix - self.nats

    def as_row(self) -> dict:
        """The fields fim.jsonl carries per task (eval/report.py reads them by these names)."""
        return {"middle_tokens": self.tokens, "middle_nats": self.nats,
                "middle_nats_no_suffix": self.nats_no_suffix, "suffix_gain": self.suffix_gain}


@dataclass(frozen=True)
class Scored:
    """One teacher-forced sequence: the prompt's ids, then the ids whose loss is taken."""
    prompt: list[int]
    target: list[int]


def plain_encoder(tok):
    """`text -> ids` as training encodes a FIM piece (data/tokenize.PieceEncoder.texts): a special-token string
    inside the code stays text. Its own copy of the fast tokenizer, so the caller's (which encodes the prompts,
    where the FIM strings are control tokens) is never switched; a slow tokenizer encodes as it does."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda text: tok.encode(text, add_special_tokens=False)
    from codetune.data.tokenize import PieceEncoder

    enc = PieceEncoder(backend.to_str(), {})
    return lambda text: enc.texts([text])[0].tolist()


@dataclass(frozen=True)
class Query:
    """What one task's two losses need: its generation prompt, the same prompt with an empty suffix, the middle."""
    prompt: str
    prompt_no_suffix: str
    middle: str


def sequences(tok, q: Query, plain=None) -> tuple[Scored, Scored]:
    """(with suffix, without suffix) for one task: the prompts tokenized as the generation tokenizes its own.
    `plain`: a plain_encoder(tok), made once by a caller with many tasks."""
    if tok.eos_token_id is None:
        raise ValueError("FIM loss needs the tokenizer's EOS token (it ends every FIM middle in training)")
    target = (plain or plain_encoder(tok))(q.middle) + [tok.eos_token_id]
    ids = tok([q.prompt, q.prompt_no_suffix], add_special_tokens=False)["input_ids"]
    return Scored(list(ids[0]), target), Scored(list(ids[1]), target)


@torch.no_grad()
def mean_nats(model, seqs: list[Scored], batch_size: int, pad_id: int) -> list[float]:
    """Mean cross-entropy (nats) of each sequence's target given its prompt, in the order of `seqs`.

    Batches are right-padded: under causal attention a real position never sees the pads after it, so no
    mask is needed and positions run 0..n-1 as in a training row. Logits are made only at the target's
    positions (a prompt of 2k tokens would otherwise cost 2k x vocab fp32 logits for a dozen scored ones)."""
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i].prompt) + len(seqs[i].target)))
    out = [0.0] * len(seqs)
    was_training = lm.training
    lm.eval()
    try:
        for b in range(0, len(order), max(1, batch_size)):
            idx = order[b:b + max(1, batch_size)]
            rows = [seqs[i].prompt + seqs[i].target for i in idx]
            ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            # (no KV cache: nothing is decoded after, and at 3B a batch's cache would be gigabytes)
            hidden = lm.model(input_ids=ids.to(device), use_cache=False).last_hidden_state
            for r, i in enumerate(idx):
                out[i] = _target_nats(lm, hidden[r], seqs[i], device)
            del hidden
    finally:
        lm.train(was_training)
    return out


def _target_nats(lm, hidden: torch.Tensor, seq: Scored, device) -> float:
    start = len(seq.prompt) - 1  # the hidden state at position t predicts token t + 1
    h = hidden[start:start + len(seq.target)]
    logits = lm.lm_head(h).float()
    y = torch.tensor(seq.target, dtype=torch.long, device=device)
    return float(torch.nn.functional.cross_entropy(logits, y))


def middle_losses(model, tok, queries: list[Query], batch_size: int) -> list[MiddleLoss]:
    """Per task, in order: its middle's loss with and without the suffix."""
    plain = plain_encoder(tok)
    pairs = [sequences(tok, q, plain) for q in queries]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nats = mean_nats(model, [s for p in pairs for s in p], batch_size, pad)
    return [MiddleLoss(len(w.target), nats[2 * k], nats[2 * k + 1]) for k, (w, _) in enumerate(pairs)]


def summarise(losses: list[MiddleLoss], seconds: float) -> dict:
    """Token-weighted means over tasks (as the val loss is) with their 95% bootstrap intervals; the suffix gain's
    interval is paired by construction (both losses of a task stay together when tasks are resampled)."""
    w = [m.tokens for m in losses]
    ivs = {"middle_loss": stats.bootstrap_mean([m.nats for m in losses], w),
           "middle_loss_no_suffix": stats.bootstrap_mean([m.nats_no_suffix for m in losses], w),
           "suffix_gain": stats.bootstrap_mean([m.suffix_gain for m in losses], w)}
    return {"middle_tokens": sum(w), **{name: iv.estimate for name, iv in ivs.items()},
            "middle_loss_intervals": {name: {"low": iv.low, "high": iv.high} for name, iv in ivs.items()},
            "middle_loss_cost": {"forward_passes": 2 * len(losses), "seconds": round(seconds, 3)}}
