"""bench/quality/report.py: every metric with its 95% interval, paired changes against the base and the
reference variant, and the issue's expectations judged from them — on eval folders written in the shapes
`codetune eval` and execution.py write."""

import json
import random

import pytest
from quality import pipeline, report
from quality.runner import Runner
from quality.scale import SMOKE

from codetune.eval import stats

N_SEQ, N_TASKS = 30, 40


def _write(folder, results: dict, files: dict[str, list[dict]], wrap: bool):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"models": {"x": results}} if wrap else results))
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_folder(folder, loss: float, exact: float, edit: float, rng):
    nats = [loss * 100 + rng.uniform(-5, 5) for _ in range(N_SEQ)]
    seq = {"nats": nats, "tokens": [100] * N_SEQ}
    rows, fim = [], {}
    for kind in ("single_line", "multi_line"):
        hits = [i < exact * N_TASKS for i in range(N_TASKS)]
        sims = [min(1.0, max(0.0, edit + rng.uniform(-0.05, 0.05))) for _ in range(N_TASKS)]
        rows += [{"kind": kind, "exact": h, "edit_similarity": s} for h, s in zip(hits, sims)]
        fim[kind] = {"tasks": N_TASKS, "exact_match": sum(hits) / N_TASKS, "edit_similarity": sum(sims) / N_TASKS}
    res = {"loss": {"loss": sum(nats) / (100 * N_SEQ), "perplexity": 1.0, "tokens": 100 * N_SEQ,
                    "sequences": N_SEQ, "per_sequence": seq}, "fim": fim}
    _write(folder, res, {"fim.jsonl": rows}, wrap=True)


def _exec_folder(folder, passed: int):
    rows = [{"task_id": f"t{i}", "n": 1, "passed": int(i < passed)} for i in range(N_TASKS)]
    _write(folder, {"humaneval": {"greedy": {"pass@1": passed / N_TASKS, "problems": N_TASKS}}},
           {"humaneval_greedy.jsonl": rows}, wrap=False)


@pytest.fixture
def ctx(tmp_path):
    c = pipeline.Context(tmp_path, SMOKE, 0, False, "NF4 needs a CUDA GPU", tmp_path / "tok.json",
                         Runner(tmp_path, tmp_path / "logs", {}))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({
        "packages": {"dom": {}, "a": {}}, "splits": {}, "dropped_domain_copies": 0,
        "bytes": {"pretrain": 10, "general-test": 2, "domain-train": 5, "domain-test": 1}}))
    for s in ("domain", "general"):
        (tmp_path / "corpus" / f"tasks-{s}.jsonl").write_text("{}\n" * N_TASKS)
    return c


def _fill(ctx, fim0_keeps_fim: bool):
    rng = random.Random(0)
    spec = {  # model -> (domain loss, general loss, FIM exact, FIM edit similarity, exec passes)
        "base": (2.0, 2.0, 0.5, 0.6, 10),
        "lora-bf16": (1.5, 2.05, 0.5, 0.6, 20),
        "lora-last": (1.7, 2.02, 0.5, 0.6, 15),
        "lora-fim0": (1.5, 2.05, 0.5 if fim0_keeps_fim else 0.0, 0.6 if fim0_keeps_fim else 0.1, 20),
    }
    for model, (dom, gen, exact, edit, passed) in spec.items():
        _eval_folder(pipeline.eval_dir(ctx, model, "domain"), dom, exact, edit, rng)
        _eval_folder(pipeline.eval_dir(ctx, model, "general"), gen, exact, edit, rng)
        for s in ("domain", "general"):
            _exec_folder(pipeline.eval_dir(ctx, model, f"exec-{s}"), passed)


def test_every_metric_has_an_interval_and_changes_are_paired(ctx):
    _fill(ctx, fim0_keeps_fim=False)
    result = report.write(ctx)
    metrics = {m["label"]: m for m in result["metrics"]}
    assert len(metrics) == len(report.ROWS) == 12  # 2 losses, 8 FIM, 2 execution
    exec_base = metrics["domain execution pass@1"]["models"]["base"]
    w = stats.wilson(10, N_TASKS)
    assert (exec_base["value"], exec_base["low"], exec_base["high"], exec_base["n"]) == (0.25, w.low, w.high, N_TASKS)
    loss = metrics["domain val loss (nats/token)"]["models"]["lora-bf16"]
    assert loss["low"] < loss["value"] < loss["high"] and loss["n"] == N_SEQ
    chs = {(c["label"], c["model"], c["against"]): c for c in result["changes"]}
    dom = chs[("domain val loss (nats/token)", "lora-bf16", "base")]
    assert dom["verdict"] == "better" and dom["high"] < 0 and -0.6 < dom["estimate"] < -0.4
    assert chs[("general val loss (nats/token)", "lora-bf16", "base")]["verdict"] == "**worse**"
    fim = chs[("domain FIM single-line exact match", "lora-fim0", "lora-bf16")]
    assert fim["verdict"] == "**worse**" and fim["estimate"] == pytest.approx(-0.5)
    assert ("domain val loss (nats/token)", "lora-bf16", "lora-bf16") not in chs
    assert not any(c["model"] == "qlora" for c in result["changes"])
    holds = [e["holds"] for e in result["expectations"]]
    assert holds == [True, True, True, None]
    assert "not run: NF4 needs a CUDA GPU" in result["expectations"][3]["evidence"]
    md = (ctx.path("report", "results.md")).read_text()
    env = result["environment"]
    assert env["date"] and f", date {env['date']}" in md  # what the committed record names
    assert env["commit"] is None or f", commit {env['commit']}" in md
    assert "| domain execution pass@1 | 40 | 25.0% [" in md and "Not run: `qlora` (NF4 needs a CUDA GPU)." in md
    assert "## Change against `lora-bf16`" in md and "**does not hold**" not in md
    assert (ctx.path("report", "metrics.png")).stat().st_size > 0
    assert json.loads(ctx.path("report", "results.json").read_text())["expectations"] == result["expectations"]


def test_an_expectation_that_fails_is_reported_as_failing(ctx):
    _fill(ctx, fim0_keeps_fim=True)
    result = report.write(ctx)
    fim = result["expectations"][2]
    assert fim["holds"] is False and "lora-fim0 vs lora-bf16 +0.0 pp" in fim["evidence"]
    assert "**does not hold**" in ctx.path("report", "results.md").read_text()


def test_the_commit_the_caller_names_is_recorded(ctx, monkeypatch):
    """The GPU machine's copy has no git: gpu.sh's caller exports CODETUNE_COMMIT, and the report names it."""
    monkeypatch.setenv("CODETUNE_COMMIT", "abc1234")
    _fill(ctx, fim0_keeps_fim=False)
    assert report.write(ctx)["environment"]["commit"] == "abc1234"
    assert ", commit abc1234." in ctx.path("report", "results.md").read_text()


def test_fim_retention_is_not_judged_when_the_base_cannot_infill(ctx):
    """Session 9's base filled in 0-1% of lines: every FIM row fails either way, so expectation 3 says it
    cannot be tested instead of failing (or holding) on noise."""
    _fill(ctx, fim0_keeps_fim=True)
    rng = random.Random(2)
    for s in ("domain", "general"):
        folder = pipeline.eval_dir(ctx, "base", s)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        _eval_folder(folder, 2.0, 0.0, 0.1, rng)
    fim = report.write(ctx)["expectations"][2]
    assert fim["holds"] is None and fim["evidence"].startswith("not testable: the base model does not infill")
    assert "domain 0.0%, general 0.0%" in fim["evidence"]
    assert "not measured" in ctx.path("report", "results.md").read_text()


def test_a_model_without_results_is_left_out_not_invented(ctx):
    _fill(ctx, fim0_keeps_fim=False)
    for what in ("domain", "general", "exec-domain", "exec-general"):
        for p in pipeline.eval_dir(ctx, "lora-last", what).iterdir():
            p.unlink()
        pipeline.eval_dir(ctx, "lora-last", what).rmdir()
    result = report.write(ctx)
    assert all("lora-last" not in m["models"] for m in result["metrics"])
    assert not any(c["model"] == "lora-last" for c in result["changes"])


@pytest.mark.parametrize("qlora_loss, holds", [(1.5, True), (1.9, False)])
def test_qlora_present_as_on_a_gpu_is_judged_against_bf16_lora(ctx, qlora_loss, holds):
    """A GPU run has a fifth model: qlora, paired against lora-bf16 by expectation 4 (within noise)."""
    import dataclasses

    gpu = dataclasses.replace(ctx, nf4=None)
    _fill(gpu, fim0_keeps_fim=False)
    rng = random.Random(1)
    _eval_folder(pipeline.eval_dir(gpu, "qlora", "domain"), qlora_loss, 0.5, 0.6, rng)
    _eval_folder(pipeline.eval_dir(gpu, "qlora", "general"), 2.05, 0.5, 0.6, rng)
    for s in ("domain", "general"):
        _exec_folder(pipeline.eval_dir(gpu, "qlora", f"exec-{s}"), 20)
    result = report.write(gpu)
    assert result["skipped"] == [] and all("qlora" in m["models"] for m in result["metrics"])
    assert {c["against"] for c in result["changes"] if c["model"] == "qlora"} == {"base", "lora-bf16"}
    assert result["expectations"][3]["holds"] is holds
    md = gpu.path("report", "results.md").read_text()
    assert "Not run:" not in md and "| metric | n | base | qlora | lora-bf16 | lora-last | lora-fim0 |" in md
