"""The static-KV-cache decode path (export/static_decode.py) against the eager loop: same ids, greedy and
seeded, for plain and FIM prompts, across buckets and reused caches; a one-token step whose shapes and
host reads make it capturable as a CUDA graph; the graph's exact-or-fall-back rule (with torch.cuda faked,
since this suite has no GPU); the --decode flag."""

import logging

import pytest
import torch
from tiny_adapter import TOKENIZER

from codetune.cli import main
from codetune.export.sampling import SamplingParams, fim_ids, generate_ids, generate_text, prompt_ids
from codetune.export.static_decode import Decoder, bucket_len, resolve_mode

CODE = "import os\nimport sys\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n"



def prompts(tok) -> dict[str, list[int]]:
    return {"short": prompt_ids(tok, "def fibonacci(n):"),
            "fim": fim_ids(tok, "def add(a, b):\n    ", "\n    return c\n"),
            # prompt + max_new past the smallest bucket: a second cache
            "long": prompt_ids(tok, CODE * 12)[:300]}


def ids(model, tok, prompt, params, decoder=None) -> list[int]:
    return list(generate_ids(model, prompt, params, len(tok), {tok.eos_token_id}, decoder))


def test_greedy_and_seeded_ids_equal_the_eager_loop(tuned):
    model, tok = tuned
    decoder = Decoder(model, "static")  # one decoder for all: its caches are reused across calls
    for name, prompt in prompts(tok).items():
        for params in (SamplingParams(max_new_tokens=24),
                       SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=7,
                                      repetition_penalty=1.1)):
            eager = ids(model, tok, prompt, params)
            assert ids(model, tok, prompt, params, decoder) == eager, (name, params)
    assert len(decoder._slots) == 2  # 256 and 512 positions
    assert decoder.stats.eager_steps > 0 and decoder.stats.replays == 0


def test_base_model_alone_and_text_equal(tuned, tmp_path):
    """The random-init tiny-stablelm without an adapter (what `generate --model tiny-stablelm` runs), through
    generate_text: same text, same finish, same counts."""
    from codetune.config import ModelConfig
    from codetune.export.generate import load_for_inference

    model, tok, _ = load_for_inference(ModelConfig(model="tiny-stablelm", random_init=True, precision="fp32",
                                                   tokenizer=str(TOKENIZER)), None, torch.device("cpu"))
    decoder = Decoder(model)
    assert decoder.mode == "static"  # auto on the CPU
    for prompt in prompts(tok).values():
        params = SamplingParams(max_new_tokens=20, stop=["\n\n"])
        a, b = generate_text(model, tok, prompt, params), generate_text(model, tok, prompt, params, decoder=decoder)
        assert (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)
        assert b.prefill_s > 0 and b.decode_s >= 0


def test_a_superseded_generation_refuses_to_step(tuned):
    model, tok = tuned
    decoder = Decoder(model, "static")
    p = prompts(tok)["short"]
    first = generate_ids(model, p, SamplingParams(max_new_tokens=8), len(tok), set(), decoder)
    next(first)
    ids(model, tok, p, SamplingParams(max_new_tokens=4), decoder)  # shares the first one's cache
    with pytest.raises(RuntimeError, match="one generation at a time"):
        next(first)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op a forward pass runs, with its output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


def test_the_one_token_step_is_graph_capturable(tuned):
    """What a CUDA graph needs of the step, checked on the CPU: the same ops on the same shapes at every
    position (so one captured graph replays for all), and no read of a device value on the host (.item(),
    bool(tensor): an error during capture)."""
    model, tok = tuned
    decoder = Decoder(model, "static")
    steps = decoder.steps(10, 50)
    with torch.inference_mode():
        steps.prefill(torch.tensor([prompt_ids(tok, "def f(x):")]))
        traces = []
        for token in (5, 17, 5):
            with _Ops() as rec:
                steps.step(torch.tensor([[token]]))
            traces.append(rec.ops)
            steps.step(torch.tensor([[3]]))  # a step in between: positions differ
    assert len(traces[0]) > 50 and traces[0] == traces[1] == traces[2]
    host_reads = [op for op, _ in traces[0] if "local_scalar_dense" in op or "nonzero" in op or "item" in op]
    assert host_reads == []


def test_bucket_lengths():
    assert bucket_len(1, 4096) == 256 and bucket_len(257, 4096) == 512 and bucket_len(4000, 4096) == 4096
    assert bucket_len(3000, 3000) == 3000  # capped at the context, never below what is needed


def test_modes_resolve_and_refuse(tuned):
    model, _ = tuned
    assert resolve_mode("auto", model) == "static" and resolve_mode("eager", model) == "eager"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_mode("graph", model)

    class NoStatic(torch.nn.Module):  # a model class that does not declare static-cache support
        config = model.config

        def get_input_embeddings(self):
            return model.get_input_embeddings()

    assert resolve_mode("auto", NoStatic()) == "eager"
    with pytest.raises(ValueError, match="use --decode eager"):
        resolve_mode("static", NoStatic())


@pytest.mark.parametrize("mode", ["exact", "differ", "fail"])
def test_graph_exact_or_fall_back(tuned, fake_cuda_graphs, caplog, mode):
    model, tok = tuned
    prompt, params = prompts(tok)["fim"], SamplingParams(max_new_tokens=16)
    eager = ids(model, tok, prompt, params)
    decoder = Decoder(model, "static")
    decoder._graphs = True  # as mode "graph" resolves on a CUDA device
    fake = fake_cuda_graphs(decoder, mode)
    with caplog.at_level(logging.WARNING, logger="codetune.decode"):
        for _ in range(2):  # the second call replays the same graph (or no longer tries one)
            assert ids(model, tok, prompt, params, decoder) == eager
    warnings = [r for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    if mode == "exact":
        assert decoder.stats.captured == 1 and not warnings
        assert decoder.stats.replays == fake.replays - 1 == 2 * 15 - 1  # all steps but the captured one's
        assert decoder.describe() == "static KV cache + CUDA graphs"
    else:
        assert len(warnings) == 1 and decoder.stats.captured == 0 and decoder.stats.replays == 0
        why = "differ from the eager step's" if mode == "differ" else \
            "capture failed (RuntimeError: operation not permitted when stream is capturing)"
        assert why in decoder.stats.fallback and "CUDA graphs off" in decoder.describe()


def test_cli_decode_flag(lora_adapter, capsys):
    common = ["generate", "--adapter", str(lora_adapter), "--prompt", "def f(", "--max-new-tokens", "4",
              "--device", "cpu"]
    assert main([*common, "--decode", "eager"]) == 0
    assert "decode: eager" in capsys.readouterr().err
    assert main(common) == 0
    assert "decode: static KV cache" in capsys.readouterr().err
    assert main([*common, "--decode", "graph"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err


@pytest.mark.slow
def test_compiled_step_gives_the_eager_loops_ids(tuned):
    """--decode compiled (torch.compile'd one-token step; on the CPU without graphs): the same greedy ids as
    the eager loop, the step compiled rather than fallen back (~30 s of CPU: inductor compiles it)."""
    model, tok = tuned
    decoder = Decoder(model, "compiled")
    for name in ("short", "fim"):
        prompt = prompts(tok)[name]
        params = SamplingParams(max_new_tokens=12)
        assert ids(model, tok, prompt, params, decoder) == ids(model, tok, prompt, params), name
    assert decoder.stats.compile_fallback is None, decoder.stats.compile_fallback
    assert decoder.describe() == "static KV cache, torch.compile'd step"


@pytest.mark.parametrize("error,hint", [
    (RuntimeError("inductor: no C++ compiler\nmore"), False),
    # what a truncated cache entry gave on an H200 after a compile was killed midway (session 9)
    (ImportError("/tmp/torchinductor_root/fe/x.main.so: file too short"), True),
])
def test_compiled_step_falls_back_when_the_compiler_fails(tuned, monkeypatch, caplog, error, hint):
    model, tok = tuned
    decoder = Decoder(model, "compiled")

    def broken(fn, **kw):
        def call(*a, **k):
            raise error
        return call
    monkeypatch.setattr(torch, "compile", broken)
    prompt, params = prompts(tok)["short"], SamplingParams(max_new_tokens=6)
    with caplog.at_level(logging.WARNING, logger="codetune.decode"):
        assert ids(model, tok, prompt, params, decoder) == ids(model, tok, prompt, params)
    first = str(error).splitlines()[0]
    assert decoder.stats.compile_fallback == f"{type(error).__name__}: {first}"
    warned = [r.getMessage() for r in caplog.records if "torch.compile of the decode step failed" in r.getMessage()]
    assert len(warned) == 1 and ("TORCHINDUCTOR_CACHE_DIR" in warned[0]) == hint
    assert decoder.describe() == "static KV cache"


def test_reused_prefix_gives_the_eager_loops_ids(tuned):
    """reuse_prefix: requests as an editor sends them while you type (one file, the cursor moving on) read
    only what differs from what the cache holds; each gives the ids of the eager loop run alone."""
    model, tok = tuned
    decoder = Decoder(model, "static", reuse_prefix=True)
    head = CODE * 3
    requests = [fim_ids(tok, head + "def add(a, b):\n    ", "\n    return c\n"),
                fim_ids(tok, head + "def add(a, b):\n    c = ", "\n    return c\n"),  # typed on
                fim_ids(tok, "import re\n" + head, "\n")]  # another file: nothing shared at its start
    params = SamplingParams(max_new_tokens=12)
    reused = []
    for prompt in requests:
        before = decoder.stats.reused_tokens
        assert ids(model, tok, prompt, params, decoder) == ids(model, tok, prompt, params)
        reused.append(decoder.stats.reused_tokens - before)
    assert reused[0] == 0 and reused[1] >= 32 and reused[2] == 0, reused
    # the prompt and its completion stay reusable: the same prompt again reads only its last token
    prompt = requests[2]
    out = ids(model, tok, prompt, params, decoder)
    assert decoder.stats.reused_tokens - sum(reused) == len(prompt) - 1
    assert ids(model, tok, prompt + out[:5], params, decoder) == ids(model, tok, prompt + out[:5], params)


def test_reuse_prefix_needs_the_static_cache(tuned):
    model, _ = tuned
    with pytest.raises(ValueError, match="needs the static KV cache"):
        Decoder(model, "eager", reuse_prefix=True)
