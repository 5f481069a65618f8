"""Every client error is a 4xx JSON error in OpenAI's shape that names the field, leaks no internal
text, and leaves the keep-alive connection it came on serving the next request."""

import json
import logging

import httpx
import pytest
from serve_support import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
GOOD = {"model": MODEL, "prompt": "def f(", "max_tokens": 2, "temperature": 0}
# what an internal error's text looks like; none of it may reach a client
LEAKS = ("Traceback", "Error:", "Exception", 'File "', "torch", "tokenizers", "codetune/")


def _raw(fields: str) -> bytes:
    """A body whose JSON text is given literally (lone surrogates, NaN, huge ints survive as sent)."""
    return f'{{"model": "{MODEL}", "max_tokens": 2, {fields}}}'.encode()


CASES = [  # (what, body, field)
    ("empty prompt", _raw('"prompt": ""'), "prompt"),
    ("empty prompt in a list", _raw('"prompt": ["ok", ""]'), "prompt"),
    ("lone surrogate in the prompt", _raw('"prompt": "a\\ud800b"'), "prompt"),
    ("lone surrogate in a listed prompt", _raw('"prompt": ["ok", "\\udfff"]'), "prompt"),
    ("lone surrogate in the suffix", _raw('"prompt": "a", "suffix": "\\ud83d"'), "suffix"),
    ("lone surrogate in a stop string", _raw('"prompt": "a", "stop": ["\\ud800"]'), "stop"),
    ("lone surrogate in the model", b'{"model": "m\\ud800", "prompt": "a"}', "model"),
    ("seed = 2**64", _raw(f'"prompt": "a", "seed": {2 ** 64}'), "seed"),
    ("seed = 2**63", _raw(f'"prompt": "a", "seed": {2 ** 63}'), "seed"),
    ("seed below -2**63", _raw(f'"prompt": "a", "seed": {-(2 ** 63) - 1}'), "seed"),
    ("temperature = 1e-300", _raw('"prompt": "a", "temperature": 1e-300'), "temperature"),
    ("temperature = 5e-324", _raw('"prompt": "a", "temperature": 5e-324'), "temperature"),
    ("temperature = NaN", _raw('"prompt": "a", "temperature": NaN'), "temperature"),
    ("top_p = Infinity", _raw('"prompt": "a", "top_p": Infinity'), "top_p"),
    ("presence_penalty = NaN", _raw('"prompt": "a", "presence_penalty": NaN'), "presence_penalty"),
    ("stream_options not an object", _raw('"prompt": "a", "stream_options": 5'), "stream_options"),
    ("nested prompt", _raw('"prompt": ' + "[" * 300 + "]" * 300), "prompt"),
    ("nested past the JSON parser's depth", _raw('"prompt": "a", "user": ' + "[" * 20000 + "]" * 20000), None),
]


def _check_error(r: httpx.Response, field: str | None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == field
    assert (field or "request body") in err["message"]
    assert not any(leak in err["message"] for leak in LEAKS), err["message"]
    return err


@pytest.mark.parametrize("what,body,field", CASES, ids=[c[0] for c in CASES])
def test_client_error_is_4xx_naming_the_field_and_keeps_the_connection(server, what, body, field):
    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1)) as c:
        bad = c.post(url, content=body, headers=AUTH)
        _check_error(bad, field)
        good = c.post(url, json=GOOD, headers=AUTH)
        assert good.status_code == 200, good.text
        assert good.json()["choices"][0]["finish_reason"] in ("stop", "length")
        same = [r.extensions["network_stream"].get_extra_info("client_addr") for r in (bad, good)]
        assert same[0] == same[1], "the error closed the keep-alive connection"


def test_small_temperature_and_extreme_seeds_still_generate(server):
    """The bounds refuse only what breaks: the smallest temperature allowed and the int64 seed range work."""
    from codetune.serve.schemas import MIN_TEMPERATURE

    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=60) as c:
        for extra in ({"temperature": MIN_TEMPERATURE, "seed": 2 ** 63 - 1, "n": 2},
                      {"temperature": 1.0, "seed": -(2 ** 63)}, {"prompt": "", "suffix": "\n    return x\n"}):
            r = c.post(url, json=dict(GOOD, **extra), headers=AUTH)
            assert r.status_code == 200, (extra, r.text)


def test_unexpected_error_is_a_generic_500_with_the_detail_only_in_the_log(server, monkeypatch, caplog):
    secret = "internal-detail-42"

    def broken(*_a, **_k):
        raise RuntimeError(secret)

    monkeypatch.setattr(server.engine.tokenizer, "encode", broken)
    caplog.set_level(logging.ERROR, logger="codetune.serve")
    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1)) as c:
        r = c.post(url, json=GOOD, headers=AUTH)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert secret not in r.text and "RuntimeError" not in r.text
        assert any(secret in (rec.exc_text or "") or (rec.exc_info and secret in str(rec.exc_info[1]))
                   for rec in caplog.records), "the detail did not reach the server's log"
        monkeypatch.undo()
        good = c.post(url, json=GOOD, headers=AUTH)
        assert good.status_code == 200, good.text
        same = [x.extensions["network_stream"].get_extra_info("client_addr") for x in (r, good)]
        assert same[0] == same[1], "the 500 closed the keep-alive connection"


def test_errors_name_fields_without_echoing_input(server):
    """pydantic's union tags stay out of the field path; the value sent is not echoed back."""
    url = f"{server.base_url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        r = c.post(url, content=json.dumps({"model": MODEL, "prompt": ["a", 7]}), headers=AUTH)
        err = _check_error(r, "prompt")
        assert err["message"].startswith("prompt.1:"), err["message"]
