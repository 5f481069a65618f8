"""How choices are written in each API's JSON: the completions API's `text`, the chat API's `message`
(whole) and `delta` (streamed, opened by the role, closed by an empty delta with the finish reason), and
llama.cpp's /infill result (`content`, `timings`, ...)."""

from __future__ import annotations


class TextShape:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, i: int, c) -> dict:
        return {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}

    def opening(self, i: int) -> dict | None:
        return None

    def piece(self, i: int, text: str) -> dict:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": None}

    def end(self, i: int, finish: str) -> dict:
        return {"text": "", "index": i, "logprobs": None, "finish_reason": finish}


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, i: int, c) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason}

    def opening(self, i: int) -> dict | None:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, i: int, text: str) -> dict:
        return {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def end(self, i: int, finish: str) -> dict:
        return {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}


def infill_result(c, index: int, model: str, truncated: bool) -> dict:
    """One completion as llama.cpp's /infill (and /completion) answers it, without streaming. Its prompt
    cache does not exist here: tokens_cached is 0."""
    stop_type = {"length": "limit", "cancelled": "none"}.get(c.finish_reason, "word" if c.stop_word else "eos")
    prompt_ms, predicted_ms = c.prefill_s * 1000, c.decode_s * 1000
    return {"index": index, "content": c.text, "id_slot": 0, "stop": True, "model": model,
            "tokens_predicted": c.completion_tokens, "tokens_evaluated": c.prompt_tokens, "tokens_cached": 0,
            "truncated": truncated, "stop_type": stop_type, "stopping_word": c.stop_word,
            "has_new_line": "\n" in c.text,
            "timings": {"prompt_n": c.prompt_tokens, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / max(c.prompt_tokens, 1),
                        "prompt_per_second": c.prompt_tokens / max(c.prefill_s, 1e-9),
                        "predicted_n": c.completion_tokens, "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / max(c.completion_tokens, 1),
                        "predicted_per_second": c.completion_tokens / max(c.decode_s, 1e-9)}}


def only_fields(result: dict, paths: list[str] | None) -> dict:
    """llama.cpp's response_fields: just the named fields, a/b naming b inside a, each keyed by its path as
    given ("timings/prompt_n"); a path that names nothing is left out."""
    if paths is None:
        return result
    picked = {}
    for path in paths:
        value, found = result, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            picked[path] = value
    return picked
