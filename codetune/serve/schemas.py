"""What /v1/completions accepts (OpenAI's legacy completions API) and the bounds put on it.

Fields the server cannot honour (echo, logprobs, penalties) are refused with a 400 naming the field,
not silently ignored: a client relying on them would otherwise get quietly different behaviour. Every
value the model code would fail on (text that is not valid Unicode, a seed torch cannot take, a
temperature that divides logits into infinities) is refused here with the field named, so that no
client input reaches the model and comes back as a 500.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from codetune.serve.limits import Limits

# Below this, logits / temperature overflows float32 (1e-300 is 0 there) and sampling meets NaNs; a
# temperature this small is greedy decoding in all but name, which `0` asks for.
MIN_TEMPERATURE = 1e-5


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    # unknown OpenAI fields (user, metadata) are harmless; NaN and infinity are no number a client means
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)  # what torch's generator takes
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    @field_validator("model", "prompt", "suffix", "stop")
    @classmethod
    def _unicode(cls, value):
        # JSON can carry a lone surrogate ("\ud800"): Python decodes it, the tokenizer and the response
        # encoder then fail on it
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text, but contains a lone surrogate (a \\ud800-\\udfff "
                                 "escape without its pair)") from None
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


def parse_request(raw: bytes) -> CompletionRequest:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to be a completions request") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        # a union field fails once per member ("prompt.str", "prompt.list[str].2"): report the most
        # specific one, with the field and the index named and pydantic's union tags left out
        err = max((x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]),
                  key=lambda x: sum(isinstance(part, int) for part in x["loc"]))
        field = str(err["loc"][0]) if err["loc"] else None
        where = ".".join([field or "body"] + [str(x) for x in err["loc"][1:] if isinstance(x, int)])
        raise ApiError(400, f"{where}: {err['msg'].removeprefix('Value error, ')}", param=field) from None


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
    if max_tokens_of(req, limits) > limits.max_tokens:
        raise ApiError(400, f"max_tokens={req.max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    stops = stop_list(req)
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(400, f"stop: at most {limits.max_stop} strings of up to {limits.max_stop_chars} characters",
                       param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", param="stop")


def check_prompt_bytes(req: CompletionRequest, context: int, limits: Limits) -> None:
    """Refuse, before tokenising, a prompt too many bytes long to fit the context in any plausible number
    of tokens: tokenising a megabyte costs tens of megabytes of memory, to be refused afterwards anyway."""
    max_tokens = max_tokens_of(req, limits)
    room = max(context - max_tokens, 0) * limits.prompt_bytes_per_token
    suffix = len(req.suffix.encode()) if req.suffix is not None else 0
    for text in prompt_list(req):
        size = len(text.encode()) + suffix
        if size > room:
            what = "prompt and suffix are" if req.suffix else "prompt is"
            raise ApiError(400, f"This model's maximum context length is {context} tokens; your {what} {size} "
                                f"bytes, more than the {room} that can fit beside max_tokens={max_tokens} (this "
                                f"server allows {limits.prompt_bytes_per_token} bytes per token, "
                                "--prompt-bytes-per-token). Please reduce your prompt or completion length.",
                           param="prompt", code="context_length_exceeded")


def max_tokens_of(req: CompletionRequest, limits: Limits) -> int:
    return req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)


def prompt_list(req: CompletionRequest) -> list[str]:
    return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)


def stop_list(req: CompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)
