"""The FIM suite's teacher-forced loss (codetune/eval/fim_loss.py): the reference middle + EOS scored after the
generation's prompt, its empty-suffix control, and what fim.jsonl, results and the report carry of them."""

import json

import numpy as np
import pytest
import torch

from codetune import registry
from codetune.eval import fim, fim_loss
from codetune.eval import report as ev

CODE = "".join(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n\n" for i in range(8))


def _task():
    return fim.FimTask("multi_line", "def g(a):\n", "    b = a + 1\n    return b\n", "\ndef h():\n    pass\n", "t.py")


def _hand_nats(model, prompt_ids: list[int], target: list[int]) -> float:
    """Cross-entropy of `target` after `prompt_ids` from the model's ordinary full-logits forward."""
    ids = torch.tensor([prompt_ids + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(prompt_ids) - 1
    return float(torch.nn.functional.cross_entropy(logits[start:start + len(target)], torch.tensor(target)))


def test_scored_ids_are_a_training_fim_sample(tokenizer):
    """Prompt + target is exactly what prepare writes for this PSM sample: the pieces encoded apart and joined
    with the FIM ids (data/tokenize.py), then the EOS that closes the middle (data/pipeline.py, packer)."""
    from codetune.data.fim import FimPieces
    from codetune.data.tokenize import PieceEncoder

    t, tokens = _task(), registry.tokens_in(tokenizer)
    pre, suf, mid = tokens.fim()
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in tokens.fim()}
    enc = PieceEncoder(tokenizer.backend_tokenizer.to_str(), ids)
    sample = enc.encode([FimPieces("psm", ((pre, t.prefix), (suf, t.suffix), (mid, t.middle)))])[0].tolist()
    with_suffix, without = fim_loss.sequences(tokenizer, fim.loss_queries([t], tokens)[0])
    assert with_suffix.prompt + with_suffix.target == sample + [tokenizer.eos_token_id]
    assert with_suffix.prompt == tokenizer(fim.prompt(t, tokens), add_special_tokens=False)["input_ids"]
    empty = enc.encode([FimPieces("psm", ((pre, t.prefix), (suf, ""), (mid, t.middle)))])[0].tolist()
    assert without.prompt + without.target == empty + [tokenizer.eos_token_id] and without.target == with_suffix.target


def test_middle_loss_equals_hand_computed_cross_entropy(tiny_model, tokenizer):
    t, tokens = _task(), registry.tokens_in(tokenizer)
    target = tokenizer.encode(t.middle, add_special_tokens=False) + [tokenizer.eos_token_id]
    p_with = tokenizer.encode(fim.prompt(t, tokens), add_special_tokens=False)
    p_without = tokenizer.encode(f"{tokens.fim_prefix}{t.prefix}{tokens.fim_suffix}{tokens.fim_middle}",
                                 add_special_tokens=False)
    [m] = fim_loss.middle_losses(tiny_model, tokenizer, fim.loss_queries([t], tokens), batch_size=2)
    assert m.tokens == len(target)
    assert m.nats == pytest.approx(_hand_nats(tiny_model, p_with, target), abs=1e-5)
    assert m.nats_no_suffix == pytest.approx(_hand_nats(tiny_model, p_without, target), abs=1e-5)
    assert abs(m.nats_no_suffix - m.nats) > 1e-4  # the control is another prompt, so another loss
    assert m.suffix_gain == pytest.approx(m.nats_no_suffix - m.nats)


def test_batched_losses_equal_one_at_a_time(tiny_model, tokenizer):
    """Right padding must not leak into the scored positions: a batch of prompts of different lengths gives each
    the loss it gets alone."""
    tasks = fim.make_tasks([("a.py", CODE)], per_kind=3)
    queries = fim.loss_queries(tasks, registry.tokens_in(tokenizer))
    alone = fim_loss.middle_losses(tiny_model, tokenizer, queries, batch_size=1)
    batched = fim_loss.middle_losses(tiny_model, tokenizer, queries, batch_size=4)
    assert len({len(tokenizer.encode(q.prompt)) for q in queries}) > 1
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens
        assert b.nats == pytest.approx(a.nats, abs=1e-5) and b.nats_no_suffix == pytest.approx(a.nats_no_suffix, abs=1e-5)


def test_special_token_strings_in_the_middle_stay_text(tokenizer):
    """As in training: code that contains "<|endoftext|>" is text, not the end of the middle."""
    ids = fim_loss.plain_encoder(tokenizer)("x = '<|endoftext|>'")
    assert tokenizer.eos_token_id not in ids and len(ids) > 3
    assert not tokenizer.backend_tokenizer.encode_special_tokens  # never switched: the prompts need it off
    assert tokenizer.encode("<|endoftext|>", add_special_tokens=False) == [tokenizer.eos_token_id]


def test_evaluate_records_losses_per_item_and_per_kind(tiny_model, tokenizer, tmp_path):
    class E:
        max_new_tokens, gen_batch_size, eval_decode = 8, 4, "auto"

    tasks = fim.make_tasks([("a.py", CODE)], per_kind=4)
    out = fim.evaluate(tiny_model, tokenizer, tasks, E, tmp_path, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / fim.ITEMS_FILE).read_text().splitlines()]
    for kind, res in out.items():
        kr = [r for r in rows if r["kind"] == kind]
        w = np.asarray([r["middle_tokens"] for r in kr], float)
        for field, key in (("middle_nats", "middle_loss"), ("middle_nats_no_suffix", "middle_loss_no_suffix"),
                           ("suffix_gain", "suffix_gain")):
            assert res[key] == pytest.approx(float((np.asarray([r[field] for r in kr]) * w).sum() / w.sum()))
            iv = res["middle_loss_intervals"][key]
            assert iv["low"] <= res[key] <= iv["high"]
        assert all(r["suffix_gain"] == pytest.approx(r["middle_nats_no_suffix"] - r["middle_nats"]) for r in kr)
        assert res["middle_tokens"] == w.sum() and res["middle_loss"] > 0 and res["middle_loss_cost"]["forward_passes"] == 2 * len(kr)
    # the report reads them back as rows with intervals (token-weighted items, so means agree with results)
    by_label = {m.label: m for m in ev.METRICS}
    for label in ("FIM single-line middle loss (nats/token)", "FIM multi-line suffix gain (nats/token)"):
        m = ev.measure(by_label[label], {"fim": out}, tmp_path)
        assert m is not None and m.items is not None and m.n == 4 and m.interval.low <= m.value <= m.interval.high


def test_an_older_items_file_without_losses_gives_no_loss_items(tmp_path):
    """fim.jsonl from before these fields: the loss rows are left out, the others still read."""
    rows = [{"kind": "single_line", "exact": True, "edit_similarity": 1.0}]
    (tmp_path / fim.ITEMS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_label = {m.label: m for m in ev.METRICS}
    assert ev.read_items(by_label["FIM single-line middle loss (nats/token)"], {}, tmp_path) is None
    assert ev.read_items(by_label["FIM single-line exact match"], {}, tmp_path) is not None
