from codetune.eval.generation import GenSettings, GenStats, generate

PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n\n\ndef main():\n    x = 1\n", "class A:"]


def test_batched_greedy_equals_one_by_one(tiny_model, tokenizer):
    batched = generate(tiny_model, tokenizer, PROMPTS, GenSettings(max_new_tokens=12, batch_size=3))
    single = [generate(tiny_model, tokenizer, [p], GenSettings(max_new_tokens=12, batch_size=1))[0] for p in PROMPTS]
    assert batched == single
    assert all(batched)


def test_stop_sequences_and_stats(tiny_model, tokenizer):
    stats, side = GenStats(), tokenizer.padding_side
    out = generate(tiny_model, tokenizer, PROMPTS, GenSettings(max_new_tokens=30, batch_size=2, stop=(" ", "\n")),
                   stats)
    assert all(" " not in o and "\n" not in o for o in out)
    assert stats.samples == 3 and 0 < stats.new_tokens <= 90 and stats.seconds > 0
    assert tokenizer.padding_side == side  # left padding was only for the call


def test_sampling_is_seeded(tiny_model, tokenizer):
    s = GenSettings(max_new_tokens=8, temperature=0.8, batch_size=3, seed=3)
    assert generate(tiny_model, tokenizer, PROMPTS, s) == generate(tiny_model, tokenizer, PROMPTS, s)
