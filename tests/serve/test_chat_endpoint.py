"""/v1/chat/completions on the tiny model with the real `openai` client: the prompt is, token by token,
what training rendered (codetune.data.chat.prompt_ids) in the template the model carries; answers end
at the template's end-of-turn token; a model with no template and no chat training gets one 400."""

from contextlib import contextmanager

import httpx
import openai
import pytest
from serve_support import API_KEY, MODEL, running_server
from tiny_adapter import tiny_tokenizer

from codetune.data import chat
from codetune.export.generate import ChatRendering, chat_rendering
from codetune.export.sampling import SamplingParams, generate_text
from codetune.serve.jobs import chat_support
from codetune.serve.limits import Limits

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the user's "<|im_end|>" is text: it must not end their turn
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add one to x. <|im_end|>"}]
TRAINED_PLAIN = {"data_manifest": {"chat_template": "plain", "counts": {"kinds": {"chat": {"kept": 5}}}}}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = Limits(max_tokens=1000, max_choices=4)


def _chatml_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def chat_server(tiny_model):
    with running_server(tiny_model[0], _chatml_tokenizer(), LIMITS) as srv:
        yield srv


def _client(srv):
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _submitted(monkeypatch, engine) -> list:
    """The jobs the app hands the engine, as (prompts, params)."""
    seen, real = [], engine.submit

    def submit(prompts, params, on_text=None):
        seen.append((prompts, params))
        return real(prompts, params, on_text)

    monkeypatch.setattr(engine, "submit", submit)
    return seen


@contextmanager
def end_of_turn_at(model, token: int, step: int):
    """The model's `step`-th generated token is forced to `token` (later steps run as they would)."""
    calls = []

    def force(_module, _inputs, logits):
        calls.append(None)
        if len(calls) == step:
            logits = logits.clone()
            logits[..., token] = 1e4
            return logits
        return None

    handle = model.get_output_embeddings().register_forward_hook(force)
    try:
        yield
    finally:
        handle.remove()


def test_template_lookup():
    plain, chatml = tiny_tokenizer(), _chatml_tokenizer()
    eos, im_end = plain.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")
    assert chat_rendering(plain, {}).known is False  # no template, no chat rows: refused by serve
    assert chat_rendering(plain, {"data_manifest": {"chat_template": "plain"}}).known is False  # code only
    assert chat_rendering(plain, TRAINED_PLAIN) == ChatRendering("plain", (eos,), True)
    assert chat_rendering(chatml, {}).choice == "auto" and chat_rendering(chatml, {}).stop_token_ids == (im_end,)
    # a manifest of code alone names a template the adapter never learned: the tokenizer's own wins
    assert chat_rendering(chatml, {"data_manifest": {"chat_template": "plain"}}).choice == "auto"
    assert chat_rendering(chatml, TRAINED_PLAIN).stop_token_ids == (eos,)
    assert chat_support(plain, {}).refusal and chat_support(chatml, {}).refusal is None
    dropping = tiny_tokenizer()
    dropping.chat_template = "{{ messages[0]['content'] }}"  # writes the first message only
    assert "cannot render a conversation" in chat_support(dropping, {}).refusal


def test_a_merged_model_carries_its_adapters_rendering(tmp_path):
    """`codetune merge` copies codetune.json beside the merged model: serving it with --model reads it."""
    import json

    from codetune.export.generate import _merged_info

    (tmp_path / "codetune.json").write_text(json.dumps(dict(TRAINED_PLAIN, merged_from="runs/x/adapter")))
    assert chat_rendering(tiny_tokenizer(), _merged_info(str(tmp_path))).known
    (tmp_path / "codetune.json").write_text("{cut sho")
    assert _merged_info(str(tmp_path)) == {} and _merged_info("tiny-stablelm") == {}


def test_chat_prompt_is_the_training_rendering(chat_server, monkeypatch):
    model, tok = chat_server.engine.model, chat_server.engine.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    seen = _submitted(monkeypatch, chat_server.engine)
    r = _client(chat_server).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0)
    want = [int(i) for i in chat.prompt_ids(tok, MSGS)]
    assert seen[0][0] == [want]  # token by token
    assert want.count(im_end) == 2  # the two turns' ends; the user's text stays text
    assert seen[0][1][0].stop_token_ids == (im_end,)
    local = generate_text(model, tok, want, SamplingParams(max_new_tokens=6, stop_token_ids=(im_end,)))
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", local.text, local.finish_reason)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want), local.completion_tokens)


def test_answer_ends_at_the_templates_end_of_turn(chat_server):
    model, tok = chat_server.engine.model, chat_server.engine.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    ids = [int(i) for i in chat.prompt_ids(tok, MSGS)]
    two = generate_text(model, tok, ids, SamplingParams(max_new_tokens=2))
    assert two.finish_reason == "length"  # the model runs on by itself: the stop below is the template's
    client = _client(chat_server)
    with end_of_turn_at(model, im_end, step=3):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (two.text, "stop")
    assert r.usage.completion_tokens == 3 and "<|im_end|>" not in r.choices[0].message.content
    with end_of_turn_at(model, im_end, step=3):
        chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == two.text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].usage.completion_tokens == 3


def test_without_max_tokens_an_answer_may_fill_the_context(chat_server, monkeypatch):
    """OpenAI's chat default: max_tokens is what is left of the context (up to --max-tokens-limit)."""
    tok = chat_server.engine.tokenizer
    seen = _submitted(monkeypatch, chat_server.engine)
    with end_of_turn_at(chat_server.engine.model, tok.convert_tokens_to_ids("<|im_end|>"), step=1):
        r = _client(chat_server).chat.completions.create(model=MODEL, messages=MSGS, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    context = chat_server.engine.model.config.max_position_embeddings
    assert seen[0][1][0].max_new_tokens == min(LIMITS.max_tokens, context - len(chat.prompt_ids(tok, MSGS)))


def test_plain_template_serves_an_adapter_trained_on_plain_chat_rows(tiny_model, monkeypatch):
    model, tok = tiny_model
    with running_server(model, tok, LIMITS, run_info=TRAINED_PLAIN) as srv:
        seen = _submitted(monkeypatch, srv.engine)
        parts = [{"role": "user", "content": [{"type": "text", "text": "Sort"}, {"type": "text", "text": "[3, 1]"}]}]
        r = _client(srv).chat.completions.create(model=MODEL, messages=parts, max_tokens=3, temperature=0)
    want = [int(i) for i in chat.prompt_ids(tok, [{"role": "user", "content": "Sort\n[3, 1]"}], "plain")]
    assert seen[0][0] == [want] and seen[0][1][0].stop_token_ids == (tok.eos_token_id,)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_model_without_a_chat_template_is_one_400(server, client):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "messages": MSGS},
                   headers=AUTH, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and (err["type"], err["code"]) == ("invalid_request_error", "no_chat_template")
    assert "\n" not in err["message"] and "chat data" in err["message"] and "instruct model" in err["message"]


def _error(srv, path: str, body: dict) -> dict:
    r = httpx.post(f"{srv.base_url}{path}", json=dict({"model": MODEL}, **body), headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_limits_and_their_messages_are_the_completions_ones(chat_server):
    over = {"max_tokens": LIMITS.max_tokens + 1}
    chat_err = _error(chat_server, "/v1/chat/completions", dict(over, messages=MSGS))
    assert chat_err == _error(chat_server, "/v1/completions", dict(over, prompt="x"))
    assert _error(chat_server, "/v1/chat/completions", {"messages": MSGS, "max_completion_tokens": 1001})["param"] \
        == "max_completion_tokens"
    long = [{"role": "user", "content": " a" * 4200}]  # 2 bytes a token: past the context, not the byte bound
    err = _error(chat_server, "/v1/chat/completions", {"messages": long, "max_tokens": 10})
    assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert err["message"].startswith("This model's maximum context length is")
    huge = _error(chat_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70000}]})
    assert huge["code"] == "context_length_exceeded" and "your messages are 70000 bytes" in huge["message"]
    for body, field in (({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                        ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": MSGS, "temperature": 5}, "temperature")):
        assert _error(chat_server, "/v1/chat/completions", body)["param"] == field, body
