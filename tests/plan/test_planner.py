"""`codetune plan` end to end through the CLI, and the order of its suggestions."""

from codetune.cli import main
from codetune.config import build
from codetune.plan.memory import GiB
from codetune.plan.planner import recommend


def test_fits_exits_0_and_prints_the_table(capsys):
    rc = main(["plan", "--model", "stable-code-3b", "--seq-len", "4096", "--gpu-memory", "10GiB"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("weights", "layer_recompute", "loss_chunk", "peak reserved", "fits", "4,096"):
        assert word in out


def test_suggestions_in_order_until_one_fits(capsys):
    rc = main(["plan", "--model", "stable-code-3b", "--seq-len", "16384", "--precision", "bf16", "--method", "full",
               "--offload-activations", "off", "--gpu-memory", "10GiB"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.index("--offload-activations on") < out.index("--precision nf4") < out.index("recommended:")


def test_nothing_fits_exits_3(capsys):
    assert main(["plan", "--model", "stable-code-3b", "--gpu-memory", "2GiB"]) == 3
    assert "nothing tried fits" in capsys.readouterr().out


def test_recommend_keeps_tokens_per_step_when_it_cuts_the_batch():
    c = build(["model", "adapter", "data", "train"],
              {"model": {"model": "stable-code-3b", "precision": "nf4"}, "data": {"seq_len": 16384},
               "train": {"batch_size": 4}})
    tried, found = recommend(c, 8 * GiB)
    assert found is not None and found.fits
    assert found.breakdown.tokens_per_step == 4 * 16384
    assert [s.fits for s in tried] == [False] * (len(tried) - 1) + [True]
