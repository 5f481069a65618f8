"""`codetune serve` end to end (issue 17, item 2): fill-in-the-middle requests (decode_bench's case c: a
1,500-token prefix, a 500-token suffix, 32 new tokens) sent with the real `openai` client to the real app on
a loopback port, by 1 and by 16 concurrent clients, one-at-a-time (--max-batch 1) against continuous
batching (--max-batch N), on the random-init stable-code-3b shape.

    python3 bench/serve_bench.py --tokenizer tests/fixtures/gpt-neox-20b.json --max-vram 10GiB \\
        [--precision bf16] [--max-batch 1 16] [--clients 1 16] [--requests 4] [--batch-context 4096]

One JSON line per (max_batch, clients) on stdout (and appended to --out): every request's latency (p50,
p95), aggregate completion tokens/s over the wall time of all requests, that against one client at the
same --max-batch (the issue asks for >= 6x at 16 clients), whether every request was answered, and
whether each request's text equals what --max-batch 1 answered it (greedy: it must). Each client sends a
different slice of the code, so rows differ. One untimed request warms each server up (a CUDA graph's
capture). The first line names the GPU, versions and date. CPU self-check: --model tiny-stablelm --device
cpu --precision fp32 --clients 1 4 --max-batch 1 4. Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_bench import CODE, emit, environment  # noqa: E402

PREFIX, SUFFIX, NEW = 1500, 500, 32  # decode_bench's case c


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    p.add_argument("--model", default="stable-code-3b", help="registry name (tiny-stablelm for the CPU self-check)")
    p.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--max-batch", nargs="+", type=int, default=[1, 16], help="--max-batch values; 1 first")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 16], help="concurrent clients; 1 first")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--batch-context", type=int, default=4096)
    p.add_argument("--max-vram", default=None, help="cap this process's GPU memory, e.g. 10GiB")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    return p.parse_args(argv)


def fim_texts(tok, k: int) -> tuple[str, str]:
    """Client k's prefix and suffix: PREFIX and SUFFIX tokens of the code, starting k tokens in."""
    from codetune.export.sampling import prompt_ids

    ids = prompt_ids(tok, CODE * (1 + 3 * (PREFIX + SUFFIX + 64) // len(prompt_ids(tok, CODE))))[k:]
    return tok.decode(ids[:PREFIX]), tok.decode(ids[PREFIX:PREFIX + SUFFIX])


@contextmanager
def serving(engine):
    """The real app on a loopback port, as `codetune serve` runs it; yields its base URL."""
    import uvicorn

    from codetune.serve.app import create_app
    from codetune.serve.guard import uvicorn_config
    from codetune.serve.limits import Limits

    limits = Limits(max_tokens=NEW, max_pending=4096)
    app = create_app(engine, "bench", limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", backlog=1024))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def run_clients(url: str, texts: list[tuple[str, str]], requests: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def one(prefix_suffix):
        t = time.perf_counter()
        r = client.completions.create(model="bench", prompt=prefix_suffix[0], suffix=prefix_suffix[1],
                                      max_tokens=NEW, temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens, r.choices[0].text

    def client_loop(k):
        return [one(texts[k]) for _ in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        per_client = list(pool.map(client_loop, range(len(texts))))
    wall = time.perf_counter() - t0
    latencies = sorted(lat for c in per_client for lat, _, _ in c)
    tokens = sum(n for c in per_client for _, n, _ in c)
    return {"requests": len(latencies), "wall_s": round(wall, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
            "texts": [[text for _, _, text in c] for c in per_client]}


def main(argv=None) -> int:
    from codetune.config import ModelConfig
    from codetune.export.generate import load_for_inference
    from codetune.export.static_decode import Decoder
    from codetune.model.load import pick_device
    from codetune.serve.engine import Engine
    from codetune.train.memory import cap_vram

    a = parse_args(argv)
    device = pick_device(a.device)
    cap_vram(a.max_vram, device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    env = environment(device, argparse.Namespace(model=a.model, max_vram=a.max_vram, repeats=None))
    emit({**env, "bench": "serve", "requests_per_client": a.requests, "precision": precision, "case": "fim 1500+500, 32 new"}, a.out)
    model, tok, _ = load_for_inference(ModelConfig(model=a.model, random_init=True, precision=precision,
                                                   tokenizer=a.tokenizer), None, device)
    texts = [fim_texts(tok, k) for k in range(max(a.clients))]
    one_at_a_time: dict[int, list[list[str]]] = {}  # clients -> texts at --max-batch 1
    for max_batch in a.max_batch:
        # one at a time decodes as --decode auto; the running batch graphs its step on CUDA (exact or fall back)
        kw = (dict(decoder=Decoder(model, "auto")) if max_batch == 1 else
              dict(max_batch=max_batch, batch_context=a.batch_context, batch_graphs=device.type == "cuda"))
        engine = Engine(model, tok, max_pending=4096, **kw)
        try:
            with serving(engine) as url:
                run_clients(url, texts[:1], 1)  # warm-up, untimed
                single = None
                for clients in a.clients:
                    r = run_clients(url, texts[:clients], a.requests)
                    got = r.pop("texts")
                    if max_batch == 1:
                        one_at_a_time[clients] = got
                    single = single or r["tokens_per_s"]
                    same = got == one_at_a_time[clients] if clients in one_at_a_time else None
                    emit({"max_batch": max_batch, "clients": clients, **r, "answered": r["requests"] == clients * a.requests,
                          "vs_one_client": round(r["tokens_per_s"] / single, 2), "same_text_as_max_batch_1": same,
                          "decoding": engine.describe(),
                          **({"batch_stats": vars(engine.batch.stats)} if engine.batch else {})}, a.out)
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
