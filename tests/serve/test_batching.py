"""Continuous batching (serve/batching.py through serve/engine.py, max_batch > 1) on the tiny model: every
request's completion equals the same request run alone (greedy and seeded), whether rows join while others
run, wait for a free row, need the running rows moved right (a longer prompt) or left (the shared position
at the cache's end), or leave early (cancelled); CUDA graph capture's exact / differ / fail cases with
torch.cuda faked; the --max-batch and --batch-context flags."""

import threading

import pytest

from codetune.export.sampling import SamplingParams, generate_text, prompt_ids
from codetune.serve.batching import BatchScheduler
from codetune.serve.engine import Engine

PROMPTS = ["def add(a, b):", "import os\n" * 20, "class Foo:\n    def __init__(self):", "x = 1\n" * 5,
           "print(", "for i in range(10):\n" * 6]


def alone(tiny_model, ids, params):
    model, tok = tiny_model
    return generate_text(model, tok, ids, params)


def same(a, b) -> bool:
    return (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)


@pytest.fixture
def engine(tiny_model):
    made = []

    def make(**kw):
        made.append(Engine(*tiny_model, **kw))
        return made[-1]
    yield make
    for e in made:
        e.close()


def _after_text(pieces: int):
    """(on_text for a job, an event set once that many pieces have streamed)."""
    seen, event = [], threading.Event()

    def on_text(_i, piece):
        seen.append(piece)
        if len(seen) >= pieces:
            event.set()
    return on_text, event


def test_requests_join_leave_and_queue_each_as_if_alone(tiny_model, engine):
    tok = tiny_model[1]
    ids = [prompt_ids(tok, t) for t in PROMPTS]
    params = [SamplingParams(max_new_tokens=m) for m in (20, 35, 12, 40, 25, 30)]
    want = [alone(tiny_model, i, p) for i, p in zip(ids, params)]
    eng = engine(max_batch=4, batch_context=256)
    on_text, started = _after_text(3)
    first = eng.submit([ids[0]], [params[0]], on_text)
    assert started.wait(30)  # the rest join a batch that is already decoding
    jobs = [first] + [eng.submit([i], [p]) for i, p in zip(ids[1:], params[1:])]  # 6 requests, 4 rows
    got = [j.future.result(timeout=60)[0] for j in jobs]
    assert all(same(g, w) for g, w in zip(got, want)), [(g.text, w.text) for g, w in zip(got, want)]
    stats = eng.batch.stats
    assert stats.joins == 6 and stats.row_steps / stats.steps > 1  # they did decode together
    assert eng.pending == 0 and eng.tokens_generated == sum(w.completion_tokens for w in want)


def test_moving_rows_right_and_left_keeps_every_row_exact(tiny_model, engine):
    """A (3-token prompt) runs; B's 40-token prompt moves A right; B leaves early, so A's span ends short of
    the shared position; C joins and decodes past the cache's 64 positions, moving A and C left."""
    tok = tiny_model[1]
    a, b, c = prompt_ids(tok, "def f("), prompt_ids(tok, "import os\n" * 20)[:40], prompt_ids(tok, "x = 1\n" * 3)
    assert (len(a), len(b), len(c)) == (3, 40, 12)
    pa, pb, pc = SamplingParams(max_new_tokens=58), SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=40)
    want = [alone(tiny_model, *x) for x in ((a, pa), (b, pb), (c, pc))]
    eng = engine(max_batch=2, batch_context=64)
    on_text, started = _after_text(1)
    ja = eng.submit([a], [pa], on_text)
    assert started.wait(30)
    jb = eng.submit([b], [pb])
    got_b = jb.future.result(timeout=60)[0]
    jc = eng.submit([c], [pc])
    got = [ja.future.result(timeout=60)[0], got_b, jc.future.result(timeout=60)[0]]
    assert all(same(g, w) for g, w in zip(got, want))
    assert eng.batch.stats.shifted >= 1 and eng.batch.stats.compacted >= 1


def test_a_cancelled_row_frees_its_place_and_the_others_run_on(tiny_model, engine):
    tok = tiny_model[1]
    ids = [prompt_ids(tok, t) for t in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=40)
    want = [alone(tiny_model, i, params) for i in ids]
    eng = engine(max_batch=2, batch_context=256)
    started, proceed = threading.Event(), threading.Event()

    def on_text(_i, _piece):  # holds the request (and so the batch) after its first piece until it is abandoned
        started.set()
        assert proceed.wait(30)
    gone = eng.submit([ids[0]], [params], on_text)
    keep = eng.submit([ids[1]], [params])
    assert started.wait(30)
    eng.abandon(gone)  # the client left mid-batch
    proceed.set()
    late = eng.submit([ids[2]], [params])  # needs the row the cancelled request held
    cancelled = gone.future.result(timeout=60)[0]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 40
    assert same(keep.future.result(timeout=60)[0], want[1])
    assert same(late.future.result(timeout=60)[0], want[2])


def test_seeded_sampling_and_several_choices_equal_alone(tiny_model, engine):
    tok = tiny_model[1]
    ids = prompt_ids(tok, "def fibonacci(n):")
    params = [SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1,
                             seed=s, stop=["\n\n"]) for s in (1, 2, 3)]
    want = [alone(tiny_model, ids, p) for p in params]
    eng = engine(max_batch=2, batch_context=128)  # three choices, two rows: the third waits for one
    got = eng.submit([ids] * 3, params).future.result(timeout=60)
    assert all(same(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("mode", ["exact", "differ", "fail"])
def test_graph_capture_exact_or_fallback(tiny_model, fake_cuda_graphs, caplog, mode):
    """With torch.cuda faked, the batched step is captured once; an exact graph then runs every step, a
    differing or failing one turns graphs off with one warning; the output is the same either way."""
    import logging

    from codetune.export.sampling import generate_text as run

    model, tok = tiny_model
    sched = BatchScheduler(model, rows=2, length=128, graphs=True)
    fake = fake_cuda_graphs(sched, mode)
    ids = [prompt_ids(tok, t) for t in PROMPTS[:2]]
    params = SamplingParams(max_new_tokens=16)
    want = [alone(tiny_model, i, params) for i in ids]
    got = [None, None]

    def go(k):
        decoder = sched.decoder()
        try:
            got[k] = run(model, tok, ids[k], params, decoder=decoder)
        finally:
            decoder.release()
    with caplog.at_level(logging.WARNING, logger="codetune.serve"):
        threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    sched.close()
    assert all(same(g, w) for g, w in zip(got, want))
    warnings = [r for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    if mode == "exact":
        assert sched.stats.captured == 1 and sched.stats.replays == sched.stats.steps - 1 > 0 and not warnings
    else:
        assert sched.stats.replays == 0 and not sched.graphs and len(warnings) == 1
        assert ("differ" if mode == "differ" else "capture failed") in sched.stats.fallback
    assert fake.replays >= 1 or mode == "fail"


def test_a_prompt_past_the_batch_context_is_refused(tiny_model, engine):
    tok = tiny_model[1]
    eng = engine(max_batch=2, batch_context=32)
    assert eng.context == 32
    job = eng.submit([prompt_ids(tok, "import os\n" * 10)], [SamplingParams(max_new_tokens=8)])
    with pytest.raises(ValueError, match="--batch-context"):
        job.future.result(timeout=30)
    ok = eng.submit([prompt_ids(tok, "def f(")], [SamplingParams(max_new_tokens=8)])  # the row came back
    assert ok.future.result(timeout=30)[0].completion_tokens == 8


@pytest.mark.parametrize("argv, match", [
    (["--max-batch", "0"], "--max-batch=0"),
    (["--batch-context", "64"], "use it with --max-batch above 1"),
    (["--max-batch", "2", "--batch-context", "0"], "--batch-context=0"),
    (["--max-batch", "2", "--decode", "eager"], "not --decode eager"),
    (["--max-batch", "2", "--reuse-prefix"], "--reuse-prefix keeps one request's cache"),
    (["--reuse-prefix", "--decode", "eager"], "needs the static KV cache"),
])
def test_flags_refuse_what_cannot_run(tiny_model, argv, match):
    from codetune.cli import build_parser
    from codetune.config import ConfigError
    from codetune.serve.app import engine_decoding

    ns = build_parser().parse_args(["serve", *argv])
    with pytest.raises(ConfigError, match=match):
        engine_decoding(tiny_model[0], ns)


def test_flags_choose_the_running_batch(tiny_model, capsys):
    from codetune.cli import build_parser
    from codetune.serve.app import engine_decoding

    parse = build_parser().parse_args
    assert set(engine_decoding(tiny_model[0], parse(["serve"]))) == {"decoder"}
    assert engine_decoding(tiny_model[0], parse(["serve", "--reuse-prefix"]))["decoder"].reuse_prefix
    kw = engine_decoding(tiny_model[0], parse(["serve", "--max-batch", "8", "--batch-context", "512"]))
    assert kw == dict(max_batch=8, batch_context=512, batch_graphs=False)  # on the CPU: no graphs
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-batch" in shown and "x layers x 2 x kv_heads x head_dim x 2 bytes" in shown


def test_concurrent_http_clients_each_get_their_own_completion(tiny_model):
    """Eight `openai` clients at once against the real app with --max-batch 4, half of them streaming: every
    request answered with what it would get alone."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from serve_support import API_KEY, MODEL, running_server

    from codetune.serve.limits import Limits

    tok = tiny_model[1]
    asks = [(PROMPTS[k % len(PROMPTS)], 8 + 3 * k, k % 2 == 1) for k in range(8)]
    want = [alone(tiny_model, prompt_ids(tok, p), SamplingParams(max_new_tokens=m)).text for p, m, _ in asks]
    with running_server(*tiny_model, Limits(max_tokens=100), max_batch=4, batch_context=256) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

        def ask(a):
            prompt, max_tokens, stream = a
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          stream=stream)
            return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, asks))
        assert got == want
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):  # --batch-context
            client.completions.create(model=MODEL, prompt="x " * 200, max_tokens=100)
        assert srv.engine.batch.stats.row_steps / srv.engine.batch.stats.steps > 1
        assert srv.engine.pending == 0


def test_a_failed_step_fails_its_rows_and_the_batch_serves_on(tiny_model, engine, monkeypatch):
    tok = tiny_model[1]
    ids, params = prompt_ids(tok, "def f("), SamplingParams(max_new_tokens=10)
    eng = engine(max_batch=2, batch_context=128)
    forward, calls = eng.batch._forward, []

    def once_broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return forward(*args)
    monkeypatch.setattr(eng.batch, "_forward", once_broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        eng.submit([ids], [params]).future.result(timeout=30)
    assert same(eng.submit([ids], [params]).future.result(timeout=30)[0], alone(tiny_model, ids, params))
    assert eng.pending == 0


def test_the_cache_is_allocated_at_start_and_one_that_does_not_fit_is_one_line(tiny_model, monkeypatch):
    """The running batch's KV cache takes its memory when the server starts, so a --max-batch x
    --batch-context too big for the GPU stops `codetune serve` with the fix instead of failing requests."""
    import torch
    from transformers.cache_utils import StaticLayer

    from codetune.config import ConfigError

    s = BatchScheduler(tiny_model[0], 3, 128)
    try:
        assert all(layer.is_initialized for layer in s._slot.cache.layers)
        assert tuple(s._slot.cache.layers[0].keys.shape[:1]) == (3,) and s._slot.cache.layers[0].keys.shape[2] == 128
    finally:
        s.close()

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")
    monkeypatch.setattr(StaticLayer, "lazy_initialization", oom)
    with pytest.raises(ConfigError, match=r"--max-batch 4 x --batch-context 256: the running batch's KV cache .* "
                                          r"does not fit in GPU memory beside the model; lower --max-batch"):
        Engine(*tiny_model, max_batch=4, batch_context=256)


def test_free_rows_attend_to_one_key_and_split_attention_serves_the_same(tiny_model):
    """A running batch with free rows, its steps on the split-KV path (the kernel's PyTorch form, as on the
    CPU no Triton runs): the completion equals the request alone, and each free row's mask keeps one key
    (the one it writes), so split attention reads nothing else of that row."""
    from codetune.model.step_attention import REFERENCE_NAME, StepAttention

    model, tok = tiny_model
    sched = BatchScheduler(model, rows=3, length=128, graphs=False)
    sched.attention = StepAttention(model, reference=True)
    assert sched.attention.name == REFERENCE_NAME
    ids = prompt_ids(tok, PROMPTS[1])
    params = SamplingParams(max_new_tokens=12)
    decoder = sched.decoder()
    try:
        got = generate_text(model, tok, ids, params, decoder=decoder)
    finally:
        decoder.release()
    mask = sched._slot.mask.clone()
    sched.close()
    assert same(got, alone(tiny_model, ids, params))
    assert sched.stats.steps > 0 and mask[1:].sum(dim=1).tolist() == [1, 1]
