"""POST /infill, llama.cpp's fill-in-the-middle route, with the exact requests the editor plugins send:
llama.vim (autoload/llama.vim at ggml-org/llama.vim a1c8e6e, 2026-01-31: s:fim and s:ring_update, sent by
curl with these headers) and llama.vscode (src/llama-server.ts at ggml-org/llama.vscode 3938fb3,
createRequestPayload, sent by axios). Each test checks what the plugin reads back."""

import json
import re
from contextlib import contextmanager

import httpx
import pytest
from serve_support import API_KEY, MODEL

from codetune.export.sampling import SamplingParams, fim_layout, generate_text, prompt_ids

PREFIX = "import os\n\n\ndef read(path):\n"  # llama.vim: the lines above the cursor, each ended by "\n"
MIDDLE = "    with open(pa"  # the cursor's line up to the cursor
SUFFIX = "th) as f:\n        return f.read()\n"  # the rest of the line, then the lines below

# llama.vim's s:fim request with its default settings (n_predict 128, no stop strings, t_max_predict_ms
# 1000, model_fim and api_key as a user sets them for a server that asks for them)
LLAMA_VIM_FIM = {
    "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
    "input_extra": [{"text": "def write(path, text):\n    pass\n", "time": 1767175321.5, "filename": "io.py"}],
    "prompt": MIDDLE, "n_predict": 128, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
    "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"],
    "model": MODEL,
}
# llama.vim's s:ring_update: extra context sent ahead of the next completion, nothing to predict
LLAMA_VIM_RING = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": LLAMA_VIM_FIM["input_extra"],
                  "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False,
                  "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
# curl --request POST --header "Content-Type: application/json" [--header "Authorization: Bearer KEY"]
CURL_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                "User-Agent": "curl/8.5.0", "Accept": "*/*"}
# llama.vscode's createRequestPayload(false, ...) with its defaults (n_predict 128, max_parallel_completions 3,
# t_max_prompt_ms 500, t_max_predict_ms 2500), and the preparation call createRequestPayload(true, ...)
LLAMA_VSCODE_FIM = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [],
                    "prompt": MIDDLE, "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
                    "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
                    "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}
LLAMA_VSCODE_PREP = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": [], "prompt": "",
                     "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                     "t_max_predict_ms": 1}
AXIOS_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                 "Accept": "application/json, text/plain, */*", "User-Agent": "axios/1.7.9"}


@contextmanager
def submitted(engine):
    """The jobs the app hands the engine, as (prompts, params)."""
    seen, real = [], engine.submit

    def submit(prompts, params, on_text=None):
        seen.append((prompts, params))
        return real(prompts, params, on_text)

    engine.submit = submit
    try:
        yield seen
    finally:
        del engine.submit


def post(server, body, headers=CURL_HEADERS) -> httpx.Response:
    return httpx.post(f"{server.base_url}/infill", content=json.dumps(body).encode(), headers=headers, timeout=60)


def test_llama_vim_fim_request(server, tiny_model):
    _, tok = tiny_model
    with submitted(server.engine) as jobs:
        r = post(server, LLAMA_VIM_FIM)
    assert r.status_code == 200
    # what s:fim_on_response checks before it decodes, on the raw text
    assert re.match(r"^\s*{", r.text) and re.search(r'"content"\s*:"', r.text)
    body = r.json()
    assert set(body) == set(LLAMA_VIM_FIM["response_fields"])  # just the fields asked for, keyed by their paths
    assert isinstance(body["content"], str) and body["truncated"] is False and body["tokens_cached"] == 0
    (prompts, params), = jobs
    # the FIM prompt /v1/completions builds for `suffix`, around prefix + the cursor's line
    assert prompts == [fim_layout(tok, prompt_ids(tok, PREFIX) + prompt_ids(tok, MIDDLE), prompt_ids(tok, SUFFIX))]
    assert body["timings/prompt_n"] == len(prompts[0]) and body["timings/predicted_n"] >= 1
    assert all(body[f"timings/{k}"] > 0 for k in ("prompt_ms", "prompt_per_second", "predicted_per_second"))
    p = params[0]
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.stop, p.line_time_limit_s) == \
        (128, 0.8, 40, 0.9, [], 1.0)


def test_llama_vim_ring_update_answers_at_once(server):
    with submitted(server.engine) as jobs:
        r = post(server, LLAMA_VIM_RING)
    assert r.status_code == 200 and r.json() == {} and jobs == []  # nothing to predict, no model call


def test_llama_vscode_requests(server):
    with submitted(server.engine) as jobs:
        r = post(server, LLAMA_VSCODE_FIM, AXIOS_HEADERS)
    assert r.status_code == 200
    results = r.json()  # n_cmpl > 1: a list, read by getComplFromContent as [c.content for c in it]
    assert isinstance(results, list) and [c["index"] for c in results] == [0, 1, 2]
    assert all(isinstance(c["content"], str) and c["stop"] is True for c in results)
    assert len(jobs[0][0]) == 3
    r = post(server, LLAMA_VSCODE_PREP, AXIOS_HEADERS)
    assert r.status_code == 200 and r.json()["content"] == ""


def test_a_long_file_is_cut_to_fit_as_llama_cpp_cuts_it(server, tiny_model):
    _, tok = tiny_model
    from codetune.export.sampling import max_context

    context = max_context(server.engine.model)
    long = "x = 1\n" * 3000  # ~6k tokens before the cursor, more than the tiny model's context
    with submitted(server.engine) as jobs:
        r = post(server, {**LLAMA_VIM_FIM, "input_prefix": long, "n_predict": 4, "response_fields": None})
    assert r.status_code == 200 and r.json()["truncated"] is True
    prompt = jobs[0][0][0]
    assert len(prompt) + 4 == context
    # the end of the prefix (next to the cursor) and the suffix (short here) are what is kept
    at = prompt.index(tok.convert_tokens_to_ids("<fim_suffix>"))
    assert prompt[at - 40:at] == (prompt_ids(tok, long) + prompt_ids(tok, MIDDLE))[-40:]
    assert prompt[at + 1:-1] == prompt_ids(tok, SUFFIX)


@pytest.mark.parametrize("change, status, field", [
    ({"stream": True}, 400, "stream"),
    ({"model": "another"}, 404, "model"),
    ({"n_predict": 5000}, 400, "n_predict"),
    ({"input_prefix": "a\ud800"}, 400, "input_prefix"),
    ({"top_k": -1}, 400, "top_k"),
])
def test_bad_requests_name_the_field(server, change, status, field):
    r = post(server, {**LLAMA_VIM_FIM, **change})
    assert r.status_code == status and r.json()["error"]["param"] == field


def test_the_api_key_is_required(server):
    r = post(server, LLAMA_VIM_FIM, {"Content-Type": "application/json"})
    assert r.status_code == 401


def test_line_time_limit_stops_after_a_line_break(tiny_model):
    """t_max_predict_ms: once the time is up, the completion ends at the first line break (finish "length")."""
    model, tok = tiny_model
    newline = prompt_ids(tok, "\n")[0]

    def force_newline(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., newline] = 1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(force_newline)
    try:
        out = generate_text(model, tok, prompt_ids(tok, "x = 1"), SamplingParams(max_new_tokens=20,
                                                                                 line_time_limit_s=1e-9))
    finally:
        handle.remove()
    assert out.text == "\n" and out.finish_reason == "length" and out.completion_tokens == 1
