"""Stage 5: exact duplicates after whitespace normalisation; near-duplicates with small edits cluster,
distinct files do not."""

import random

from codetune.data.dedup import Deduper, exact_key, permutations, shingles, signature

PERMS = permutations(256)


def _code(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "result", "items", "total", "name", "data"]
    lines = []
    for i in range(n):
        a, b, c = (rng.choice(words) for _ in range(3))
        lines.append(f"def {a}_{i}({b}, {c}):\n    return {b} + {c} * {rng.randint(0, 999)}\n")
    return "\n".join(lines)


def _sig(text):
    return signature(shingles(text), PERMS)


def _bands(d, text):
    return d.band_keys(_sig(text))


def test_exact_key_ignores_whitespace():
    assert exact_key("def f():\n    return 1\n") == exact_key("def f():\n\treturn   1")
    assert exact_key("a b") != exact_key("a c")


def test_near_duplicates_cluster_and_distinct_files_do_not():
    base = _code(1)
    edited = base.replace("return", "return  ", 3).replace("alpha", "ALPHA", 1) + "\n# small edit\nx = 1\n"
    other = _code(2)
    d = Deduper(0.7, 256)
    assert d.check(0, exact_key(base), _bands(d, base)) is None
    assert d.check(1, exact_key(other), _bands(d, other)) is None
    assert d.check(2, exact_key(edited), _bands(d, edited)) == "near_duplicate"
    assert d.check(3, exact_key(base + "\n\n"), _bands(d, base)) == "exact_duplicate"
    assert d.clusters == {0: 1}  # the first copy is the one kept


def test_many_distinct_files_stay():
    d = Deduper(0.7, 256)
    assert all(d.check(i, exact_key(t), _bands(d, t)) is None for i, t in enumerate(_code(100 + i) for i in range(30)))


def test_signature_estimates_jaccard():
    a = _code(5, 100)
    lines = a.splitlines()
    b = "\n".join(lines[: len(lines) // 2] + [ln + " # changed" for ln in lines[len(lines) // 2:]])
    sa, sb = set(shingles(a)), set(shingles(b))
    true = len(sa & sb) / len(sa | sb)
    est = float((_sig(a) == _sig(b)).mean())
    assert abs(true - est) < 0.1


def test_word_hashes_follow_the_words():
    import re

    from codetune.data.dedup import word_hashes

    text = "def f(x_1, y):\n    return x_1 + y  # café naïve x_1 ÿ 42\tf"
    words = re.findall(r"[A-Za-z_0-9]+", text)
    h = word_hashes(text.encode())
    assert len(h) == len(words)
    for i, w in enumerate(words):  # equal words, equal hashes; different words, different hashes
        assert all((h[i] == h[j]) == (w == words[j]) for j in range(len(words)))


def test_band_keys_are_the_same_in_another_process():
    """Fixed arithmetic and seeds only: no dependence on PYTHONHASHSEED or on the process."""
    import json
    import os
    import subprocess
    import sys

    text = _code(3)
    script = ("import json, sys; from codetune.data.dedup import Deduper, permutations, shingles, signature\n"
              "d = Deduper(0.7, 256); t = sys.stdin.read()\n"
              "print(json.dumps(d.band_keys(signature(shingles(t), permutations(256)))))")
    out = subprocess.run([sys.executable, "-c", script], input=text, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out) == Deduper(0.7, 256).band_keys(_sig(text))
