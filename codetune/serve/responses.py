"""How choices are written in each API's JSON: the completions API's `text`, the chat API's `message`
(whole) and `delta` (streamed, opened by the role, closed by an empty delta with the finish reason)."""

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
