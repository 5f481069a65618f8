import json

import numpy as np

from codetune.eval import report


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def _eval_dir(tmp_path, base_passes, tuned_passes, base_nats, tuned_nats, fim_base, fim_tuned):
    """An eval folder as `codetune eval --compare` writes it: results plus per-item files per model."""
    by_model = {}
    for name, passes, nats, fim in (("base", base_passes, base_nats, fim_base), ("tuned", tuned_passes, tuned_nats, fim_tuned)):
        d = tmp_path / name
        d.mkdir()
        (d / "humaneval_greedy.jsonl").write_text("".join(
            json.dumps({"task_id": f"HumanEval/{i}", "n": 1, "passed": int(p), "samples": []}) + "\n"
            for i, p in enumerate(passes)))
        (d / "fim.jsonl").write_text("".join(
            json.dumps({"kind": "single_line", "name": f"f{i}.py", "exact": e, "edit_similarity": s}) + "\n"
            for i, (e, s) in enumerate(fim)))
        tokens = [100] * len(nats)
        loss = sum(n * t for n, t in zip(nats, tokens)) / sum(tokens)
        by_model[name] = {
            "loss": {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": sum(tokens), "sequences": len(nats),
                     "per_sequence": {"nats": [n * t for n, t in zip(nats, tokens)], "tokens": tokens}},
            "humaneval": {"greedy": {"pass@1": sum(passes) / len(passes), "problems": len(passes)}},
            "fim": {"single_line": {"tasks": len(fim), "exact_match": sum(e for e, _ in fim) / len(fim),
                                    "edit_similarity": sum(s for _, s in fim) / len(fim)}}}
    return by_model


def test_five_problems_three_versus_four_passes_is_no_significant_change(tmp_path):
    rng = np.random.default_rng(0)
    base_nats = list(2.0 + rng.normal(0, 0.05, 40))
    fim = [(True, 1.0)] * 3 + [(False, 0.5)] * 2
    by_model = _eval_dir(tmp_path, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], base_nats, [x - 0.3 for x in base_nats], fim, fim)
    t = report.table(by_model, report.default_item_dirs(tmp_path, by_model))
    assert "| metric | n | base [95% CI] | tuned [95% CI] | change [95% CI] | verdict |" in t
    he = _row(t, "HumanEval pass@1 (greedy)")
    assert he[1] == "5 problems"
    assert he[2] == "60.0% [23.1%, 88.2%]" and he[3] == "80.0% [37.6%, 96.4%]"  # Wilson
    assert he[4].startswith("+20.0 pp [-13.6, +49.9]") and he[5] == "no significant change"
    loss = _row(t, "val loss (nats/token)")
    assert loss[1] == "40 sequences" and loss[5] == "better"  # every sequence 0.3 nats lower: paired, clear
    assert loss[4].startswith("-0.300 [") and len(loss[2].split(" ")[0].split(".")[1]) == 3
    assert _row(t, "val perplexity")[5] == "better"
    assert _row(t, "FIM single-line exact match")[5] == "no significant change"  # identical
    assert "HumanEval pass@10" not in t and "multi-line" not in t  # nobody measured them: no row


def test_a_clear_drop_is_worse(tmp_path):
    passes = [1] * 30 + [0] * 10
    by_model = _eval_dir(tmp_path, passes, [0] * 40, [2.0] * 10, [2.0] * 10, [(True, 1.0)] * 4, [(False, 0.2)] * 4)
    t = report.table(by_model, report.default_item_dirs(tmp_path, by_model))
    assert _row(t, "HumanEval pass@1 (greedy)")[5] == "**worse**"
    assert _row(t, "val loss (nats/token)")[5] == "no significant change"
    assert _row(t, "FIM single-line edit similarity")[5] == "**worse**"


def test_stale_per_item_files_are_not_paired(tmp_path):
    by_model = _eval_dir(tmp_path, [1, 0], [1, 1], [2.0], [1.0], [(True, 1.0)], [(True, 1.0)])
    by_model["tuned"]["humaneval"]["greedy"]["pass@1"] = 0.0  # the files belong to another run
    row = _row(report.table(by_model, report.default_item_dirs(tmp_path, by_model)), "HumanEval pass@1 (greedy)")
    assert row[3].startswith("0.0%") and row[5] == "not tested (no paired per-item results)"


def test_aggregates_alone_still_get_n_and_wilson():
    base = {"humaneval": {"greedy": {"pass@1": 0.3, "problems": 10}}, "loss": {"loss": 2.0, "perplexity": 7.39}}
    t = report.table({"base": base})
    assert "| metric | n | base [95% CI] |" in t
    assert _row(t, "HumanEval pass@1 (greedy)")[1:] == ["10 problems", "30.0% [10.8%, 60.3%]"]
    assert _row(t, "val loss (nats/token)")[1:] == ["—", "2.000"]


def test_report_drops_empty_panels(tmp_path):
    loss_only = {"base": {"loss": {"loss": 2.0, "perplexity": 7.39}}, "tuned": {"loss": {"loss": 1.5, "perplexity": 4.48}}}
    text = report.write_report(tmp_path, loss_only).read_text()
    assert "HumanEval" not in text and "FIM" not in text and "sandbox" not in text  # suites that did not run
    assert (tmp_path / "metrics.png").exists()
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    text = report.write_report(nothing, {"base": {}}).read_text()
    assert "No suite produced a metric." in text and "metrics.png" not in text
    assert not (nothing / "metrics.png").exists()


def test_report_with_charts_and_loss_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 3 - s / 10, **({"val_loss": 3.1 - s / 10}
                                            if s % 5 == 0 else {})}) for s in range(1, 21)) + "\nnot json\n")
    by_model = _eval_dir(tmp_path, [1, 0, 1], [1, 1, 1], [2.0, 2.1], [1.5, 1.6], [(True, 1.0)], [(True, 0.9)])
    path = report.write_report(tmp_path, by_model, metrics)
    text = path.read_text()
    assert "| change [95% CI] | verdict |" in text and "32.4%" in text and "Wilson" in text
    for png in ("metrics.png", "loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and png in text
