"""Stage 4: planted secrets and personal data are replaced, consistently within a file."""

from codetune.data.redact import redact

AWS = "AKIAIOSFODNN7EXAMPLE"
GH = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
PLANTED = f'''import boto3

AWS_ACCESS_KEY_ID = "{AWS}"
db_password = "correct-horse-battery-staple"
GITHUB_TOKEN = "{GH}"
# maintainer: Jane Doe <jane.doe@example.com>, server at 203.0.113.77 and 8.8.4.4
LOCAL = "127.0.0.1"
copy_of_key = "{AWS}"  # the same value again, on a line no detector flags
-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAx4UbaDzY8XHqN6GJ0fdqDhrY6ZCxzw0k
-----END RSA PRIVATE KEY-----
'''


def test_planted_secrets_are_redacted():
    out, counts = redact(PLANTED)
    for secret in (AWS, GH, "correct-horse-battery-staple", "jane.doe@example.com", "8.8.4.4", "MIIEowIBAAKCAQEA"):
        assert secret not in out, secret
    assert 'AWS_ACCESS_KEY_ID = "<KEY>"' in out and 'copy_of_key = "<KEY>"' in out
    assert 'db_password = "<PASSWORD>"' in out
    assert "<EMAIL>" in out and "<IP_ADDRESS>" in out
    assert "127.0.0.1" in out  # loopback is not personal data
    assert counts["<EMAIL>"] == 1 and counts["<KEY>"] >= 3


def test_ordinary_code_is_untouched():
    code = "def tokenize(text, key=None):\n    return sorted(text.split(), key=key)\n\nversion = '1.2.3.4'\n"
    assert redact(code)[0] == code


# ---------------------------------------------------------------------------------------------
# The fast paths (gates per plugin, entropy bound, numpy line finding, anchored e-mail search,
# address prefilters) against the plain algorithm they replace, on real code plus planted values.

def _reference(text: str):
    """The unoptimised algorithm: every hint found with str.find, every candidate line confirmed by
    CANDIDATE, every plugin on every candidate line, every PII regex over the whole text."""
    from codetune.data import redact as R

    lower, starts = text.lower(), set()
    for hint in R.HINTS:
        i = lower.find(hint)
        while i >= 0:
            starts.add(lower.rfind("\n", 0, i) + 1)
            i = lower.find(hint, i + 1)
    starts.update(lower.rfind("\n", 0, m.start()) + 1 for m in R.QUOTED_TOKEN.finditer(text))
    lines = [ln for s in sorted(starts) if R.CANDIDATE.search(ln := text[s:].split("\n", 1)[0])]
    values = []
    for line in lines:
        for plugin, *_ in R._plugins()[0]:
            for v in plugin.analyze_string(line):
                if v and R._heuristics_pass(v, line, plugin):  # (no distinct-character shortcut)
                    values.append((v, R.placeholder(plugin.secret_type)))
    values += [(m.group(), "<KEY>") for m in R.PEM_BLOCK.finditer(text)]
    values += [(m.group(), "<EMAIL>") for m in R.EMAIL.finditer(text)]
    for rx in (R.IPV4, R.IPV6):
        values += [(m.group(), "<IP_ADDRESS>") for m in rx.finditer(text)
                   if R._public_ip(m.group()) and not R._looks_like_version(text, m.start())]
    found = {}
    for v, ph in values:
        found.setdefault(v, ph)
    counts = {}
    for v in sorted(found, key=len, reverse=True):
        if v in text:
            text = text.replace(v, found[v])
            counts[found[v]] = counts.get(found[v], 0) + 1
    return text, counts, lines


PLANTS = [
    'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', f'token: "{GH}"', "x = 'xoxb-1234-5678-abcdefgh'",
    'STRIPE = "sk_live_' + "4eC39HqLyjWDarjtT1zdp7dc" + '"', "jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl'",
    "url = 'https://admin:hunter2pass@db.example.com/x'", 'PASSWORD="s3cr3t-Pa55w0rd!"', "passwd := 'abc'",
    "blob = 'QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY0NTY3ODk='", "hexkey = 'deadbeefcafebabe0123456789abcdef'",
    "mail me: a.b+c@sub.example.co.uk, not x@y, a@b@c.org, @decorator, user@host.localdomain",
    "ip 8.8.8.8 and 10.0.0.1, version 1.2.3.4, 2001:4860:4860::8888 and fe80::1 and 2606:4700:4700:0:0:0:0:1111",
    "api-key = \"AIzaSyA-1234567890abcdefghijklmnopqrstu\"  # also glpat-abcdefghijklmnopqrstuv",
    "Ⅻ café SECRET = 'ünïcödé-välüe-1234567890' K İstanbul ſecret=\"abcdefghijklmnopqrstuvwxyz\"",
    "'aaaaaaaaaaaaaaaaaaaaaaaa''bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb' \"cccccccccccccccccccccccc\"",
    # one for each detect-secrets pattern that gets a literal gate
    "conn = 'DefaultEndpointsProtocol=https;AccountKey=" + "Ab3+" * 22 + "'",
    "SENDGRID = 'SG." + "a1B2c3D4e5F6g7H8i9J0kL" + "." + "x" * 20 + "Y9z8W7v6U5t4S3r2Q1p0o9n8m" + "'",
    "square = 'sq0csp-" + "aB1-cD2_eF3" * 4 + "xyz'", "pypi = 'pypi-AgEIcHlwaS5vcmc" + "Zx9-_Qw8" * 9 + "'",
    "sid = 'AC" + "0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d" + "' and key 'SK" + "9f8e7d6c5b4a39281706f5e4d3c2b1a0" + "'",
    "bot = '1234567890:AAH" + "xY9zW8vU7tS6rQ5pO4nM3lK2jI1hG0f" + "'",
    "mc = 'a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6-us12'",
    "discord = 'MTA" + "xNzQ5ODc2NTQzMjEwOTg3" + ".GhIjKl." + "AbCdEfGhIjKlMnOpQrStUvWxYz1" + "'",
    "//registry.npmjs.org/:_authToken=npm_" + "A1b2C3d4E5" * 4,
    "OPENAI = 'sk-" + "ab12CD34ef56GH78ij90" + "T3BlbkFJ" + "kl12MN34op56QR78st90" + "'",
    "artifactory = AKC" + "p9Xk2LmN8qRtZ4" + " and AP6" + "xYz123456789" + " ",
    'cloudant_password = "' + "x9y8z7w6v5u4t3s2r1q0" + '"', 'ibm_cos_hmac_secret_access_key = "' + "f" * 48 + '"',
    "softlayer_api_key = '" + "0123456789abcdef" * 4 + "'", "SLACK = 'https://hooks.slack.com/services/T0/B1/xyz'",
]


def test_fast_paths_agree_with_the_plain_algorithm(stdlib):
    from codetune.data import redact as R

    rng = __import__("random").Random(1)
    texts = []
    for d in ("json", "email", "http", "urllib", "logging", "smtplib.py", "ftplib.py", "ssl.py"):
        p = stdlib / d
        texts += [f.read_text(errors="replace") for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    for t in texts[:60]:
        lines = t.split("\n")
        for _ in range(8):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["    ", "", "\t# "]) + rng.choice(PLANTS))
        texts.append("\n".join(lines))
    texts += PLANTS + ["\n".join(PLANTS), "İ" * 3 + "\n" + "\n".join(PLANTS)]
    redacted = 0
    for t in texts:
        want_text, want_counts, want_lines = _reference(t)
        assert R.candidate_lines(t) == want_lines
        got_text, got_counts = R.redact(t)
        assert (got_text, dict(got_counts)) == (want_text, want_counts)
        redacted += bool(want_counts)
    assert redacted > 60


def test_email_search_matches_the_regex():
    from codetune.data.redact import EMAIL, emails

    rng = __import__("random").Random(2)
    parts = ["a", "b.c", "@", "@@", "x-y.org", ".", "com", "%", "+", " ", "\n", "é", "_", "1", "a@b", "@c.de"]
    for _ in range(3000):
        t = "".join(rng.choice(parts) for _ in range(rng.randint(1, 25)))
        assert emails(t) == [m.group() for m in EMAIL.finditer(t)], t
