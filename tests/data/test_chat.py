"""Prompt/response rows: shapes, rendering, and which tokens carry loss, token by token, through
packing and back out of PackedDataset as the trainer's labels."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from codetune.config import ConfigError
from codetune.data import chat
from codetune.data.chat import Message, Template
from codetune.data.shards import IGNORE, PackedDataset, Packer, ShardWriter
from codetune.data.tokenize import PieceEncoder

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return PreTrainedTokenizerFast(tokenizer_file=str(SHARED), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def chatml_tok():
    t = PreTrainedTokenizerFast(tokenizer_file=str(SHARED), eos_token="<|endoftext|>")
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def _enc(tok):
    return PieceEncoder(tok.backend_tokenizer.to_str(), {})


def test_shapes_are_detected_or_named_and_anything_else_is_one_clear_error():
    assert chat.detect("s", ["messages", "id"], "auto", "content") == ("messages", ("messages",))
    assert chat.detect("s", ["prompt", "completion"], "auto", "content")[0] == "prompt-completion"
    assert chat.detect("s", ["instruction", "input", "output"], "auto", "content") == \
        ("instruction", ("instruction", "output", "input"))
    assert chat.detect("s", ["instruction", "output"], "auto", "content")[1] == ("instruction", "output")
    assert chat.detect("s", ["content", "path"], "auto", "content")[0] == "code"
    assert chat.detect("s", ["messages", "text"], "code", "text")[0] == "code"  # the flag wins over detection
    with pytest.raises(ConfigError, match=r"columns: q, a\); accepted: code .*messages.*prompt\+completion.*"
                                          r"instruction\+output"):
        chat.detect("d.jsonl", ["q", "a"], "auto", "content")
    with pytest.raises(ConfigError, match="no column 'completion' for --data-format prompt-completion"):
        chat.detect("d.jsonl", ["prompt", "answer"], "prompt-completion", "content")


def test_rows_become_conversations_or_a_counted_reason():
    assert chat.to_messages({"instruction": "Sort.", "input": "[3, 1]", "output": "[1, 3]"}, "instruction") == \
        (Message("user", "Sort.\n\n[3, 1]"), Message("assistant", "[1, 3]"))
    assert chat.to_messages({"instruction": "Hi", "input": None, "output": "Yo"}, "instruction")[0].content == "Hi"
    assert chat.to_messages({"prompt": "p", "completion": "c"}, "prompt-completion")[1] == Message("assistant", "c")
    assert chat.to_messages({"messages": [{"role": "tool", "content": "x"}]}, "messages") == "bad_messages"
    assert chat.to_messages({"messages": "hello"}, "messages") == "bad_messages"
    assert chat.to_messages({"messages": [{"role": "user", "content": "q"}]}, "messages") == "no_response"
    assert chat.to_messages({"prompt": "p", "completion": 3}, "prompt-completion") == "bad_messages"


CONV = (Message("system", "Be brief."), Message("user", "Add one to x. <|endoftext|>"),
        Message("assistant", "x + 1"), Message("user", "And two?"), Message("assistant", "x + 2"))


def _split(tok, e):
    """(target text, other text) of an encoded conversation, each piece decoded with special tokens."""
    tgt = [int(i) for i, t in zip(e.ids, e.target) if t]
    return tok.decode(tgt), tok.decode([int(i) for i, t in zip(e.ids, e.target) if not t])


def test_plain_template_puts_loss_on_assistant_turns_and_their_eos_only(tok):
    t = chat.template_of(tok)
    assert t.jinja is None
    e = chat.encode(chat.render(CONV, t), _enc(tok))
    ids = e.ids.tolist()
    eos = tok.eos_token_id
    as_text = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    as_text.encode_special_tokens = True
    # token by token: the targets are exactly each assistant content's ids followed by EOS
    expect = []
    for m in CONV:
        head = tok.encode(f"### {m.role.capitalize()}:\n", add_special_tokens=False)
        body = as_text.encode(m.content, add_special_tokens=False).ids
        if m.role == "assistant":
            expect += [(i, False) for i in head] + [(i, True) for i in body] + [(eos, True)]
        else:
            expect += [(i, False) for i in head + body + tok.encode("\n\n", add_special_tokens=False)]
    assert list(zip(ids, e.target.tolist())) == expect
    # the user's "<|endoftext|>" is text, not the control token: only the two turn ends are EOS
    assert ids.count(eos) == 2


def test_tokenizer_template_marks_content_and_end_of_turn(chatml_tok):
    t = chat.template_of(chatml_tok)
    chat.check_template(t)
    e = chat.encode(chat.render(CONV, t), _enc(chatml_tok))
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    target, other = _split(chatml_tok, e)
    assert target == "x + 1<|im_end|>x + 2<|im_end|>"
    assert other.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert e.ids.tolist().count(im_end) == 5  # one per turn, each a single control id
    assert chat.template_of(chatml_tok, "plain").jinja is None


def test_template_without_a_special_end_gets_eos_and_a_broken_one_is_refused(tok):
    bare = Template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", None, tok.eos_token,
                    (tok.eos_token,))
    e = chat.encode(chat.render(CONV[1:3], bare), _enc(tok))
    assert _split(tok, e)[0] == "x + 1" + tok.eos_token
    dropping = Template("{{ messages[0]['content'] }}", None, tok.eos_token, (tok.eos_token,))
    with pytest.raises(ConfigError, match="--chat-template plain"):
        chat.check_template(dropping)


@pytest.mark.parametrize("choice", ["auto", "plain"])
def test_inference_prompt_is_the_training_prefix(chatml_tok, choice):
    """generate/serve's prompt_ids and prepare's rendering agree: the prompt is the training sample up
    to the first target token."""
    conv = (Message("user", "Add one to x."), Message("assistant", "x + 1"))
    train = chat.encode(chat.render(conv, chat.template_of(chatml_tok, choice)), _enc(chatml_tok))
    prompt = chat.prompt_ids(chatml_tok, conv[:1], choice)
    first = int(np.argmax(train.target))
    assert prompt.tolist() == train.ids[:first].tolist()


def test_loss_positions_are_exact_through_packing(tmp_path, tok):
    """Code and chat documents packed across sequence boundaries: the dataset's labels are, position by
    position, the next token where that token is a target inside the same document, else IGNORE."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(40):
        ids = rng.integers(5, 400, size=int(rng.integers(3, 30)))
        target = None if i % 3 == 0 else rng.random(len(ids)) < 0.5
        docs.append((ids, target))
    seq_len = 16
    packer = Packer(ShardWriter(tmp_path / "train", seq_len, 500), 0, 1)
    stream = []  # (token, target, doc number) in packing order
    for n, (ids, target) in enumerate(docs):
        packer.add_document(ids, target)
        t = [True] * len(ids) if target is None else target.tolist()
        stream += [(int(a), b, n) for a, b in zip(ids, t)] + ([(0, True, n)] if target is None else [])
    meta = packer.finish()
    assert meta["loss_mask"] is True
    rows = []  # the labels of each cut of the stream; a cut with none is dropped by the packer
    for i in range(0, len(stream), seq_len):
        chunk = stream[i:i + seq_len]
        expect = [chunk[p + 1][0] if p + 1 < len(chunk) and chunk[p + 1][1] and chunk[p + 1][2] == chunk[p][2]
                  else IGNORE for p in range(seq_len)]
        if set(expect) != {IGNORE}:
            rows.append(expect)
    ds = PackedDataset(tmp_path, "train")
    assert [ds[i]["labels"].tolist() for i in range(len(ds))] == rows
    assert meta.get("dropped_rows_without_targets", 0) == -(-len(stream) // seq_len) - len(rows)


def test_a_row_with_no_target_token_is_dropped(tmp_path):
    """A chat prompt longer than a row: the rows holding only prompt teach nothing (and a step made of them
    has no loss), so they are not written; the row with the response is, and the count is in meta.json."""
    packer = Packer(ShardWriter(tmp_path / "train", 16, 500), 0, 1)
    packer.add_document(np.arange(5, 50), np.arange(45) >= 40)  # 40 prompt tokens, then a 5-token response
    packer.add_document(np.arange(5, 25))  # code after it: every row it reaches has targets
    meta = packer.finish()
    assert meta["dropped_rows_without_targets"] == 2 and meta["n_seq"] == 3
    ds = PackedDataset(tmp_path, "train")
    assert ds.tokens[0][:8].tolist() == list(range(37, 45))  # the prompt's last 8 tokens, then the response
    assert all(int((ds[i]["labels"] != IGNORE).sum()) > 0 for i in range(len(ds)))
    # the whole response (its first token is predicted from the prompt's last), then the code's first tokens
    assert ds[0]["labels"].tolist() == [IGNORE] * 7 + [45, 46, 47, 48, 49, IGNORE, 6, 7, IGNORE]


def test_code_only_shards_have_no_mask_file(tmp_path):
    packer = Packer(ShardWriter(tmp_path / "train", 16, 500), 0, 1)
    packer.add_document(np.arange(5, 40))
    assert "loss_mask" not in packer.finish()
    assert not (tmp_path / "train" / "loss_mask.bin").exists()
    assert PackedDataset(tmp_path, "train").target(0) is None
