import json

from codetune.eval import report

BASE = {"loss": {"loss": 2.0, "perplexity": 7.39}, "humaneval": {"greedy": {"pass@1": 0.30}},
        "fim": {"single_line": {"exact_match": 0.5, "edit_similarity": 0.8}}}
TUNED = {"loss": {"loss": 1.5, "perplexity": 4.48}, "humaneval": {"greedy": {"pass@1": 0.25}},
         "fim": {"single_line": {"exact_match": 0.5, "edit_similarity": 0.7}}}


def test_table_says_better_and_worse():
    rows = {r.split("|")[1].strip(): r for r in report.table({"base": BASE, "tuned": TUNED}).splitlines()[2:]}
    assert "better" in rows["val loss (nats/token)"]  # lower loss is better
    assert "**worse**" in rows["HumanEval pass@1 (greedy)"]
    assert "same" in rows["FIM single-line exact match"]
    assert "HumanEval pass@10" not in rows  # metrics nobody measured are left out


def test_report_with_charts_and_loss_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 3 - s / 10, **({"val_loss": 3.1 - s / 10}
                                            if s % 5 == 0 else {})}) for s in range(1, 21)) + "\nnot json\n")
    path = report.write_report(tmp_path, {"base": BASE, "tuned": TUNED}, metrics)
    text = path.read_text()
    assert "| metric | base | tuned | change | verdict |" in text and "32.4%" in text
    for png in ("metrics.png", "loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and png in text
