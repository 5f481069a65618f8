"""Stage 4: secrets and personal data are replaced by placeholders before anything is trained on.

detect-secrets' plugins (AWS, GitHub, Slack, Stripe, private keys, JWT, high-entropy strings, keyword
assignments, ...) find keys and passwords; regular expressions find e-mail and public IP addresses,
which detect-secrets does not look for. Running every plugin over every line is slow, so a cheap
pre-filter picks the lines that could hold a secret at all (an assignment to a secret-sounding name, a
long quoted token, a known key prefix) and only those go through detect-secrets.

Everything past that definition is speed only, each step a necessary condition or an exact rewrite, so
the output is what the plain algorithm gives (tests/data/test_redact.py compares them): candidate lines
are found with numpy on ASCII text; each plugin runs only on lines holding what its patterns need (a
quote, a keyword, a literal read from the pattern); entropy is not computed for values with too few
distinct characters to pass; the e-mail regex runs from each "@" and the address regexes only on lines
holding a piece every address has. About 4x faster than running the regexes directly.

Every value found anywhere in a file is then replaced everywhere in that file, so a key that appears
twice (once where a detector fires, once where it does not) never survives, and one value always maps
to one placeholder.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter

import numpy as np

CANDIDATE = re.compile(
    r"""(?ix)
    (pass(word|wd)?|pwd|secret|token|api[_-]?key|auth|credential|private[_-]?key|access[_-]?key)[^\n]{0,40}[:=]
    | ["'][A-Za-z0-9+/=_\-.]{20,}["']
    | AKIA|ASIA|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abposr]-|sk_live|sk-|AIza|eyJ|-----BEGIN|://[^/\s:@]+:[^/\s@]+@
    """)
# CANDIDATE's branches for lowercased ASCII lines (is_candidate); QUOTED_TOKEN below is the middle one.
CANDIDATE_KEYWORD = re.compile(
    r"(pass(word|wd)?|pwd|secret|token|api[_-]?key|auth|credential|private[_-]?key|access[_-]?key)[^\n]{0,40}[:=]")
CANDIDATE_LITERAL = re.compile(
    r"akia|asia|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abposr]-|sk_live|sk-|aiza|eyj|-----begin|://[^/\s:@]+:[^/\s@]+@")
# The leading lookaheads (and no leading \b on EMAIL) let the regex engine skip impossible start
# positions quickly: 2-3x faster on code, same matches.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?=\d)(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6 = re.compile(r"(?=[0-9a-fA-F]{1,4}:)(?<![\w:])(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{1,4}(?![\w:])")
EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")  # EMAIL's local part
# Substrings every IPV4 / IPV6 match contains ("1.2.3.4" holds ".2.3.4"; "a:b:c" holds ":b:").
IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
IPV6_HINT = re.compile(r":[0-9a-fA-F]{1,4}:")

# Literal hints searched with str.find (much faster than one big case-insensitive regex over all text);
# lines holding one are then checked against CANDIDATE.
HINTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "akia", "asia", "ghp_", "gho_", "ghs_",
         "github_pat_", "glpat-", "xox", "sk_live", "sk-", "aiza", "eyj", "-----begin", "://")
QUOTED_TOKEN = re.compile(r"[\"'][A-Za-z0-9+/=_\-.]{20,}[\"']")
# For _starts_ascii: one 3-letter piece of each hint, the rarest in code (counted on Python sources),
# as a lookup table over all 2^24 trigrams (16 MB, built once per process); QUOTED_TOKEN's class as a
# translate table; the quote bytes.
HINT_TRIGRAMS = ("pas", "pwd", "ecr", "tok", "key", "uth", "tia", "kia", "sia", "hp_", "ho_", "ghs", "b_p", "glp",
                 "xox", "k_l", "sk-", "aiz", "eyj", "-be", "://")
assert all(t in h for t, h in zip(HINT_TRIGRAMS, HINTS, strict=True))
_TRIGRAMS = np.zeros(1 << 24, dtype=bool)
_TRIGRAMS[[int.from_bytes(t.encode(), "big") for t in HINT_TRIGRAMS]] = True
_QUOTED_CLASS = bytes(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-." for c in range(256))
_IS_QUOTE = np.zeros(256, dtype=bool)
_IS_QUOTE[[ord("'"), ord('"')]] = True
PEM_BLOCK = re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY[A-Z ]*-----.*?-----END[A-Z ]*PRIVATE KEY[A-Z ]*-----", re.S)

PASSWORD_TYPES = {"Secret Keyword", "Basic Auth Credentials"}


def placeholder(secret_type: str) -> str:
    return "<PASSWORD>" if secret_type in PASSWORD_TYPES else "<KEY>"


# Gates: what a line must hold for a plugin to find anything in it, checked before running it. Each is
# a necessary condition derived from the plugin's own patterns, so results are the same (tests compare).
ALWAYS, QUOTE, KEYWORD = range(3)
QUOTES = ("'", '"', "`")
KEYWORD_PIECES = ("key", "pass", "pwd", "secret", "contrase")  # one is in each of keyword.DENYLIST


@functools.cache
def _plugins() -> tuple[list[tuple[object, int, list | None]], re.Pattern]:
    """One instance of every detect-secrets plugin, built once per process, each with its gate:
    KEYWORD (every keyword pattern needs a quote and one of its DENYLIST words), QUOTE (the high-entropy
    patterns match quoted strings), ALWAYS for the rest. Plain regex plugins (detect-secrets'
    RegexBasedDetector.analyze_string, not overridden) come with their patterns, each with a literal
    every match contains, if any: `_regex_values` runs them without a generator per call and skips a
    pattern whose literal is not in the line. (One alternation of all their patterns, as a gate,
    measured slower than running them.)"""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins import keyword
    from detect_secrets.plugins.base import RegexBasedDetector
    from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin

    plugins = []
    for _, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        plugin, gate, regexes = cls(), ALWAYS, None
        analyze = type(plugin).analyze_string
        if analyze is keyword.KeywordDetector.analyze_string and not plugin.keyword_exclude:
            gate = KEYWORD
        elif analyze is HighEntropyStringsPlugin.analyze_string:
            gate = QUOTE
        elif analyze is RegexBasedDetector.analyze_string:
            regexes = [(rx, *_required_literal(rx)) for rx in plugin.denylist]
        plugins.append((plugin, gate, regexes))
    words = re.compile("|".join(keyword.DENYLIST), re.IGNORECASE)  # matches wherever its patterns' words do
    assert all(any(p in w for p in KEYWORD_PIECES) for w in keyword.DENYLIST)
    return plugins, words


def _required_literal(rx: re.Pattern) -> tuple[str, bool]:
    """(text every match of `rx` contains, whether it is matched ignoring case); ("", False) if none
    found. Read from the regex parser's tree: the longest run of consecutive literal characters in the
    top-level sequence, looking inside plain groups (which are mandatory there). The engine itself
    then finds matches as before; this only skips lines that cannot have any."""
    try:
        try:
            from re import _parser as sre
        except ImportError:  # Python 3.10
            import sre_parse as sre
        best, run, items = "", [], list(sre.parse(rx.pattern, rx.flags))
        while items:
            op, av = items.pop(0)
            if op is sre.SUBPATTERN and not av[1] and not av[2]:  # a group that adds no flags
                items = list(av[-1]) + items
                continue
            if op is sre.LITERAL:
                run.append(chr(av))
                continue
            best, run = max(best, "".join(run), key=len), []
        best = max(best, "".join(run), key=len)
        ignore_case = bool(rx.flags & re.IGNORECASE)
        return (best.lower(), True) if ignore_case and best.isascii() else (best, False) if not ignore_case \
            else ("", False)
    except Exception:  # noqa: BLE001 - a private API: without it there is simply no shortcut
        return "", False


def _regex_values(regexes: list, line: str, low: str | None) -> list[str]:
    """What RegexBasedDetector.analyze_string yields for this line (`low`: the line lowercased if it
    is ASCII, where lowercasing is exact, else None)."""
    out = []
    for rx, literal, ignore_case in regexes:
        if literal and (literal not in line if not ignore_case else low is not None and literal not in low):
            continue
        for m in rx.findall(line):
            if isinstance(m, tuple):
                out.extend(filter(bool, m))
            else:
                out.append(m)
    return out


def _plausible(value: str, line: str, plugin) -> bool:
    """`_heuristics_pass`, after a shortcut: entropy cannot exceed log2 of the number of distinct
    characters, so a value with too few of them fails the limit without computing anything (most
    quoted strings do)."""
    limit = getattr(plugin, "entropy_limit", None)
    if limit is not None and len(set(value)) <= 2 ** limit:
        return False
    return _heuristics_pass(value, line, plugin)


def _heuristics_pass(value: str, line: str, plugin) -> bool:
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
    plugins, words = _plugins()
    found = []
    for line in lines:
        quote = any(q in line for q in QUOTES)
        low = line.lower() if line.isascii() else None
        # the keyword words all contain one of KEYWORD_PIECES: on an ASCII line that substring test
        # is exact and 10x cheaper than the case-insensitive regex
        keyword = quote and (any(w in low for w in KEYWORD_PIECES) if low is not None else words.search(line))
        for plugin, gate, regexes in plugins:
            if gate == QUOTE and not quote or gate == KEYWORD and not keyword:
                continue
            for value in plugin.analyze_string(line) if regexes is None else _regex_values(regexes, line, low):
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
    out += [(e, "<EMAIL>") for e in emails(text)]
    for rx, hint in ((IPV4, IPV4_HINT), (IPV6, IPV6_HINT)):
        out += [(m.group(), "<IP_ADDRESS>") for m in _address_matches(text, rx, hint)
                if _public_ip(m.group()) and not _looks_like_version(text, m.start())]
    return out


def _address_matches(text: str, rx: re.Pattern, hint: re.Pattern) -> list[re.Match]:
    """What `rx.finditer(text)` finds, ~25x faster. The address regexes can start at almost any
    character, so the engine tries them everywhere; instead they run only on the lines holding what
    every match contains (`hint`, which starts with a literal the engine scans for quickly). A match
    never spans a newline, and at a line's ends their look-arounds see a newline or the string's end,
    which they treat alike, so line by line gives the same matches at the same positions."""
    out, line_end = [], -1
    for h in hint.finditer(text):
        if h.start() < line_end:
            continue  # this line is done
        start = text.rfind("\n", 0, h.start()) + 1
        line_end = text.find("\n", h.start())
        line_end = len(text) if line_end < 0 else line_end
        out += rx.finditer(text, start, line_end)
    return out


def emails(text: str) -> list[str]:
    """What `EMAIL.finditer(text)` finds, without running the regex from every position (it retries
    the local part at each letter: quadratic in word length). A match's local part is the run of
    local-part characters just before an "@" (an "@" is not one of them, so the run cannot reach past
    the previous "@"); if the regex does not match from the start of that run, it matches from no
    later start either (same "@", same domain)."""
    out, end = [], 0
    at = text.find("@")
    while at >= 0:
        start = at
        while start > end and text[start - 1] in EMAIL_LOCAL:
            start -= 1
        if start < at and (m := EMAIL.match(text, start)):
            out.append(m.group())
            end = m.end()
        at = text.find("@", max(at + 1, end))
    return out


def candidate_lines(text: str) -> list[str]:
    """Lines that may hold a secret: a hint word or a long quoted token, confirmed by CANDIDATE."""
    lower = text.lower()
    if text.isascii():
        starts, quoted = _starts_ascii(text.encode("ascii"), lower.encode("ascii"))
    else:
        starts, quoted = _starts(text, lower)
    lines = []
    for s in sorted(starts | quoted):
        end = text.find("\n", s)
        line = text[s:] if end < 0 else text[s:end]
        if s in quoted or is_candidate(line):  # a quoted token in the line is one of CANDIDATE's branches
            lines.append(line)
    return lines


def _starts(text: str, lower: str) -> tuple[set[int], set[int]]:
    """Start offsets of the lines holding a hint (of `lower`) and of those holding a QUOTED_TOKEN."""
    starts = set()
    for hint in HINTS:
        i = lower.find(hint)
        while i >= 0:
            starts.add(lower.rfind("\n", 0, i) + 1)
            nl = lower.find("\n", i)  # one hit per line is enough: skip to the next line
            i = -1 if nl < 0 else lower.find(hint, nl)
    quoted = {lower.rfind("\n", 0, m.start()) + 1 for m in QUOTED_TOKEN.finditer(text)}
    if len(lower) != len(text):  # lowercasing changed lengths ("İ"): positions do not line up, check all
        starts |= quoted
        quoted = set()
    return starts, quoted


def _starts_ascii(raw: bytes, low: bytes) -> tuple[set[int], set[int]]:
    """A superset of `_starts` for ASCII text, with numpy (3x faster): lines holding one 3-letter
    piece of each hint (HINT_TRIGRAMS) and lines holding a QUOTED_TOKEN match, found as a maximal run of
    its class, 20 or longer, with a quote on each side (finditer skips a run whose opening quote closed
    the previous one, but that run is on the same line). A superset is enough: on an ASCII line,
    lowercasing is exact, so any line CANDIDATE matches holds a hint or a quoted token, and the extra
    lines fail `is_candidate` as they would have. Byte and character positions agree in ASCII."""
    b = np.frombuffer(low, dtype=np.uint8)
    hits = np.zeros(0, dtype=np.int64)
    if len(b) >= 3:
        code = b[:-2].astype(np.uint32) << 16
        code |= b[1:-1].astype(np.uint32) << 8
        code |= b[2:]
        hits = np.flatnonzero(_TRIGRAMS[code])
    edges = np.flatnonzero(np.diff(np.frombuffer(raw.translate(_QUOTED_CLASS), dtype=bool), prepend=False,
                                   append=False))
    first, after = edges[::2], edges[1::2]
    ok = (after - first >= 20) & (first > 0) & (after < len(raw))
    first, after = first[ok], after[ok]
    q = np.frombuffer(raw, dtype=np.uint8)
    opening = first[_IS_QUOTE[q[first - 1]] & _IS_QUOTE[q[after]]] - 1
    newlines = np.flatnonzero(b == 10)

    def line_starts(pos: np.ndarray) -> set[int]:
        if len(pos) == 0 or len(newlines) == 0:
            return {0} if len(pos) else set()
        i = np.searchsorted(newlines, pos)  # newlines before each position
        return set(np.where(i > 0, newlines[np.maximum(i - 1, 0)] + 1, 0).tolist())

    return line_starts(hits), line_starts(opening)


def is_candidate(line: str) -> bool:
    """CANDIDATE.search(line), 4x faster: on an ASCII line, lowercasing and matching its branches
    case-sensitively is the same as its case-insensitive match (which the regex engine cannot scan
    for quickly); other lines use CANDIDATE itself (Unicode case folding has surprises: "K" is K)."""
    if not line.isascii():
        return CANDIDATE.search(line) is not None
    low = line.lower()
    return bool(CANDIDATE_KEYWORD.search(low) or QUOTED_TOKEN.search(line) or CANDIDATE_LITERAL.search(low))


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
