"""The real `openai` client against `codetune serve` on the tiny model: completions, FIM, streaming."""

import openai
import pytest
from serve_support import MODEL

from codetune.export.sampling import SamplingParams, fim_ids, generate_text, prompt_ids


def _local(server, ids, **kw):
    """What the engine's model produces directly, for comparison with what came over HTTP."""
    return generate_text(server.engine.model, server.engine.tokenizer, ids, SamplingParams(**kw))


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_local_generation(client, server):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=8, temperature=0)
    want = _local(server, prompt_ids(server.engine.tokenizer, "def add(a, b):"), max_new_tokens=8)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == want.completion_tokens


def test_fim_via_suffix(client, server):
    r = client.completions.create(model=MODEL, prompt="def f(x):\n    ", suffix="\n    return y\n",
                                  max_tokens=8, temperature=0)
    ids = fim_ids(server.engine.tokenizer, "def f(x):\n    ", "\n    return y\n")
    assert r.choices[0].text == _local(server, ids, max_new_tokens=8).text


def test_streaming_with_fim_and_usage(client, server):
    chunks = list(client.completions.create(model=MODEL, prompt="x = ", suffix="\nprint(x)\n", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = _local(server, fim_ids(server.engine.tokenizer, "x = ", "\nprint(x)\n"), max_new_tokens=10)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens


def test_n_stop_and_sampling(client, server):
    r = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=6, temperature=0.8,
                                  top_p=0.9, seed=1, stop=["\n", "zz"])
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all("\n" not in c.text for c in r.choices)


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=server.limits.max_tokens + 1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="n x prompts"):
        client.completions.create(model=MODEL, prompt="x", n=5)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt="x", logprobs=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
