"""eval's batched static-cache decoding gives exactly the ids and texts of transformers' `generate`
(the eager path) for left-padded batches of prompts of different lengths, greedy; stop strings are
checked every few steps and a batch ends once every row has stopped."""

import logging

import pytest

from codetune.config import ConfigError
from codetune.eval.batch_decode import BatchDecoder
from codetune.eval.generation import GenSettings, GenStats, generate, resolve_decode

PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n\n\ndef main():\n    x = 1\n    return x\n", "class A:",
           "x = [1, 2, 3]\nfor i in x:\n    print(i)\n# done\n\n\ndef f(y):", "#"]


def _enc(tokenizer, prompts):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def test_ids_equal_generate_for_a_padded_batch(tiny_model, tokenizer):
    enc = _enc(tokenizer, PROMPTS)
    assert (enc["attention_mask"] == 0).any(), "the batch must hold left padding"
    n = 24
    ref = tiny_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                              do_sample=False, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1]:].tolist()
    d = BatchDecoder(tiny_model, check_every=5)
    got = d.greedy(enc["input_ids"], enc["attention_mask"], n, end_ids=[])
    assert got == ref
    assert d.stats.steps == n - 1 and d.stats.replays == 0  # no graphs on the CPU
    # the same shape again reuses the cache (reset in place) and gives the same ids
    assert d.greedy(enc["input_ids"], enc["attention_mask"], n, end_ids=[]) == ref


def test_generate_texts_equal_eager_with_stops(tiny_model, tokenizer):
    # stop strings that the random model hits at different points, so rows end at different steps
    stops = ("\n", " a", ",")
    base = dict(max_new_tokens=40, batch_size=3, stop=stops)
    eager_stats, batched_stats = GenStats(), GenStats()
    eager = generate(tiny_model, tokenizer, PROMPTS, GenSettings(**base, decode="eager"), eager_stats)
    batched = generate(tiny_model, tokenizer, PROMPTS, GenSettings(**base, decode="batched"), batched_stats)
    assert batched == eager
    assert eager_stats.decode == "eager" and batched_stats.decode == "batched"
    # at least one row was cut by a stop string before the budget, or the test shows nothing
    assert eager_stats.new_tokens < 40 * len(PROMPTS)
    no_stop = generate(tiny_model, tokenizer, PROMPTS, GenSettings(max_new_tokens=40, batch_size=3, decode="eager"))
    assert no_stop != eager


def test_batch_ends_once_every_row_stopped(tiny_model, tokenizer):
    stats = GenStats()
    # every completion holds a space within a few tokens: the batch ends long before the budget
    out = generate(tiny_model, tokenizer, PROMPTS[:2], GenSettings(max_new_tokens=200, batch_size=2, stop=(" ",),
                                                                   decode="batched"), stats)
    assert all(" " not in o for o in out)
    assert stats.decoder["steps"] < 100 and stats.decoder["host_checks"] < 20


def test_auto_is_batched_for_greedy_and_eager_for_sampling(tiny_model):
    assert resolve_decode(GenSettings(), tiny_model) == "batched"
    assert resolve_decode(GenSettings(decode="eager"), tiny_model) == "eager"
    assert resolve_decode(GenSettings(temperature=0.8, decode="batched"), tiny_model) == "eager"
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_decode(GenSettings(decode="fast"), tiny_model)


def test_eval_decode_is_an_eval_option():
    from codetune.config import EvalConfig

    assert EvalConfig().eval_decode == "auto"
    with pytest.raises(ConfigError, match="eval_decode"):
        EvalConfig(eval_decode="fast").validate()


def test_left_padding_changes_nothing_for_a_row(tiny_model, tokenizer):
    # a row's ids do not depend on its neighbours' lengths (padding is masked, positions restart)
    alone = BatchDecoder(tiny_model).greedy(*_enc(tokenizer, PROMPTS[2:3]).values(), 16, end_ids=[])
    enc = _enc(tokenizer, PROMPTS)
    together = BatchDecoder(tiny_model).greedy(enc["input_ids"], enc["attention_mask"], 16, end_ids=[])
    assert together[2] == alone[0]


@pytest.mark.parametrize("mode", ["exact", "differ", "fail"])
def test_graph_exact_or_fall_back(tiny_model, tokenizer, fake_cuda_graphs, caplog, mode):
    enc = _enc(tokenizer, PROMPTS)
    n = 12
    ref = BatchDecoder(tiny_model, graphs=False).greedy(enc["input_ids"], enc["attention_mask"], n, end_ids=[])
    d = BatchDecoder(tiny_model, graphs=True)
    fake = fake_cuda_graphs(d, mode)
    with caplog.at_level(logging.WARNING, logger="codetune.eval"):
        for _ in range(2):  # the second batch of the same shape replays the same graph (or tries none)
            assert d.greedy(enc["input_ids"], enc["attention_mask"], n, end_ids=[]) == ref
    warnings = [r for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    if mode == "exact":
        assert d.stats.captured == 1 and not warnings and d.stats.fallback is None
        assert d.stats.replays == fake.replays - 1 == 2 * (n - 1) - 1  # every step but the captured one
    else:
        assert len(warnings) == 1 and d.stats.captured == 0 and d.stats.replays == 0 and not d.graphs
        why = "differ from the eager step's" if mode == "differ" else "capture failed (RuntimeError"
        assert why in d.stats.fallback


def test_a_padded_batch_on_split_attention_gives_generate_s_ids(tiny_model, tokenizer):
    """The batch's steps on the split-KV path (its PyTorch form: no Triton on the CPU) read the left-padded
    mask as SDPA does: the same ids as transformers' generate."""
    from codetune.model.step_attention import REFERENCE_NAME, StepAttention

    enc = _enc(tokenizer, PROMPTS)
    n = 16
    ref = tiny_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                              do_sample=False, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    d = BatchDecoder(tiny_model)
    d.attention = StepAttention(tiny_model, reference=True)
    assert d.attention.name == REFERENCE_NAME
    assert d.greedy(enc["input_ids"], enc["attention_mask"], n, end_ids=[]) == ref[:, enc["input_ids"].shape[1]:].tolist()
