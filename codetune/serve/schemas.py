"""What /v1/completions accepts (OpenAI's legacy completions API) and the bounds put on it.

Fields the server cannot honour (echo, logprobs, penalties) are refused with a 400 naming the field,
not silently ignored: a client relying on them would otherwise get quietly different behaviour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass
class Limits:
    max_tokens: int = 1024  # per choice
    max_choices: int = 16  # n x number of prompts
    max_stop: int = 4  # as in OpenAI's API
    max_stop_chars: int = 256
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 16  # OpenAI's default when max_tokens is absent


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata) are harmless

    model: str
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0


def parse_request(raw: bytes) -> CompletionRequest:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}", param=param) from None


def check_request(req: CompletionRequest, limits: Limits) -> None:
    """Bounds and unsupported options, each refused with the field named."""
    unsupported = [("echo", bool(req.echo)), ("logprobs", req.logprobs is not None),
                   ("presence_penalty", bool(req.presence_penalty)),
                   ("frequency_penalty", bool(req.frequency_penalty)),
                   ("best_of", req.best_of not in (None, req.n or 1))]
    for name, used in unsupported:
        if used:
            raise ApiError(400, f"{name} is not supported by this server; leave it unset", param=name)
    prompts = prompt_list(req)
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    choices = len(prompts) * (req.n or 1)
    if choices > limits.max_choices:
        raise ApiError(400, f"n x prompts = {choices} completions; this server allows at most {limits.max_choices}",
                       param="n")
    if (req.max_tokens or 0) > limits.max_tokens:
        raise ApiError(400, f"max_tokens={req.max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    stops = stop_list(req)
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(400, f"stop: at most {limits.max_stop} strings of up to {limits.max_stop_chars} characters",
                       param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", param="stop")


def prompt_list(req: CompletionRequest) -> list[str]:
    return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)


def stop_list(req: CompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)
