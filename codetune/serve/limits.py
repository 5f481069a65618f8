"""Every bound `codetune serve` puts on clients, with its default, and the flag that changes it.

One table (LIMIT_FLAGS) declares the flags, so the CLI's defaults, the values the server runs with and
the check that each one is positive cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from codetune.config import ConfigError

# Sent with every 503: short, because a full queue drains in seconds to minutes, and a client that
# honours it (the `openai` package does) should retry soon rather than give up.
RETRY_AFTER_S = 5


@dataclass
class Limits:
    max_tokens: int = 1024  # per choice
    max_choices: int = 16  # n x number of prompts
    max_pending: int = 1024  # queued requests
    queue_timeout: float = 60.0  # seconds a request may wait for the worker
    max_body_bytes: int = 1 << 20
    # Prompt + suffix bytes allowed per token of context left after max_tokens, checked before
    # tokenising. Code averages ~3.2 bytes per token in the GPT-NeoX vocabulary; 16 leaves room for
    # whitespace-heavy text, while a megabyte prompt is refused without spending memory on it.
    prompt_bytes_per_token: int = 16
    header_timeout: float = 10.0  # seconds from connecting (or the last response) to complete headers
    body_timeout: float = 30.0  # seconds to receive the whole body once the headers are in
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is kept
    max_connections: int = 512  # open connections; past it, new requests get 503
    max_header_bytes: int = 16 * 1024  # request line + headers buffered while incomplete (h11's default)
    max_stop: int = 4  # as in OpenAI's API
    max_stop_chars: int = 256
    default_max_tokens: int = 16  # OpenAI's default when max_tokens is absent


@dataclass(frozen=True)
class LimitFlag:
    field: str  # in Limits
    flag: str
    help: str


LIMIT_FLAGS = [
    LimitFlag("max_tokens", "--max-tokens-limit", "largest max_tokens a request may ask for"),
    LimitFlag("max_choices", "--max-choices", "largest n x prompts per request"),
    LimitFlag("max_pending", "--max-pending", "queued requests before answering 503 busy"),
    LimitFlag("queue_timeout", "--queue-timeout", "seconds a request may wait in the queue before a 503 "
                                                  "with Retry-After"),
    LimitFlag("max_body_bytes", "--max-body-bytes", "largest request body (413 past it)"),
    LimitFlag("prompt_bytes_per_token", "--prompt-bytes-per-token",
              "prompt + suffix may be at most this many bytes per token of context (the context length "
              "minus max_tokens); longer ones are refused before tokenising"),
    LimitFlag("header_timeout", "--header-timeout", "seconds a connection may take to send a request's "
                                                    "headers before it is closed"),
    LimitFlag("body_timeout", "--body-timeout", "seconds to send the request body once the headers are in "
                                                "(408 past it)"),
    LimitFlag("keep_alive_timeout", "--keep-alive-timeout", "seconds an idle keep-alive connection stays open"),
    LimitFlag("max_connections", "--max-connections", "open connections before new requests get 503 "
                                                      "(kept below the open-file limit)"),
    LimitFlag("max_header_bytes", "--max-header-bytes", "most bytes of an incomplete request line + headers "
                                                        "held before answering 400"),
]


def limit_cli_flags() -> list[tuple[tuple[str, ...], dict]]:
    """The flags in the form codetune.cli reads from a module's CLI_FLAGS, defaults from Limits."""
    default = Limits()
    flags = []
    for f in LIMIT_FLAGS:
        value = getattr(default, f.field)
        # shown in the help text itself, as codetune.config does for its sections: subcommand parsers
        # do not use argparse's defaults formatter
        flags.append(((f.flag,), dict(type=type(value), default=value, help=f"{f.help} (default: {value})")))
    return flags


def limits_from_args(ns: argparse.Namespace) -> Limits:
    """Limits from parsed flags; a bound that is not a positive finite number is a ConfigError naming its
    flag."""
    values = {}
    for f in LIMIT_FLAGS:
        value = getattr(ns, f.flag.lstrip("-").replace("-", "_"))
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{f.flag}={value}: must be a positive number")
        values[f.field] = value
    return dataclasses.replace(Limits(), **values)
