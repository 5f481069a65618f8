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


def _middle_losses(where: str, kind: str, mid: float, gain: float) -> list[dict]:
    """fim.jsonl's teacher-forced fields (eval/fim_loss.py) for every task: the same per-task noise for every
    model (a task is as hard for each), in +/- pairs so that a gain of 0 has its interval around 0."""
    rows = []
    for i in range(N_TASKS):
        u = random.Random(f"{where}:{kind}:{i // 2}").uniform(0.0, 0.2) * (1 if i % 2 else -1)
        rows.append({"middle_tokens": 10, "middle_nats": mid + u, "middle_nats_no_suffix": mid + u + gain + u / 4,
                     "suffix_gain": gain + u / 4})
    return rows


def _eval_folder(folder, loss: float, exact: float, edit: float, rng, mid: float = 1.0, gain: float = 0.3):
    nats = [loss * 100 + rng.uniform(-5, 5) for _ in range(N_SEQ)]
    seq = {"nats": nats, "tokens": [100] * N_SEQ}
    rows, fim = [], {}
    for kind in ("single_line", "multi_line"):
        hits = [i < exact * N_TASKS for i in range(N_TASKS)]
        sims = [min(1.0, max(0.0, edit + rng.uniform(-0.05, 0.05))) for _ in range(N_TASKS)]
        losses = _middle_losses(folder.name, kind, mid, gain)
        rows += [{"kind": kind, "exact": h, "edit_similarity": s, **m} for h, s, m in zip(hits, sims, losses)]
        fim[kind] = {"tasks": N_TASKS, "exact_match": sum(hits) / N_TASKS, "edit_similarity": sum(sims) / N_TASKS,
                     "middle_loss": sum(m["middle_nats"] for m in losses) / N_TASKS,
                     "suffix_gain": sum(m["suffix_gain"] for m in losses) / N_TASKS}
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


def _fill(ctx, fim0_keeps_fim: bool, fim0_keeps_loss: bool | None = None):
    """Synthetic eval folders; lora-fim0 keeps or loses FIM in generation (exact match, edit similarity) and,
    unless told apart, in the teacher-forced rows (middle loss up, suffix gain down)."""
    rng = random.Random(0)
    keeps_loss = fim0_keeps_fim if fim0_keeps_loss is None else fim0_keeps_loss
    spec = {  # model -> (domain loss, general loss, FIM exact, FIM edit similarity, exec passes, middle loss, suffix gain)
        "base": (2.0, 2.0, 0.5, 0.6, 10, 1.0, 0.3),
        "lora-bf16": (1.5, 2.05, 0.5, 0.6, 20, 0.9, 0.3),
        "lora-last": (1.7, 2.02, 0.5, 0.6, 15, 0.95, 0.3),
        "lora-fim0": (1.5, 2.05, 0.5 if fim0_keeps_fim else 0.0, 0.6 if fim0_keeps_fim else 0.1, 20,
                      0.9 if keeps_loss else 1.2, 0.3 if keeps_loss else 0.05),
    }
    for model, (dom, gen, exact, edit, passed, mid, gain) in spec.items():
        _eval_folder(pipeline.eval_dir(ctx, model, "domain"), dom, exact, edit, rng, mid, gain)
        _eval_folder(pipeline.eval_dir(ctx, model, "general"), gen, exact, edit, rng, mid, gain)
        for s in ("domain", "general"):
            _exec_folder(pipeline.eval_dir(ctx, model, f"exec-{s}"), passed)


def test_every_metric_has_an_interval_and_changes_are_paired(ctx):
    _fill(ctx, fim0_keeps_fim=False)
    result = report.write(ctx)
    metrics = {m["label"]: m for m in result["metrics"]}
    assert len(metrics) == len(report.ROWS) == 20  # 2 val losses, 16 FIM (8 of them teacher-forced), 2 execution
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
    mid = chs[("general FIM multi-line middle loss (nats/token)", "lora-fim0", "lora-bf16")]
    assert mid["verdict"] == "**worse**" and mid["estimate"] == pytest.approx(0.3) and mid["high"] - mid["low"] < 1e-9
    gain = chs[("domain FIM single-line suffix gain (nats/token)", "lora-fim0", "lora-bf16")]
    assert gain["verdict"] == "**worse**" and gain["estimate"] == pytest.approx(-0.25)  # a gain: higher is better
    assert chs[("domain FIM single-line middle loss (nats/token)", "lora-bf16", "base")]["verdict"] == "better"
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
    assert fim["holds"] is False and "lora-fim0 vs lora-bf16 +0.000 [+0.000, +0.000]" in fim["evidence"]
    assert "**does not hold**" in ctx.path("report", "results.md").read_text()


def test_the_commit_the_caller_names_is_recorded(ctx, monkeypatch):
    """The GPU machine's copy has no git: gpu.sh's caller exports CODETUNE_COMMIT, and the report names it."""
    monkeypatch.setenv("CODETUNE_COMMIT", "abc1234")
    _fill(ctx, fim0_keeps_fim=False)
    assert report.write(ctx)["environment"]["commit"] == "abc1234"
    assert ", commit abc1234." in ctx.path("report", "results.md").read_text()


def _replace_base(ctx, exact: float, gain: float):
    rng = random.Random(2)
    for s in ("domain", "general"):
        folder = pipeline.eval_dir(ctx, "base", s)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        _eval_folder(folder, 2.0, exact, 0.1, rng, 1.0, gain)


def test_fim_retention_is_not_judged_when_the_base_ignores_the_suffix(ctx):
    """A base whose middle loss is no lower with the suffix than without it does not infill: every FIM row of
    its fine-tunes fails or holds on noise, so expectation 3 says it cannot be tested, and shows the gains."""
    _fill(ctx, fim0_keeps_fim=True)
    _replace_base(ctx, exact=0.5, gain=0.0)  # exact match alone would have let it through
    result = report.write(ctx)
    fim = result["expectations"][2]
    assert fim["holds"] is None and fim["evidence"].startswith("not testable: the base model does not use the suffix")
    assert "(its suffix gain, nats/token: domain single-line 0.000 [-0." in fim["evidence"]
    assert "general multi-line 0.000 [" in fim["evidence"]
    assert "not measured" in ctx.path("report", "results.md").read_text()


def test_fim_retention_is_judged_on_the_loss_rows_when_exact_match_is_at_the_floor(ctx):
    """Session 9's case: the base fills in no line exactly, but its suffix gain is above 0 on a held-out set, so
    it infills and expectation 3 is judged, on the suffix-gain rows (lora-fim0's generation rows equal
    lora-bf16's here: they do not decide it)."""
    _fill(ctx, fim0_keeps_fim=True, fim0_keeps_loss=False)
    _replace_base(ctx, exact=0.0, gain=0.3)
    fim = report.write(ctx)["expectations"][2]
    assert fim["holds"] is True, fim["evidence"]
    assert "domain FIM single-line suffix gain (nats/token): lora-bf16 vs base +0.000" in fim["evidence"]
    assert "lora-fim0 vs lora-bf16 -0.250" in fim["evidence"]
    assert "middle loss" not in fim["evidence"] and "exact match" not in fim["evidence"]


def test_a_worse_teacher_forced_row_of_the_reference_fails_fim_retention(ctx):
    """lora-bf16 significantly worse than the base on the suffix gain rows alone (its generation rows and middle
    loss are better) fails the claim."""
    _fill(ctx, fim0_keeps_fim=True, fim0_keeps_loss=False)
    _replace_base(ctx, exact=0.5, gain=0.35)  # lora-bf16's suffix gain (0.3) is now below the base's
    fim = report.write(ctx)["expectations"][2]
    assert fim["holds"] is False and "suffix gain (nats/token): lora-bf16 vs base -0.050" in fim["evidence"]


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
    _eval_folder(pipeline.eval_dir(gpu, "qlora", "domain"), qlora_loss, 0.5, 0.6, rng, mid=0.9)  # FIM as lora-bf16's
    _eval_folder(pipeline.eval_dir(gpu, "qlora", "general"), 2.05, 0.5, 0.6, rng, mid=0.9)
    for s in ("domain", "general"):
        _exec_folder(pipeline.eval_dir(gpu, "qlora", f"exec-{s}"), 20)
    result = report.write(gpu)
    assert result["skipped"] == [] and all("qlora" in m["models"] for m in result["metrics"])
    assert {c["against"] for c in result["changes"] if c["model"] == "qlora"} == {"base", "lora-bf16"}
    assert result["expectations"][3]["holds"] is holds
    md = gpu.path("report", "results.md").read_text()
    assert "Not run:" not in md and "| metric | n | base | qlora | lora-bf16 | lora-last | lora-fim0 |" in md
