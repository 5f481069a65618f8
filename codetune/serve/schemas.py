"""What /v1/completions (OpenAI's legacy completions API) and /v1/chat/completions accept, and the
bounds put on both (one set of checks and messages: a request's `prompt_texts` and `asked_max_tokens`
are what they measure).

Fields the server cannot honour (echo, logprobs, penalties, tools) are refused with a 400 naming the field,
not silently ignored: a client relying on them would otherwise get quietly different behaviour. Every
value the model code would fail on (text that is not valid Unicode, a seed torch cannot take, a
temperature that divides logits into infinities) is refused here with the field named, so that no
client input reaches the model and comes back as a 500.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from codetune.data.chat import ROLES
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


def _valid_unicode(value):
    # JSON can carry a lone surrogate ("\ud800"): Python decodes it, the tokenizer and the response
    # encoder then fail on it
    for text in [value] if isinstance(value, str) else value or []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text, but contains a lone surrogate (a \\ud800-\\udfff "
                             "escape without its pair)") from None
    return value


class _Request(BaseModel):
    """What both APIs share: the model, sampling, stop strings, streaming."""
    # unknown OpenAI fields (user, metadata) are harmless; NaN and infinity are no number a client means
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)  # what torch's generator takes
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    @field_validator("model", "stop")
    @classmethod
    def _unicode(cls, value):
        return _valid_unicode(value)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, whether this request uses it) for each field the server cannot honour."""
        return [("presence_penalty", bool(self.presence_penalty)), ("frequency_penalty", bool(self.frequency_penalty))]

    def sampling(self) -> dict:
        """SamplingParams fields this request sets (besides max_new_tokens, stop and seed)."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p}

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", "suffix")
    @classmethod
    def _unicode_text(cls, value):
        return _valid_unicode(value)

    def unsupported(self) -> list[tuple[str, bool]]:
        return [("echo", bool(self.echo)), ("logprobs", self.logprobs is not None), *super().unsupported(),
                ("best_of", self.best_of not in (None, self.n or 1))]

    @property
    def prompt_texts(self) -> list[str]:
        """One text per prompt (each with `suffix`, if any, after it)."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict]  # text, or OpenAI's content parts: [{"type": "text", "text": ...}, ...]

    @model_validator(mode="after")
    def _check(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (tools and function calls are not supported)")
        if isinstance(self.content, list):
            for k, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {k} is not a text part ({{\"type\": \"text\", \"text\": "
                                     "...}); this server reads text only")
        _valid_unicode(self.text)
        return self

    @property
    def text(self) -> str:
        # content parts are joined by newlines, as vLLM joins them
        return self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens; wins over it
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return [("logprobs", bool(self.logprobs)), ("top_logprobs", self.top_logprobs is not None),
                *super().unsupported(), ("tools", bool(self.tools)),
                ("tool_choice", self.tool_choice not in (None, "none")),
                ("response_format", (self.response_format or {"type": "text"}).get("type") != "text")]

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def prompt_texts(self) -> list[str]:
        """The conversation is one prompt; its texts are its messages' contents."""
        return ["".join(m.text for m in self.messages)]


# llama.cpp's "no seed": a random one
LLAMA_RANDOM_SEEDS = (-1, 0xFFFFFFFF)


class InfillRequest(_Request):
    """llama.cpp's POST /infill, as editor plugins send it (llama.vim, llama.vscode): the text before the gap
    (`input_prefix`, then `prompt`: the current line up to the cursor) and after it (`input_suffix`).
    Defaults are llama.cpp's. Accepted and not acted on, as they only tune llama.cpp's own machinery:
    id_slot, cache_prompt, samplers (the order is top-k then top-p here), t_max_prompt_ms, n_indent, and
    input_extra (context from other files: the model was trained on one file's FIM, and without a prompt
    cache its tokens would be paid for on every keystroke)."""

    model: str | None = None  # llama.cpp serves one model and does not ask for it
    input_prefix: str = ""
    input_suffix: str = ""
    prompt: str = ""
    input_extra: list[dict] | None = None
    n_predict: int | None = None  # -1: llama.cpp's "until the context is full"; here the default applies
    n_cmpl: int | None = Field(None, ge=1)  # completions (llama.vscode's max_parallel_completions)
    temperature: float | None = Field(0.8, ge=0.0, le=2.0)
    top_k: int | None = Field(40, ge=0)
    top_p: float | None = Field(0.95, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(1.0, gt=0.0)
    t_max_predict_ms: float | None = None  # stop at a line end once this much decoding time has passed
    response_fields: list[str] | None = None
    id_slot: int | None = None
    cache_prompt: bool | None = None
    samplers: list[str] | None = None
    t_max_prompt_ms: float | None = None
    n_indent: int | None = None

    @field_validator("input_prefix", "input_suffix", "prompt")
    @classmethod
    def _unicode_text(cls, value):
        return _valid_unicode(value)

    @model_validator(mode="after")
    def _as_openai(self):
        # the shared checks read n (choices) and seed as /v1/completions has them
        self.n = self.n_cmpl
        if self.seed in LLAMA_RANDOM_SEEDS:
            self.seed = None
        return self

    @property
    def max_tokens_param(self) -> str:
        return "n_predict"

    @property
    def asked_max_tokens(self) -> int | None:
        return self.n_predict if self.n_predict is not None and self.n_predict >= 0 else None

    @property
    def prompt_texts(self) -> list[str]:
        return [self.input_prefix + self.prompt + self.input_suffix]

    def sampling(self) -> dict:
        limit = self.t_max_predict_ms / 1000 if self.t_max_predict_ms and self.t_max_predict_ms > 0 else None
        return {**super().sampling(), "top_k": self.top_k or 0, "line_time_limit_s": limit,
                "repetition_penalty": self.repeat_penalty or 1.0}


def parse_request(raw: bytes, kind: type[_Request] = CompletionRequest):
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to be an API request") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        # a union field fails once per member ("prompt.str", "prompt.list[str].2"): report the most
        # specific one, with the field and the index named and pydantic's union tags left out
        err = max((x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]),
                  key=lambda x: sum(isinstance(part, int) for part in x["loc"]))
        field = str(err["loc"][0]) if err["loc"] else None
        where = ".".join([field or "body"] + [str(x) for x in err["loc"][1:] if isinstance(x, int)])
        raise ApiError(400, f"{where}: {err['msg'].removeprefix('Value error, ')}", param=field) from None


def check_request(req: _Request, limits: Limits) -> None:
    """Bounds and unsupported options, each refused with the field named."""
    for name, used in req.unsupported():
        if used:
            raise ApiError(400, f"{name} is not supported by this server; leave it unset", param=name)
    prompts = req.prompt_texts
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    choices = len(prompts) * (req.n or 1)
    if choices > limits.max_choices:
        raise ApiError(400, f"n x prompts = {choices} completions; this server allows at most {limits.max_choices}",
                       param="n")
    if (req.asked_max_tokens or 0) > limits.max_tokens:
        raise ApiError(400, f"{req.max_tokens_param}={req.asked_max_tokens}; this server allows at most "
                            f"{limits.max_tokens}", param=req.max_tokens_param)
    stops = stop_list(req)
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(400, f"stop: at most {limits.max_stop} strings of up to {limits.max_stop_chars} characters",
                       param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", param="stop")


def check_prompt_bytes(req: _Request, max_tokens: int, context: int, limits: Limits) -> None:
    """Refuse, before tokenising, a prompt too many bytes long to fit the context in any plausible number
    of tokens: tokenising a megabyte costs tens of megabytes of memory, to be refused afterwards anyway."""
    room = max(context - max_tokens, 0) * limits.prompt_bytes_per_token
    suffix = getattr(req, "suffix", None)
    for text in req.prompt_texts:
        size = len(text.encode()) + (len(suffix.encode()) if suffix is not None else 0)
        if size > room:
            what = "prompt and suffix are" if suffix else "messages are" if isinstance(req, ChatCompletionRequest) \
                else "prompt is"
            raise ApiError(400, f"This model's maximum context length is {context} tokens; your {what} {size} "
                                f"bytes, more than the {room} that can fit beside max_tokens={max_tokens} (this "
                                f"server allows {limits.prompt_bytes_per_token} bytes per token, "
                                "--prompt-bytes-per-token). Please reduce your prompt or completion length.",
                           param=prompt_param(req), code="context_length_exceeded")


def check_context(req: _Request, prompt_tokens: int, max_tokens: int, context: int) -> None:
    """The prompt's tokens and max_tokens must fit the model's context (OpenAI's wording and code)."""
    if prompt_tokens + max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, however you requested "
                            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your {prompt_param(req)}; "
                            f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                       param=prompt_param(req), code="context_length_exceeded")


def prompt_param(req: _Request) -> str:
    return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"


def max_tokens_of(req: _Request, limits: Limits, room: int | None = None) -> int:
    """max_tokens as asked; else OpenAI's defaults: 16 for completions, for chat as many as fit in `room`
    (the context left after the prompt; before tokenising, None: one token, the least an answer needs)."""
    if req.asked_max_tokens is not None:
        return req.asked_max_tokens
    if isinstance(req, ChatCompletionRequest):
        return max(1, min(limits.max_tokens, room if room is not None else 1))
    return min(limits.default_max_tokens, limits.max_tokens)


def stop_list(req: _Request) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)
