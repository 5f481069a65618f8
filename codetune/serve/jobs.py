"""Requests into engine jobs: token ids and sampling settings per choice, with the context checked.

Completions encode a prompt (or a fill-in-the-middle prompt around `suffix`; llama.cpp's /infill builds the
same one from its fields); chat renders the
conversation with codetune.data.chat.prompt_ids, the function `prepare` rendered the training chat rows
with, in the template the served model carries (export.generate.chat_rendering), and stops each answer
at that template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

from codetune.export.sampling import SamplingParams, fim_ids, fim_layout, prompt_ids
from codetune.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    InfillRequest,
    check_context,
    max_tokens_of,
    stop_list,
)


@dataclass(frozen=True)
class ChatSupport:
    rendering: object | None  # the model's export.generate.ChatRendering; None where chat is refused
    refusal: str | None  # why /v1/chat/completions answers 400; None where it serves

    def describe(self) -> str:
        if self.refusal is not None:
            return f"/v1/chat/completions is off: {self.refusal}"
        how = "the tokenizer's chat template" if self.rendering.choice == "auto" else "codetune's plain template"
        return f"/v1/chat/completions renders with {how}, as training rendered chat rows"


def chat_support(tok, run_info: dict) -> ChatSupport:
    """Whether and how this model answers chat. Plain-template chat only where the adapter trained on chat
    rows rendered with it (its manifest says so): a model that never saw that template would only guess."""
    from codetune.config import ConfigError
    from codetune.export.generate import NO_CHAT_TEMPLATE, chat_rendering

    try:
        rendering = chat_rendering(tok, run_info)
    except ConfigError as e:  # a template that cannot render a conversation
        return ChatSupport(None, str(e))
    if not rendering.known:
        return ChatSupport(None, f"{NO_CHAT_TEMPLATE}; /v1/completions needs none")
    return ChatSupport(rendering, None)


@dataclass(frozen=True)
class JobSpec:
    prompts: list[list[int]]  # one token-id prompt per choice
    params: list[SamplingParams]
    prompt_tokens: int  # as OpenAI counts them: each prompt once, whatever n is


def completion_job(req: CompletionRequest, tok, limits, context: int) -> JobSpec:
    max_tokens = max_tokens_of(req, limits)
    encoded = []
    for text in req.prompt_texts:
        ids = fim_ids(tok, text, req.suffix) if req.suffix is not None else prompt_ids(tok, text)
        if not ids:
            raise ApiError(400, "prompt is empty: send some text, or a suffix for fill-in-the-middle",
                           param="prompt")
        check_context(req, len(ids), max_tokens, context)
        encoded.append(ids)
    return _choices(req, encoded, max_tokens)


def chat_job(req: ChatCompletionRequest, tok, rendering, limits, context: int) -> JobSpec:
    """`rendering`: the served model's export.generate.ChatRendering."""
    from jinja2 import TemplateError

    from codetune.data.chat import prompt_ids as chat_prompt_ids

    msgs = [{"role": m.role, "content": m.text} for m in req.messages]
    try:
        ids = [int(i) for i in chat_prompt_ids(tok, msgs, rendering.choice)]
    except (TemplateError, ValueError) as e:  # e.g. a template that insists on alternating user/assistant
        raise ApiError(400, f"the model's chat template refuses this conversation: {e}", param="messages") from None
    max_tokens = max_tokens_of(req, limits, room=context - len(ids))
    check_context(req, len(ids), max_tokens, context)
    return _choices(req, [ids], max_tokens, rendering.stop_token_ids)


def infill_job(req: InfillRequest, tok, limits, context: int) -> tuple[JobSpec, bool]:
    """(the job, whether the prefix or suffix was cut). The prompt is the FIM prompt /v1/completions builds
    for `suffix`, around input_prefix + prompt (llama.cpp puts the current line's text there) and
    input_suffix. As llama.cpp does, what does not fit beside n_predict is cut rather than refused: the
    prefix from its start and the suffix from its end, the suffix keeping at least a quarter of the room."""
    max_tokens = max_tokens_of(req, limits)
    check_context(req, len(fim_layout(tok, [], [])), max_tokens, context)
    prefix = prompt_ids(tok, req.input_prefix) + prompt_ids(tok, req.prompt)
    suffix = prompt_ids(tok, req.input_suffix)
    room = context - max_tokens - len(fim_layout(tok, [], []))
    cut = len(prefix) + len(suffix) > room
    if cut:
        suffix = suffix[:max(room // 4, room - len(prefix))]
        prefix = prefix[len(prefix) - (room - len(suffix)):]
    return _choices(req, [fim_layout(tok, prefix, suffix)], max_tokens), cut


def _choices(req, encoded: list[list[int]], max_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> JobSpec:
    prompts, params = [], []
    for ids in encoded:
        for _ in range(req.n or 1):
            seed = None if req.seed is None else req.seed + len(params)
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=max_tokens, stop=stop_list(req), seed=seed,
                                         stop_token_ids=stop_token_ids, **req.sampling()))
    return JobSpec(prompts, params, sum(len(ids) for ids in encoded))
