"""Stage 4: secrets and personal data are replaced by placeholders before anything is trained on.

detect-secrets' plugins (AWS, GitHub, Slack, Stripe, private keys, JWT, high-entropy strings, keyword
assignments, ...) find keys and passwords; regular expressions find e-mail and public IP addresses,
which detect-secrets does not look for. Running every plugin over every line is slow, so a cheap
pre-filter picks the lines that could hold a secret at all (an assignment to a secret-sounding name, a
long quoted token, a known key prefix) and only those go through detect-secrets.

Every value found anywhere in a file is then replaced everywhere in that file, so a key that appears
twice (once where a detector fires, once where it does not) never survives, and one value always maps
to one placeholder.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter

CANDIDATE = re.compile(
    r"""(?ix)
    (pass(word|wd)?|pwd|secret|token|api[_-]?key|auth|credential|private[_-]?key|access[_-]?key)[^\n]{0,40}[:=]
    | ["'][A-Za-z0-9+/=_\-.]{20,}["']
    | AKIA|ASIA|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abposr]-|sk_live|sk-|AIza|eyJ|-----BEGIN|://[^/\s:@]+:[^/\s@]+@
    """)
# The leading lookaheads (and no leading \b on EMAIL) let the regex engine skip impossible start
# positions quickly: 2-3x faster on code, same matches.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?=\d)(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6 = re.compile(r"(?=[0-9a-fA-F]{1,4}:)(?<![\w:])(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{1,4}(?![\w:])")

# Literal hints searched with str.find (much faster than one big case-insensitive regex over all text);
# lines holding one are then checked against CANDIDATE.
HINTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "akia", "asia", "ghp_", "gho_", "ghs_",
         "github_pat_", "glpat-", "xox", "sk_live", "sk-", "aiza", "eyj", "-----begin", "://")
QUOTED_TOKEN = re.compile(r"[\"'][A-Za-z0-9+/=_\-.]{20,}[\"']")
PEM_BLOCK = re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY[A-Z ]*-----.*?-----END[A-Z ]*PRIVATE KEY[A-Z ]*-----", re.S)

PASSWORD_TYPES = {"Secret Keyword", "Basic Auth Credentials"}


def placeholder(secret_type: str) -> str:
    return "<PASSWORD>" if secret_type in PASSWORD_TYPES else "<KEY>"


@functools.cache
def _plugins() -> list:
    """One instance of every detect-secrets plugin, built once per process."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return [cls() for _, cls in sorted(get_mapping_from_secret_type_to_class().items())]


def _plausible(value: str, line: str, plugin) -> bool:
    """detect-secrets' own false-positive heuristics (sequences, UUIDs, templates, `$VAR`, ids), plus its
    Shannon-entropy limit for the high-entropy plugins (which `analyze_string` leaves to the caller)."""
    from detect_secrets.filters import heuristic as h

    if len(value) < 4 or h.is_sequential_string(value) or h.is_potential_uuid(value):
        return False
    if h.is_templated_secret(value) or h.is_prefixed_with_dollar_sign(value) or h.is_not_alphanumeric_string(value):
        return False
    if h.is_likely_id_string(value, line, plugin):
        return False
    limit = getattr(plugin, "entropy_limit", None)
    return limit is None or plugin.calculate_shannon_entropy(value) > limit


def _detect_secrets(lines: list[str]) -> list[tuple[str, str]]:
    """(value, placeholder) for every detect-secrets finding in these candidate lines. Plugins are called
    through `analyze_string`, which never verifies against a live service (no network)."""
    found = []
    for line in lines:
        for plugin in _plugins():
            for value in plugin.analyze_string(line):
                if value and _plausible(value, line, plugin):
                    found.append((value, placeholder(plugin.secret_type)))
    return found


def _public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _looks_like_version(text: str, start: int) -> bool:
    """'1.2.3.4' after the word version is a version number (bigcode's PII pipeline skips these too)."""
    return "version" in text[max(0, start - 30):start].lower()


def find_pii(text: str) -> list[tuple[str, str]]:
    """(value, placeholder) pairs; private, loopback and documentation addresses are kept (they are
    not personal and code is full of 127.0.0.1)."""
    out = [(m.group(), "<KEY>") for m in PEM_BLOCK.finditer(text)]
    if "@" in text:  # most files have none: skip the scan
        out += [(m.group(), "<EMAIL>") for m in EMAIL.finditer(text)]
    for rx in (IPV4, IPV6):
        out += [(m.group(), "<IP_ADDRESS>") for m in rx.finditer(text)
                if _public_ip(m.group()) and not _looks_like_version(text, m.start())]
    return out


def candidate_lines(text: str) -> list[str]:
    """Lines that may hold a secret: a hint word or a long quoted token, confirmed by CANDIDATE."""
    lower = text.lower()
    starts = set()
    for hint in HINTS:
        i = lower.find(hint)
        while i >= 0:
            starts.add(lower.rfind("\n", 0, i) + 1)
            nl = lower.find("\n", i)  # one hit per line is enough: skip to the next line
            i = -1 if nl < 0 else lower.find(hint, nl)
    starts.update(lower.rfind("\n", 0, m.start()) + 1 for m in QUOTED_TOKEN.finditer(text))
    lines = []
    for s in sorted(starts):
        end = text.find("\n", s)
        line = text[s:] if end < 0 else text[s:end]
        if CANDIDATE.search(line):
            lines.append(line)
    return lines


def redact(text: str) -> tuple[str, Counter]:
    """The text with every secret and PII value replaced, and how many values of each kind went."""
    found: dict[str, str] = {}
    candidates = candidate_lines(text)
    for value, ph in (_detect_secrets(candidates) if candidates else []) + find_pii(text):
        found.setdefault(value, ph)  # the first kind seen names a value for the whole file
    counts: Counter = Counter()
    # Longest first, so a value that contains another is replaced whole.
    for value in sorted(found, key=len, reverse=True):
        n = text.count(value)
        if n:
            text = text.replace(value, found[value])
            counts[found[value]] += 1
    return text, counts
