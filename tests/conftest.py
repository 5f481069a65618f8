"""Shared fixtures. Every test gets its own codetune cache (no leaks into ~/.cache), and GPU tests are
skipped unless CUDA is present (they run through the device tool, see docs/testing.md)."""

import os
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The GPT-NeoX-20B tokenizer (Apache-2.0; stable-code-3b's base), shipped with the tests so the suite runs
# from the repository alone.
NEOX_TOKENIZER = REPO / "tests" / "fixtures" / "gpt-neox-20b.json"


def pytest_configure(config):
    os.environ.setdefault("CODETUNE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"codetune-test-{os.getpid()}"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def shared_tokenizer_path() -> Path:
    return NEOX_TOKENIZER


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, stdlib) -> Path:
    """A small prepared dataset (stdlib json/ email/ logging/ packages), seq_len 128, shared by tests."""
    from codetune.config import build
    from codetune.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiny") / "data"
    flags = {"model.model": "tiny-stablelm", "model.random_init": True,
             "data.sources": [str(stdlib / d) for d in ("json", "email", "logging", "http", "xml")],
             "data.data_dir": str(out), "data.seq_len": 128, "data.val_fraction": 0.3, "data.fim_rate": 0.5}
    cfgs = build(["model", "data"], flags=flags)
    prepare(cfgs["data"], cfgs["model"])
    return out


class FakeCudaGraphs:
    """Enough of torch.cuda for a decoder's graph capture (model/static_cache.capture_step) to run on the
    CPU: the capture runs the step (keeping its output as the graph's buffer) and then undoes its effect on
    the cache, as a real capture records kernels without running them; replay runs the step again, on the
    same input buffers, into that buffer. mode: "exact", "differ" (replays are off by a little) or "fail"
    (the capture raises). `decoder._forward(slot, *inputs)` is the step being captured."""

    def __init__(self, decoder, mode, monkeypatch):
        import contextlib

        self.mode, self.replays, self.last = mode, 0, None
        forward, fake = decoder._forward, self

        def recording_forward(slot, *inputs):
            fake.last = (slot, inputs, forward(slot, *inputs))
            return fake.last[2]

        class Graph:
            def replay(self):
                fake.replays += 1
                self.out.copy_(forward(self.slot, *self.inputs) + (1e-3 if fake.mode == "differ" else 0))

        @contextlib.contextmanager
        def graph(g, stream=None, capture_error_mode="global"):
            if fake.mode == "fail":
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
            yield
            g.slot, g.inputs, g.out = fake.last
            from codetune.model.static_cache import rewind

            rewind(g.slot.cache)

        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        monkeypatch.setattr(decoder, "_forward", recording_forward)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """fake_cuda_graphs(decoder, mode) -> FakeCudaGraphs (see there)."""
    return lambda decoder, mode: FakeCudaGraphs(decoder, mode, monkeypatch)


@pytest.fixture
def interrupted_train():
    """interrupted_train(args, out, env, cwd=None) -> (stderr, last step): `codetune train ARGS` started, sent SIGINT once
    its metrics show two steps, checked to stop with 130 and exactly one checkpoint, at its last step."""
    import signal
    import subprocess
    import sys
    import time

    from codetune.metrics import read_metrics

    def run(args, out, env, cwd=None) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "codetune", "train", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 2):
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        done = max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
        assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{done:06d}"]
        return err, done
    return run
