"""Stage 5: exact and near deduplication.

Exact: a hash of the text with all whitespace runs collapsed, so re-indented or re-wrapped copies
count as the same file. Near: MinHash over word 5-gram shingles with an LSH index from datasketch
(the method and defaults of bigcode's near-dedup: 5-grams, 256 permutations, Jaccard >= 0.7).

Priority: deduplication streams in input order (sources in the order given, each walked in sorted
path order), and the first copy of a cluster is kept. So the copy kept is deterministic, and a user
who prefers one source's copies lists that source first.

Everything per document runs in the worker processes with numpy, so the cost is a few passes over
each file's bytes rather than Python work per word: word hashes are polynomial hashes (mod 2^64)
taken from one prefix sum over the bytes, mixed with splitmix64's finalizer; a shingle is a
polynomial of its 5 word hashes; the MinHash family is multiplicative hashing of the shingle hash's
top 32 bits, a*x mod 2^32, with a random odd a per permutation (each a bijection of the 32-bit values;
the shingle hashes are already well mixed). That is weaker in theory than 64-bit multiply-add-shift,
((a*x + b) mod 2^64) >> 32, and 2.3x cheaper in numpy (1.7x against 64-bit multiply-shift without the
"+ b"); on 590 real near-duplicate pairs the error of the
Jaccard estimate had the same spread (0.023, the sqrt(J(1-J)/256) expected of 256 permutations) and
the same number of pairs was found. The 25 band keys are computed there too. All of it is fixed arithmetic with fixed seeds (never Python's salted hash()), so results do
not depend on the process or the run. Only the LSH index lives in the parent.
Memory: the index keeps, per kept document, one small integer key in each of `b` bands (b is chosen
by datasketch for the threshold); the signatures themselves are not stored.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field

import numpy as np

# bytes.translate table: 1 for the bytes of [A-Za-z_0-9] (what a word is made of), else 0. Non-ASCII
# characters' UTF-8 bytes are >= 0x80, never word bytes, as the characters are not in the class.
_WORD = bytes(1 if chr(c).isascii() and (chr(c).isalnum() or chr(c) == "_") else 0 for c in range(256))
_M = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_M_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_SHINGLE_MUL = np.uint64(1_000_003)
_CHUNK = 512  # shingles per numpy block: the temporary (CHUNK x num_perm x 4 bytes) stays in cache
_BAND_MUL = np.random.RandomState(7).randint(0, 2**63, size=256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_powers: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # M^i, M^-i; grown on demand


def exact_key(text: str) -> bytes:
    """16-byte hash of the whitespace-normalised text."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def permutations(num_perm: int, seed: int = 1) -> np.ndarray:
    """The multipliers of the hash functions, one random odd 32-bit number per permutation."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_powers[0]) < n:
        size = max(n, 2 * len(_powers[0]), 1 << 16)
        with np.errstate(over="ignore"):
            for i, base in enumerate((_M, _M_INV)):
                t = np.full(size, base, dtype=np.uint64)
                t[0] = 1
                _powers[i] = np.multiply.accumulate(t)  # wraps mod 2^64
    return _powers[0], _powers[1]


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the polynomial hashes' structure over all 64 bits."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def word_hashes(raw: bytes) -> np.ndarray:
    """64-bit hash of each word (run of [A-Za-z_0-9]) of UTF-8 bytes, in order. The hash of bytes
    s..e-1 is sum(b_j * M^(e-1-j)) = M^(e-1) * (C[e] - C[s]) with C the prefix sums of b_j * M^-j."""
    isw = np.frombuffer(raw.translate(_WORD), dtype=bool)
    edges = np.flatnonzero(np.diff(isw, prepend=False, append=False))
    if len(edges) == 0:
        return np.zeros(0, dtype=np.uint64)
    start, end = edges[::2], edges[1::2]
    pw, pw_inv = _power_tables(len(raw))
    c = np.zeros(len(raw) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(np.frombuffer(raw, dtype=np.uint8) * pw_inv[:len(raw)], out=c[1:])
        return _mix((c[end] - c[start]) * pw[end - 1])


def shingles(text: str, n: int = 5) -> np.ndarray:
    """64-bit hashes of the word n-grams (the whole word list when shorter than n), in text order.
    Repeats are left in: they cannot change a minimum, and removing them (a sort) costs about what
    hashing them costs."""
    hw = word_hashes(text.encode("utf-8", "surrogatepass"))
    if len(hw) == 0:
        return hw
    k = min(n, len(hw))
    h = np.zeros(len(hw) - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(k):  # polynomial hash of each window, wrapping mod 2^64
            h = h * _SHINGLE_MUL + hw[i:len(hw) - k + 1 + i]
    return h


def signature(sh: np.ndarray, a: np.ndarray) -> np.ndarray:
    """MinHash signature (32-bit values, as uint64) for the multipliers `a`: per permutation, the
    minimum of a * x mod 2^32 over the shingles' top 32 bits x. 32-bit arithmetic runs 1.7x faster
    than 64-bit in numpy's SIMD loops. In-place operations on a small reused block keep the work in
    cache (~4x faster than the plain broadcast expression)."""
    x32 = (sh >> np.uint64(32)).astype(np.uint32)
    sig = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    buf = np.empty((min(_CHUNK, max(len(x32), 1)), len(a)), dtype=np.uint32)
    for s in range(0, len(x32), _CHUNK):
        x = x32[s:s + _CHUNK, None]
        v = buf[:len(x)]
        np.multiply(x, a, out=v)  # wraps mod 2^32
        np.minimum(sig, v.min(axis=0), out=sig)
    return sig.astype(np.uint64)


def band_keys(sig: np.ndarray, b: int, r: int) -> list[int]:
    """One 64-bit key per LSH band: a random linear combination of the band's r values (mod 2^64).
    Two different bands collide with probability about 2^-32 at most; equal bands always agree."""
    with np.errstate(over="ignore"):
        return (sig[:b * r].reshape(b, r) * _BAND_MUL[:r]).sum(axis=1, dtype=np.uint64).tolist()



@dataclass
class Deduper:
    """Streams documents through the exact and the near index; `check` says why one is a duplicate.

    The LSH banding (b bands of r rows, chosen by datasketch's MinHashLSH for the threshold and
    permutation count) is kept here in one plain dict per band, band hash -> first document id,
    because datasketch's in-memory storage holds a set per bucket and a key list per document
    (about 8.5 KB per document measured, against about 2 KB here). Any shared band makes a candidate,
    exactly as a datasketch query does.

    With `drop_near` False (`--no-near-dedup`) near-duplicates are kept but still grouped (union-find
    over shared bands), so the split can keep each group on one side.
    """
    threshold: float = 0.7
    num_perm: int = 256
    drop_near: bool = True
    exact: set = field(default_factory=set)
    clusters: dict = field(default_factory=dict)  # kept doc id -> number of near copies dropped
    parent: dict = field(default_factory=dict)  # doc id -> another of its group (drop_near False only)

    def __post_init__(self):
        from datasketch import MinHashLSH

        params = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.b, self.r = params.b, params.r
        self.bands: list[dict[int, int]] = [{} for _ in range(self.b)]

    def band_keys(self, sig: np.ndarray) -> list[int]:
        return band_keys(sig, self.b, self.r)

    def memory_bytes(self) -> int:
        """Approximate size of both indexes: containers plus their key objects (ints ~32 B, 16-byte
        digests ~49 B); document ids are shared small objects across bands."""
        entries = sum(len(b) for b in self.bands)
        return (sum(sys.getsizeof(b) for b in self.bands) + 32 * entries
                + sys.getsizeof(self.exact) + 49 * len(self.exact))

    def check(self, doc_id: int, key: bytes, keys: list[int] | None) -> str | None:
        """None (kept, now indexed), 'exact_duplicate' or 'near_duplicate'. `keys`: the document's band
        keys (`band_keys`, computed in the worker), None without near hashing."""
        if key in self.exact:
            return "exact_duplicate"
        self.exact.add(key)
        if keys is None:
            return None
        if not self.drop_near:
            for band, k in zip(self.bands, keys):
                first = band.setdefault(k, doc_id)
                if first != doc_id:
                    self._union(first, doc_id)
            return None
        for band, k in zip(self.bands, keys):
            first = band.get(k)
            if first is not None:
                self.clusters[first] = self.clusters.get(first, 0) + 1
                return "near_duplicate"
        for band, k in zip(self.bands, keys):
            band[k] = doc_id
        return None

    def group(self, doc_id: int) -> int:
        """The smallest document id of `doc_id`'s near-duplicate group (itself when it has none)."""
        while (up := self.parent.get(doc_id, doc_id)) != doc_id:
            self.parent[doc_id] = self.parent.get(up, up)  # path halving
            doc_id = up
        return doc_id

    def _union(self, a: int, b: int) -> None:
        a, b = self.group(a), self.group(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
