"""Prompt/response data: the row shapes `prepare` reads, and the one rendering of a conversation into
token pieces that both training and inference use.

Shapes (detected from a source's columns, or named by --data-format):

    messages            {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    prompt-completion   {"prompt": "...", "completion": "..."}          -> user, assistant
    instruction         {"instruction": "...", "input": "...", "output": "..."}
                        -> user = instruction (+ blank line + input when given), assistant = output

Rendering is a list of `Piece`s: template text (the chat markup, encoded with special tokens
recognised, so "<|im_start|>" is one control id) and message content (encoded with special-token
strings as plain text, as code is: a user's text can never forge a control token). Loss goes on the
assistant contents and on the token that ends each assistant turn, nothing else.

With the tokenizer's own chat template (`--chat-template auto` and a tokenizer that has one), the
template is rendered with each content replaced by a sentinel and cut at the sentinels; the end of an
assistant turn is the first special token the template writes after it (ChatML's <|im_end|>), or EOS
added after the last turn when the template writes none. Without a template it is PLAIN, below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from codetune.config import ConfigError

FORMATS = ("auto", "code", "messages", "prompt-completion", "instruction")
REQUIRED = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
            "instruction": ("instruction", "output")}
OPTIONAL = {"instruction": ("input",)}
ROLES = ("system", "user", "assistant")
TEMPLATES = ("auto", "plain")
SHAPES_TEXT = ("code (a text column, --content-column), messages (OpenAI chat: role/content lists), "
               "prompt+completion, or instruction+output (+input)")
_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no real text holds them


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Piece:
    text: str
    template: bool  # chat markup (special tokens recognised) rather than message content
    target: bool  # its tokens carry loss


@dataclass(frozen=True)
class Template:
    """How a conversation is rendered: the tokenizer's Jinja template, or None for PLAIN."""
    jinja: str | None
    bos: str | None
    eos: str
    specials: tuple[str, ...]  # special-token strings: where an assistant turn's end-of-turn is found


def template_of(tok, choice: str = "auto") -> Template:
    """The rendering `choice` gives for this tokenizer (what prepare records and generate should use)."""
    jinja = getattr(tok, "chat_template", None) if choice == "auto" else None
    if isinstance(jinja, dict):  # several named templates: the default one
        jinja = jinja.get("default")
    specials = tuple(sorted({str(t) for t in tok.all_special_tokens} | {tok.eos_token}, key=lambda s: (-len(s), s)))
    return Template(jinja or None, tok.bos_token, tok.eos_token, specials)


# ---------------------------------------------------------------------------------------------
# Row shapes


def detect(src: str, names: list[str], requested: str, content_column: str) -> tuple[str, tuple[str, ...]]:
    """(shape, the columns holding its body) of a tabular source with these columns."""
    if requested == "code":
        return "code", (content_column,)
    candidates = [requested] if requested != "auto" else list(REQUIRED)
    for fmt in candidates:
        if all(c in names for c in REQUIRED[fmt]):
            return fmt, REQUIRED[fmt] + tuple(c for c in OPTIONAL.get(fmt, ()) if c in names)
    if requested != "auto":
        missing = next(c for c in REQUIRED[requested] if c not in names)
        raise ConfigError(f"source {src!r} has no column {missing!r} for --data-format {requested} (columns: "
                          f"{', '.join(names)}); rename the column, or pass --data-format auto")
    if content_column in names:
        return "code", (content_column,)
    raise ConfigError(f"source {src!r} has no column {content_column!r} and matches no chat shape (columns: "
                      f"{', '.join(names)}); accepted: {SHAPES_TEXT}; rename the columns, set --content-column, "
                      "or name the shape with --data-format")


def to_messages(row: dict, fmt: str) -> tuple[Message, ...] | str:
    """A row as a conversation, or the reason it cannot be one (counted as a drop)."""
    if fmt == "messages":
        raw = row.get("messages")
        if not isinstance(raw, (list, tuple)) or not raw:
            return "bad_messages"
        msgs = []
        for m in raw:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return "bad_messages"
            msgs.append(Message(m["role"], m["content"]))
    elif fmt == "prompt-completion":
        p, c = row.get("prompt"), row.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            return "bad_messages"
        msgs = [Message("user", p), Message("assistant", c)]
    else:
        ins, inp, out = row.get("instruction"), row.get("input"), row.get("output")
        if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, (str, type(None))):
            return "bad_messages"
        msgs = [Message("user", ins + (f"\n\n{inp}" if inp else "")), Message("assistant", out)]
    if not any(m.role == "assistant" and m.content.strip() for m in msgs):
        return "no_response"
    return tuple(msgs)


def canonical_text(msgs) -> str:
    """The conversation as plain text, for dedup and decontamination (not what the model sees)."""
    return "\n\n".join(f"{m.role}:\n{m.content}" for m in msgs)


# ---------------------------------------------------------------------------------------------
# Rendering


def plain(msgs, eos: str, add_generation_prompt: bool = False) -> list[Piece]:
    """PLAIN, the template for tokenizers without one:

        ### System:\\n{content}\\n\\n        (only where the conversation has one)
        ### User:\\n{content}\\n\\n
        ### Assistant:\\n{content}<eos>

    EOS (the tokenizer's end-of-text token) ends each assistant turn, so generation stops there."""
    out = []
    for m in msgs:
        out.append(Piece(f"### {m.role.capitalize()}:\n", True, False))
        out.append(Piece(m.content, False, m.role == "assistant"))
        out.append(Piece(eos, True, True) if m.role == "assistant" else Piece("\n\n", True, False))
    if add_generation_prompt:
        out.append(Piece("### Assistant:\n", True, False))
    return out


def render(msgs, t: Template, add_generation_prompt: bool = False) -> list[Piece]:
    """The pieces of a conversation under template `t`; ValueError when the template does not write
    every content once, in order (then the loss mask could not be placed)."""
    if t.jinja is None:
        return plain(msgs, t.eos, add_generation_prompt)
    from transformers.utils.chat_template_utils import render_jinja_template

    conv = [{"role": m.role, "content": f"\ue000{i}\ue001"} for i, m in enumerate(msgs)]
    text = render_jinja_template([conv], chat_template=t.jinja, add_generation_prompt=add_generation_prompt,
                                 bos_token=t.bos, eos_token=t.eos)[0][0]
    parts = _SENTINEL.split(text)  # template, index, template, index, ..., template
    if [int(i) for i in parts[1::2]] != list(range(len(msgs))):
        raise ValueError("the chat template does not write each message's content once, in order")
    out = [Piece(parts[0], True, False)]
    for k, m in enumerate(msgs):
        after = parts[2 * k + 2]
        out.append(Piece(m.content, False, m.role == "assistant"))
        if m.role != "assistant":
            out.append(Piece(after, True, False))
            continue
        span = _end_of_turn(after, t.specials)
        if span is None and k == len(msgs) - 1 and not add_generation_prompt:
            out += [Piece(after, True, False), Piece(t.eos, True, True)]
        else:
            end = span[1] if span else 0
            out += [Piece(after[:end], True, True), Piece(after[end:], True, False)]
    return [p for p in out if p.text]


def _end_of_turn(text: str, specials: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the first special token in `text` (the assistant's end-of-turn), or None."""
    hits = [(i, i + len(s)) for s in specials if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def end_of_turn(t: Template) -> str:
    """The special token that ends an assistant turn under `t`: the one `render` puts loss on after each
    answer (ChatML's <|im_end|>, the plain template's EOS), so where generating an answer must stop."""
    probe = (Message("user", "u"), Message("assistant", "a"))
    marked = next(p.text for p in render(probe, t) if p.template and p.target)
    start, end = _end_of_turn(marked, t.specials)  # (the marked piece ends with that very token)
    return marked[start:end]


def check_template(t: Template) -> None:
    """The tokenizer's template must render a probe conversation cleanly: checked before any work."""
    probe = (Message("system", "s"), Message("user", "u"), Message("assistant", "a"), Message("user", "v"),
             Message("assistant", "b"))
    try:
        try:
            render(probe, t)
        except Exception:  # noqa: BLE001 - some templates refuse a system turn; try without one
            render(probe[1:], t)
    except Exception as e:  # noqa: BLE001 - any failure of someone's Jinja is a configuration problem
        raise ConfigError(f"the tokenizer's chat template cannot be used for training ({type(e).__name__}: {e}); "
                          "pass --chat-template plain to use codetune's plain template") from None


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray
    target: np.ndarray  # bool per token: the token is predicted with loss


def encode(pieces: list[Piece], enc) -> Encoded:
    """Ids and per-token targets of rendered pieces; `enc` is a tokenize.PieceEncoder."""
    content = iter(enc.texts([p.text for p in pieces if not p.template]))
    markup = iter(enc.template_texts([p.text for p in pieces if p.template]))
    ids = [next(markup) if p.template else next(content) for p in pieces]
    target = [np.full(len(i), p.target, dtype=bool) for i, p in zip(ids, pieces)]
    if not ids:
        return Encoded(np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=bool))
    return Encoded(np.concatenate(ids).astype(np.uint32), np.concatenate(target))


def prompt_ids(tok, msgs, choice: str = "auto") -> np.ndarray:
    """Token ids of a conversation ending in a generation prompt, rendered and encoded exactly as
    `prepare` renders training conversations: what generate / serve should feed the model for chat."""
    from codetune.data.tokenize import PieceEncoder

    t = template_of(tok, choice)
    enc = PieceEncoder(tok.backend_tokenizer.to_str(), {})
    msgs = tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in msgs)  # (OpenAI dicts too)
    return encode(render(msgs, t, add_generation_prompt=True), enc).ids
