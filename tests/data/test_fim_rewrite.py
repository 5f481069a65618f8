"""Stage 8: FIM samples undo to the original document after a real tokenizer's encode/decode round trip;
a tokenizer without FIM tokens is refused. (The split, stage 7, is tested in test_split.py.)"""

import random
from pathlib import Path

import pytest

from codetune import registry
from codetune.config import ConfigError, ModelConfig
from codetune.data.fim import check_fim_tokens, fim_split, render, undo_fim
from codetune.data.tokenize import PieceEncoder
from codetune.model.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)))


@pytest.mark.parametrize("model", ["tiny-stablelm", "tiny-qwen2"])
def test_fim_round_trip_through_tokenizer(model):
    """Each family's own FIM tokens (stable-code's <fim_prefix>, Qwen's <|fim_prefix|>), added to the GPT-NeoX
    fixture by load_tokenizer, round-trip through the encoder and back."""
    tok = load_tokenizer(ModelConfig(model=model, random_init=True, tokenizer=str(SHARED)))
    tokens = registry.special_tokens(model)
    enc = PieceEncoder(tok.backend_tokenizer.to_str(), {t: tok.convert_tokens_to_ids(t) for t in tokens.fim()})
    rng = random.Random(0)
    docs = ["def f(x):\n    return x * 2  # héllo ünïcode ✓\n" * rng.randint(1, 5) + str(i) for i in range(40)]
    pieces = [fim_split(d, str(i), 1.0 if i % 4 else 0.0, 0.5, tokens=tokens) for i, d in enumerate(docs)]
    assert {p.mode for p in pieces} == {"none", "psm", "spm"}
    assert all(p.parts[0][0] == tokens.fim_prefix for p in pieces if p.mode != "none")
    for d, p, ids in zip(docs, pieces, enc.encode(pieces)):
        decoded = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert decoded == render(p)
        assert undo_fim(decoded, tokens) == d


def test_fim_choice_is_deterministic():
    assert fim_split("abcdef" * 10, "k", 0.5, 0.5, seed=3) == fim_split("abcdef" * 10, "k", 0.5, 0.5, seed=3)


def test_literal_special_tokens_in_code_stay_text(tok):
    enc = PieceEncoder(tok.backend_tokenizer.to_str(), {})
    code = 'EOS = "<|endoftext|>"\n'
    ids = enc.encode([fim_split(code, "k", 0.0, 0.0)])[0].tolist()
    assert tok.eos_token_id not in ids and tok.decode(ids) == code


class _SplitsFim:
    def encode(self, s, add_special_tokens=False):
        return [1, 2, 3] if s.startswith("<fim") else [1]


def test_tokenizer_without_fim_tokens_is_refused():
    with pytest.raises(ConfigError, match="fim-rate 0"):
        check_fim_tokens(_SplitsFim(), 0.5)
    check_fim_tokens(_SplitsFim(), 0.0)  # FIM off: no FIM tokens needed
