"""End-to-end serve latency (issue 17, target 2): `codetune serve`, the command users run, on the
random-init stable-code-3b shape, asked through the real `openai` client. Two phases:

* one client: fill-in-the-middle requests (a 1,500-token prefix, a 500-token suffix, 32 new tokens,
  greedy) one after another: p50 / p95 latency per request;
* C concurrent clients sending the same requests: aggregate new tokens/s against the one client's, and
  whether every request was answered.

Random weights never stop early unless they happen to pick EOS: tokens/s counts the completion tokens the
server reports (usage). Serve flags after `--` go to `codetune serve` as they are (e.g. `-- --max-batch 16`).

    python3 bench/serve_latency.py --tokenizer tests/fixtures/gpt-neox-20b.json --precision bf16 \\
        --decode graph [--requests 40] [--clients 16] [-- SERVE FLAGS]
CPU self-check: --model tiny-stablelm --device cpu --precision fp32 --decode static --requests 4 --clients 2 \\
    --prefix-tokens 100 --suffix-tokens 30 --new-tokens 8
One JSON line per phase on stdout; the server's log goes to --server-log.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("import json\nfrom pathlib import Path\n\n\ndef read_config(path: Path) -> dict:\n"
        "    \"\"\"Load a JSON config, with defaults.\"\"\"\n    text = path.read_text(encoding='utf-8')\n"
        "    data = json.loads(text)\n    for key, value in DEFAULTS.items():\n"
        "        data.setdefault(key, value)\n    return data\n\n\n")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    p.add_argument("--model", default="stable-code-3b")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--decode", default="auto", help="codetune serve --decode")
    p.add_argument("--prefix-tokens", type=int, default=1500)
    p.add_argument("--suffix-tokens", type=int, default=500)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=40, help="per phase, after the warm-up requests")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests first")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--typing", action="store_true", help="each request's prefix a few characters longer than the "
                   "last one's, as an editor sends them while you type (what serve --reuse-prefix is for); "
                   "default: every request the same")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the server to come up")
    p.add_argument("--server-log", default=None, help="default: a file beside the system temp folder")
    a = p.parse_args(argv)
    a.serve_flags = serve_flags
    return a


def fim_texts(tokenizer_file: str, n_prefix: int, n_suffix: int) -> tuple[str, str]:
    """A prefix and a suffix of about the asked token counts, cut from repeated code at token boundaries."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    ids = tok.encode(CODE).ids
    ids = ids * (1 + (n_prefix + n_suffix) // len(ids))
    return tok.decode(ids[:n_prefix]), tok.decode(ids[n_prefix:n_prefix + n_suffix])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "codetune", "serve", "--model", a.model, "--random-init", "--precision", a.precision,
           "--tokenizer", a.tokenizer, "--port", str(port), "--device", a.device, "--decode", a.decode,
           "--served-model-name", "bench", *a.serve_flags]
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + a.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"codetune serve exited with {proc.returncode} before it served; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"codetune serve did not answer /health within {a.start_timeout:g} s; see {log_path}")


TYPED = "    result = normalise(data)\n    if not result:\n        raise ValueError(path)\n"


def typed(prefix: str, i: int, typing: bool) -> str:
    """The i-th request's prefix: with typing, the text typed so far (3 more characters a request)."""
    return prefix + (TYPED * (1 + 3 * i // len(TYPED)))[:3 * i] if typing else prefix


def server_timing(header: str | None) -> dict[str, float]:
    """`codetune serve`'s Server-Timing header (serve/app.Timing) as {part: ms}; {} where it is absent."""
    out = {}
    for item in (header or "").split(","):
        name, _, dur = item.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


def one_request(client, prefix: str, suffix: str, new: int) -> dict:
    t0 = time.perf_counter()
    raw = client.completions.with_raw_response.create(model="bench", prompt=prefix, suffix=suffix, max_tokens=new,
                                                      temperature=0)
    s = time.perf_counter() - t0
    r = raw.parse()
    return {"s": s, "tokens": r.usage.completion_tokens, "prompt_tokens": r.usage.prompt_tokens,
            "server_ms": server_timing(raw.headers.get("server-timing"))}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summary(phase: str, done: list[dict], failed: list[str], seconds: float, clients: int) -> dict:
    lat = [d["s"] for d in done]
    return {"phase": phase, "clients": clients, "requests": len(done) + len(failed), "answered": len(done),
            "failed": failed[:5], "p50_ms": round(pct(lat, 0.5) * 1e3, 1) if lat else None,
            "p95_ms": round(pct(lat, 0.95) * 1e3, 1) if lat else None,
            "mean_ms": round(statistics.mean(lat) * 1e3, 1) if lat else None,
            "prompt_tokens": done[0]["prompt_tokens"] if done else None,
            "completion_tokens": sum(d["tokens"] for d in done), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(d["tokens"] for d in done) / seconds, 1) if seconds else None,
            **split_latency(done)}


def split_latency(done: list[dict]) -> dict:
    """Where the median request's time went: the server's parts (medians of each) and what the client saw
    beyond the server's total (HTTP, JSON, the openai client), the median of the per-request differences."""
    timed = [d for d in done if "total" in d["server_ms"]]
    if not timed:
        return {}
    parts = {k: round(statistics.median(d["server_ms"][k] for d in timed), 2) for k in timed[0]["server_ms"]}
    outside = statistics.median(d["s"] * 1e3 - d["server_ms"]["total"] for d in timed)
    return {"server_p50_ms": parts, "outside_server_p50_ms": round(outside, 2)}


def run_phase(client, phase: str, clients: int, requests: int, prefix: str, suffix: str, new: int,
              typing: bool = False) -> dict:
    done, failed, lock = [], [], threading.Lock()
    per = [requests // clients + (i < requests % clients) for i in range(clients)]

    def worker(n: int) -> None:
        for i in range(n):
            try:
                d = one_request(client, typed(prefix, i, typing), suffix, new)
                with lock:
                    done.append(d)
            except Exception as e:  # noqa: BLE001 - a failed request is counted and named, not fatal
                with lock:
                    failed.append(f"{type(e).__name__}: {str(e)[:120]}")
    threads = [threading.Thread(target=worker, args=(n,)) for n in per if n]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(phase, done, failed, time.perf_counter() - t0, clients)


def main(argv=None) -> int:
    import openai

    a = parse_args(argv)
    if not Path(a.tokenizer).exists():
        print(f"--tokenizer {a.tokenizer}: no such file", file=sys.stderr)
        return 2
    prefix, suffix = fim_texts(a.tokenizer, a.prefix_tokens, a.suffix_tokens)
    port = free_port()
    log_path = Path(a.server_log or Path(os.environ.get("TMPDIR", "/tmp")) / f"codetune-serve-{port}.log")
    server = start_server(a, port, log_path)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        for _ in range(a.warmup):  # kernels, the static cache, graph capture
            one_request(client, prefix, suffix, a.new_tokens)
        head = {"bench": "serve", "model": a.model, "precision": a.precision, "decode": a.decode,
                "serve_flags": a.serve_flags, "typing": a.typing, "new_tokens": a.new_tokens, "prefix_tokens": a.prefix_tokens,
                "suffix_tokens": a.suffix_tokens, "server_log": str(log_path)}
        single = run_phase(client, "one client", 1, a.requests, prefix, suffix, a.new_tokens, a.typing)
        print(json.dumps({**head, **single}), flush=True)
        many = run_phase(client, f"{a.clients} clients", a.clients, a.requests, prefix, suffix, a.new_tokens, a.typing)
        many["aggregate_vs_one_client"] = (round(many["tokens_per_s"] / single["tokens_per_s"], 2)
                                           if single["tokens_per_s"] and many["tokens_per_s"] else None)
        print(json.dumps({**head, **many}), flush=True)
        decoding = [ln.strip() for ln in log_path.read_text().splitlines() if "decoding:" in ln]
        print(json.dumps({**head, "phase": "server", "decoding": decoding[-1] if decoding else None}), flush=True)
        return 0 if not single["failed"] and not many["failed"] else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    raise SystemExit(main())
