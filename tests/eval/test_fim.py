from pathlib import Path

import pytest

from codetune import registry
from codetune.eval import fim

CODE = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(8))


def test_tasks_reassemble_the_document_and_are_deterministic():
    docs = [("a.py", CODE), ("short.py", "x = 1\n")]
    tasks = fim.make_tasks(docs, per_kind=1, seed=0)
    assert [t.kind for t in tasks] == ["single_line", "multi_line"]
    for t in tasks:
        assert t.source == "a.py" and t.prefix + t.middle + t.suffix == CODE
        assert t.middle.strip()
    single, multi = tasks
    assert "\n" not in single.middle and single.suffix.startswith("\n")
    assert 2 <= multi.middle.count("\n") <= 6
    assert fim.make_tasks(docs, per_kind=1, seed=0) == tasks


def test_context_is_cut_to_the_asked_characters_a_side():
    """--fim-context-chars: a model trained on short rows is asked only what fits them (bench/quality)."""
    doc = ("big.py", "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(400)))
    for chars in (150, 4000):
        tasks = fim.make_tasks([doc], 5, context_chars=chars)
        # (a single-line task's suffix also starts with the hidden line's newline)
        assert len(tasks) == 10 and all(len(t.prefix) <= chars and len(t.suffix) <= chars + 1 for t in tasks)
        assert any(len(t.prefix) == chars for t in tasks)  # cut there, not shorter
    assert max(len(t.prefix) for t in fim.make_tasks([doc], 5)) > 150  # the default keeps more


def test_few_documents_give_several_distinct_tasks():
    tasks = fim.make_tasks([("a.py", CODE)], per_kind=3, seed=1)
    for kind in fim.KINDS:
        k = [t for t in tasks if t.kind == kind]
        assert len(k) == 3 and len({t.prefix for t in k}) == 3


def test_prompt_is_psm():
    t = fim.FimTask("single_line", "a\n", "b", "\nc", "x")
    assert fim.prompt(t) == f"{registry.default_tokens().fim_prefix}a\n{registry.default_tokens().fim_suffix}\nc{registry.default_tokens().fim_middle}"


def test_scoring():
    assert fim.edit_distance("kitten", "sitting") == 3
    assert fim.edit_similarity("", "") == 1.0 and fim.edit_similarity("abc", "") == 0.0
    assert fim.edit_similarity("abcd", "abce") == pytest.approx(0.75)
    single = fim.FimTask("single_line", "", "    return x", "\n", "s")
    assert fim.score_one(single, "    return x  \nmore lines")["exact"]
    multi = fim.FimTask("multi_line", "", "a = 1\nb = 2\n", "", "s")
    s = fim.score_one(multi, "a = 1\nb = 3\n")
    assert not s["exact"] and s["edit_similarity"] == pytest.approx(1 - 1 / 11)


def test_val_split_documents_skip_fim_formatted_ones(data_dir, tokenizer):
    docs = fim.docs_from_val(data_dir, tokenizer)
    texts = [t for _, t in docs]
    assert texts and not any(registry.default_tokens().fim_middle in t or "x = 2" in t for t in texts)
    assert any("def " in t for t in texts)


def test_docs_from_dir(tmp_path):
    (tmp_path / "a.py").write_text(CODE)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00")
    assert [n for n, _ in fim.docs_from_dir(tmp_path)] == ["a.py"]
    from codetune.config import ConfigError

    with pytest.raises(ConfigError, match="not a directory"):
        fim.docs_from_dir(Path(tmp_path) / "missing")


def test_evaluate_on_tiny_model(tiny_model, tokenizer, tmp_path):
    class E:
        max_new_tokens, gen_batch_size, eval_decode = 16, 4, "auto"

    tasks = fim.make_tasks([("a.py", CODE)], per_kind=2)
    out = fim.evaluate(tiny_model, tokenizer, tasks, E, tmp_path, log=lambda m: None)
    assert set(out) == {"single_line", "multi_line"}
    for k in out.values():
        assert 0 <= k["exact_match"] <= 1 and 0 <= k["edit_similarity"] <= 1
    assert len((tmp_path / "fim.jsonl").read_text().splitlines()) == len(tasks)


def test_chat_samples_of_the_val_split_are_not_fim_tasks(tmp_path, stdlib):
    """Prompt/response pairs in the val split are not code to fill in: docs_from_val leaves them out, the
    parts of a sample that packing carried into the next sequence (all answer, so all loss) included."""
    from codetune.cli import main
    from codetune.config import ModelConfig
    from codetune.data.shards import PackedDataset
    from codetune.data.stdlib_pairs import write_pairs
    from codetune.model.tokenizer import load_tokenizer

    pairs = tmp_path / "pairs.jsonl"
    assert write_pairs(pairs, stdlib / "json", 40) > 5
    data = tmp_path / "data"
    assert main(["prepare", str(pairs), "--data-dir", str(data), "--random-init", "--seq-len", "128",
                 "--val-fraction", "0.3", "--workers", "1"]) == 0
    assert len(PackedDataset(data, "val")) > 0
    tok = load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(data / "tokenizer")))
    assert fim.docs_from_val(data, tok) == []
