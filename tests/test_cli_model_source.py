"""Where a model comes from: a mistyped path or a hub id that cannot be had answers in one line at once
(it used to wait ~48 s on the Hub's retries, then print an 85-line traceback)."""

import socket
import time

import pytest

from codetune import registry
from codetune.cli import build_parser, main
from codetune.config import ConfigError


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def timed_main(argv):
    import transformers

    # first use imports every stage module and transformers' auto classes: not the wait being tested
    build_parser(), transformers.AutoTokenizer, transformers.AutoModelForCausalLM
    t = time.perf_counter()
    rc = main(argv)
    return rc, time.perf_counter() - t


def test_mistyped_local_path_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    rc, seconds = timed_main(["generate", "--model", "runs/mergd", "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and seconds < 1.0 and len(err.splitlines()) == 1
    assert "model='runs/mergd': no such directory; did you mean 'runs/merged'?" in err


def test_hub_id_offline_and_not_cached_is_one_line_at_once(empty_hub_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("stable-code-3b", "stabilityai/stable-code-3b"):
        rc, seconds = timed_main(["generate", "--model", model, "--prompt", "x", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and seconds < 1.0 and len(err.splitlines()) == 1, err
        assert ("stabilityai/stable-code-3b is not in the local Hugging Face cache and offline mode is set" in err
                and "hf download stabilityai/stable-code-3b" in err and "--model /path/to/local/copy" in err)


def test_prepare_offline_fails_on_the_tokenizer_at_once(empty_hub_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("print(1)\n")
    rc, seconds = timed_main(["prepare", str(tmp_path / "src"), "--model", "stable-code-3b",
                              "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and seconds < 1.0 and "not in the local Hugging Face cache" in err[-1]


def test_hub_unreachable_without_offline_mode(empty_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "hub_reachable", lambda timeout=registry.HUB_CHECK_SECONDS: False)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache and the hub is unreachable"):
        registry.resolve("someone/some-model")


def test_a_cached_hub_id_loads_from_the_cache_when_offline(empty_hub_cache, monkeypatch):
    repo = empty_hub_cache / "models--someone--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.resolve("someone/some-model") == registry.Source("someone/some-model", local=False,
                                                                     cache_only=True)


def test_local_directory_and_path_shapes(tmp_path, monkeypatch):
    assert registry.resolve(str(tmp_path)) == registry.Source(str(tmp_path), local=True, cache_only=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert registry.looks_like_path("runs/x") and registry.looks_like_path("./x") and registry.looks_like_path("a/b/c")
    assert not registry.looks_like_path("stabilityai/stable-code-3b")  # no ./stabilityai here: a hub id


def test_hub_reachable_is_a_short_bounded_check(monkeypatch):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        monkeypatch.delenv("HTTPS_PROXY", raising=False)
        monkeypatch.delenv("https_proxy", raising=False)
        assert registry.hub_reachable(timeout=0.5)
        port = listening.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: refused
    t = time.perf_counter()
    assert not registry.hub_reachable(timeout=0.5)
    assert time.perf_counter() - t < 1.0
