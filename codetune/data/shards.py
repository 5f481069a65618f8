"""Token shards on disk: the contract between `prepare` and `train`/`eval`.

Layout of a prepared data directory (one folder per split):

    data_dir/manifest.json
    data_dir/{train,val}/meta.json      {"dtype": "uint16", "seq_len": 4096, "n_seq": N, ...}
    data_dir/{train,val}/tokens.bin     N x seq_len token ids, raw, memory-mapped (no copy into RAM)
    data_dir/{train,val}/doc_starts.bin int32 offsets of document starts inside each sequence (CSR values)
    data_dir/{train,val}/doc_index.bin  int64 CSR row pointers, N + 1 entries
    data_dir/{train,val}/n_real.bin     int32 real (non-pad) tokens per sequence
    data_dir/{train,val}/loss_mask.bin  only where some token carries no loss (prompt/response pairs,
                                        chat.py): N x ceil(seq_len / 8) bytes, np.packbits of a bool per
                                        position, 1 = the token there is predicted with loss. Absent =
                                        every token is (raw code; sets made before it existed).

Why document starts: positions restart at each document and no loss is taken where the next token
begins another document, so packing several files into one sequence doesn't teach the model that
unrelated files follow each other. Why a loss mask: a pair teaches the response, not the prompt.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codetune.atomic import replace_dir

IGNORE = -100


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Streams packed sequences of one split into a temporary folder; `close()` renames it into place,
    so a crash never leaves a split that a later run would trust."""

    def __init__(self, split_dir: str | Path, seq_len: int, vocab_size: int, extra_meta: dict | None = None):
        self.final = Path(split_dir)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        self.seq_len, self.dtype = seq_len, token_dtype(vocab_size)
        self.meta = {"dtype": self.dtype.name, "seq_len": seq_len, "vocab_size": vocab_size, **(extra_meta or {})}
        self._tok = open(self.tmp / "tokens.bin", "wb")
        self._starts = open(self.tmp / "doc_starts.bin", "wb")
        self._mask = open(self.tmp / "loss_mask.bin", "wb")
        self.masked = False  # some real token carries no loss: keep loss_mask.bin
        self._index = [0]
        self._n_real: list[int] = []
        self.n_seq = 0
        self.n_tokens = 0  # real (non-pad) tokens

    def add(self, tokens: np.ndarray, doc_starts: list[int], n_real: int, target: np.ndarray | None = None) -> None:
        """`target`: bool per position, whether the token there carries loss (None: all real ones do)."""
        assert len(tokens) == self.seq_len and doc_starts and doc_starts[0] == 0
        self._tok.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        if target is None:
            target = np.arange(self.seq_len) < n_real
        self.masked = self.masked or not bool(target[:n_real].all())
        self._mask.write(np.packbits(np.asarray(target, dtype=bool)).tobytes())
        self._starts.write(np.asarray(doc_starts, dtype=np.int32).tobytes())
        self._index.append(self._index[-1] + len(doc_starts))
        self._n_real.append(n_real)
        self.n_seq += 1
        self.n_tokens += n_real

    def close(self) -> dict:
        self._tok.close()
        self._starts.close()
        self._mask.close()
        if self.masked:
            self.meta["loss_mask"] = True
        else:  # raw code only: the shards stay exactly what they were before masks existed
            (self.tmp / "loss_mask.bin").unlink()
        np.asarray(self._index, dtype=np.int64).tofile(self.tmp / "doc_index.bin")
        np.asarray(self._n_real, dtype=np.int32).tofile(self.tmp / "n_real.bin")
        self.meta.update(n_seq=self.n_seq, n_tokens=self.n_tokens)
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1))
        replace_dir(self.tmp, self.final)
        return self.meta

    def abort(self) -> None:
        """Never raises: it runs while another error is on its way up, and closing a file on a full disk
        fails again (its buffer cannot be flushed), which used to skip the removal below."""
        for f in (self._tok, self._starts, self._mask):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass(frozen=True)
class StagedDoc:
    ids: np.ndarray
    target: np.ndarray | None  # bool per token, for a chat document; None: raw code, every token
    chat: bool
    key: int  # its file-level unit key (a 64-bit hash of its name or content)


class Staging:
    """Kept documents' token ids, in input order, until the split is known: the split unit depends on
    how many repositories, directories and files were kept, which only the end of the pass tells. The
    tokens go to one file (4 bytes per token at most, beside the shards), chat documents' loss targets
    to a second (1 byte per token); per document the parent keeps 37 bytes (length, the three unit
    keys, the near-duplicate group, the kind)."""

    def __init__(self, path: Path, vocab_size: int):
        self.path, self.dtype = Path(path), token_dtype(vocab_size)
        self.mask_path = self.path.with_name(self.path.name + ".mask")
        self._f = open(self.path, "wb")
        self._m = open(self.mask_path, "wb")
        self.lengths, self.keys, self.groups, self.chat = array("I"), array("Q"), array("q"), array("B")

    def add(self, keys: tuple[int, int, int], group: int, ids: np.ndarray, target: np.ndarray | None = None) -> None:
        self._f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if target is not None:
            assert len(target) == len(ids)
            self._m.write(np.asarray(target, dtype=np.uint8).tobytes())
        self.lengths.append(len(ids))
        self.keys.extend(keys)
        self.groups.append(group)
        self.chat.append(target is not None)

    def __len__(self) -> int:
        return len(self.lengths)

    def unit_keys(self) -> np.ndarray:
        return np.frombuffer(self.keys, dtype=np.uint64).reshape(len(self), -1) if len(self) \
            else np.zeros((0, 3), dtype=np.uint64)

    def documents(self):
        """Each document as a StagedDoc, in order (reads the files once, memory-mapped)."""
        self._f.close()
        self._m.close()
        if not len(self):
            return
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        masks = np.memmap(self.mask_path, dtype=np.uint8, mode="r") if self.mask_path.stat().st_size else None
        keys = self.unit_keys()[:, 2]
        pos = mpos = 0
        for n, chat, key in zip(self.lengths, self.chat, keys.tolist()):
            target = None
            if chat:
                target = masks[mpos:mpos + n].astype(bool)
                mpos += n
            yield StagedDoc(tokens[pos:pos + n], target, bool(chat), key)
            pos += n
        del tokens, masks

    def close(self) -> None:
        """Never raises: also called while another error is on its way up (a full disk fails again here)."""
        for f in (self._f, self._m):
            try:
                f.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)
        self.mask_path.unlink(missing_ok=True)


class Packer:
    """Concatenates documents (each followed by EOS) and cuts fixed-length sequences, recording where
    each document starts. A document longer than what is left continues at position 0 of the next
    sequence (its continuation counts as a start there). The tail is padded with `pad_id`.

    With `fim_start` (the id every FIM sample begins with), a code document is read as its plain runs and
    FIM samples (pipeline.encode_batch: a sample runs from that id to the EOS after its middle), each its own
    unit of attention. A FIM sample that fits a row but not what is left of this one waits, and goes where
    it fits whole (largest first: into the current row, and first into each row that plain text runs on
    into), while later documents fill the row: split across rows its middle would lose its prefix and
    suffix, which is what it is for. Rows are padded only when more than MAX_WAITING samples wait, and at
    the end (docs/data.md gives the padding measured).

    The sequence being filled is one numpy buffer filled by slices: `prepare` packs ~100 M tokens in
    its main process, where a Python list per token would cost as much CPU as a worker stage."""

    MAX_WAITING = 256

    def __init__(self, writer: ShardWriter, eos_id: int, pad_id: int, fim_start: int | None = None):
        self.w, self.eos, self.pad, self.fim_start = writer, eos_id, pad_id, fim_start
        self.waiting: list[tuple[np.ndarray, bool]] = []  # FIM samples (ids, whether an EOS follows) to place
        self.fim_over_row = 0  # FIM samples longer than a row, split like plain text
        self.buf = np.empty(writer.seq_len, dtype=np.int64)
        self.target = np.ones(writer.seq_len, dtype=bool)
        self.n = 0  # tokens in buf
        self.starts: list[int] = []
        self.dropped = 0  # rows with no token to learn (see _flush)

    def add_document(self, ids, target: np.ndarray | None = None) -> None:
        """Raw code (`target` None) is followed by EOS and every token carries loss. A chat document
        (`target`: bool per token) already ends with its end-of-turn token, so no EOS is added."""
        ids = np.asarray(ids, dtype=np.int64)
        if target is not None or self.fim_start is None:
            self._place(ids, target, eos=target is None)
        else:  # (a document without a FIM sample is one plain run: placed as above)
            for seg, is_fim, last in self._segments(ids):
                if is_fim and len(seg) + last <= self.w.seq_len:
                    self.waiting.append((seg, last))
                else:
                    self.fim_over_row += is_fim
                    self._place(seg, None, eos=last)
        self._place_waiting()

    def _segments(self, ids: np.ndarray):
        """(ids, is_fim, is_last) for each plain run and FIM sample of a code document, in order; a sample
        inside the document includes its closing EOS, the last one gets the document's EOS when placed."""
        starts, eos = np.flatnonzero(ids == self.fim_start), np.flatnonzero(ids == self.eos)
        ends = np.searchsorted(eos, starts)  # each sample's closing EOS: the first after its start
        cuts = [(int(a), int(eos[j]) + 1 if j < len(eos) else len(ids)) for a, j in zip(starts, ends)]
        pos, out = 0, []
        for a, b in cuts:
            if a > pos:
                out.append((ids[pos:a], False))
            out.append((ids[a:b], True))
            pos = b
        if pos < len(ids) or not out:  # (an empty document too: it still gets its EOS)
            out.append((ids[pos:], False))
        return [(seg, is_fim, k == len(out) - 1) for k, (seg, is_fim) in enumerate(out)]

    def _place_waiting(self, final: bool = False, fresh: bool = False) -> None:
        """Waiting samples into this row, largest that fits first; when none fits: pad the row if more than
        MAX_WAITING wait or at the end (`final`), else leave them for later rows (always when `fresh`)."""
        while self.waiting:
            room = self.w.seq_len - self.n
            fits = [(len(seg) + eos, -k) for k, (seg, eos) in enumerate(self.waiting) if len(seg) + eos <= room]
            if fits:  # the largest that fits (the oldest of equals): small ones stay to fill what is left
                k = -max(fits)[1]
                seg, eos = self.waiting.pop(k)
                self._place(seg, None, eos=eos)
            elif not fresh and (final or len(self.waiting) > self.MAX_WAITING):
                self._flush()  # pads this row; every waiting sample fits an empty one
            else:
                return

    def _place(self, ids: np.ndarray, target: np.ndarray | None, eos: bool) -> None:
        size, L = len(ids) + eos, self.w.seq_len
        pos = 0
        while pos < size:
            if pos > 0 and target is None and self.waiting:
                # plain code running on into a fresh row: waiting samples go in first, while the row is empty
                # (the rest of the text fits anywhere, a sample needs room), else they pile up and rows get
                # padded for them. A chat document's rest stays at the row's start: eval reads it as continued there.
                self._place_waiting(fresh=True)
            self.starts.append(self.n)  # the document's start, or its continuation's in a new row
            take = min(L - self.n, size - pos)
            body = min(pos + take, len(ids)) - pos  # of which real ids; the rest is the EOS
            self.buf[self.n:self.n + body] = ids[pos:pos + body]
            self.target[self.n:self.n + body] = True if target is None else target[pos:pos + body]
            if body < take:
                self.buf[self.n + body] = self.eos
                self.target[self.n + body] = True
            self.n += take
            pos += take
            if self.n == L:
                self._flush()

    def _flush(self) -> None:
        n_real = self.n
        if n_real == 0:
            return
        starts = self.starts
        if not self.target[:n_real].all() and not _has_label(self.target, starts, n_real):
            # every next-token target here is a prompt's (a chat prompt longer than a row): the row would
            # cost a forward and backward and teach nothing, and a step made only of such rows has no loss
            # at all. The response's row that follows cannot see this one anyway (rows are independent).
            self.dropped += 1
            self.n, self.starts = 0, []
            return
        if n_real < self.w.seq_len:
            starts = starts + [n_real]  # padding is its own "document": no attention into it, no loss
            self.buf[n_real:] = self.pad
            self.target[n_real:] = False
        self.w.add(self.buf, sorted(set(starts)), n_real, self.target)
        self.n, self.starts = 0, []

    def finish(self) -> dict:
        self._place_waiting(final=True)
        self._flush()
        if self.dropped:
            self.w.meta["dropped_rows_without_targets"] = self.dropped
        if self.fim_over_row:
            self.w.meta["fim_samples_longer_than_a_row"] = self.fim_over_row
        return self.w.close()


def _has_label(target: np.ndarray, starts: list[int], n_real: int) -> bool:
    """Whether a packed row gives positions_and_labels any label: some position t + 1 < n_real carries
    loss and continues the document of t."""
    nxt = target[1:n_real].copy()
    inner = [s - 1 for s in starts if 0 < s < n_real]
    nxt[inner] = False
    return bool(nxt.any())


class PackedDataset(torch.utils.data.Dataset):
    """Reads one split through memory maps. Item i gives input_ids, position_ids restarting at each
    document, and labels already shifted by one (labels[t] is the token after t), with IGNORE where the
    next token starts another document, after the last token, and on padding."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir) / split
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no prepared '{split}' split in {data_dir}: run `codetune prepare` first "
                                    f"(expected {meta_path})")
        self.meta = json.loads(meta_path.read_text())
        self.seq_len = int(self.meta["seq_len"])
        n = int(self.meta["n_seq"])
        if n == 0:  # an empty split (e.g. every repository hashed into train) can't be memory-mapped
            self.tokens = np.zeros((0, self.seq_len), dtype=self.meta["dtype"])
        else:
            self.tokens = np.memmap(self.dir / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n, self.seq_len))
        self.starts = np.fromfile(self.dir / "doc_starts.bin", dtype=np.int32)
        self.index = np.fromfile(self.dir / "doc_index.bin", dtype=np.int64)
        self.n_real = np.fromfile(self.dir / "n_real.bin", dtype=np.int32)
        self.mask = None
        if self.meta.get("loss_mask") and n:
            self.mask = np.memmap(self.dir / "loss_mask.bin", dtype=np.uint8, mode="r",
                                  shape=(n, -(-self.seq_len // 8)))
        if len(self.index) != n + 1 or len(self.n_real) != n:
            raise ValueError(f"{self.dir} is damaged: doc_index has {len(self.index)} rows for {n} sequences; "
                             "re-run `codetune prepare`")

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_starts(self, i: int) -> np.ndarray:
        return self.starts[self.index[i]:self.index[i + 1]]

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.tokens[i].astype(np.int64))
        starts = self.doc_starts(i)
        return {"input_ids": ids, **positions_and_labels(ids, starts, int(self.n_real[i]), self.target(i))}

    def target(self, i: int) -> np.ndarray | None:
        """Bool per position of sequence i: the token there carries loss; None when every one does."""
        if self.mask is None:
            return None
        return np.unpackbits(self.mask[i], count=self.seq_len).astype(bool)


def positions_and_labels(ids: torch.Tensor, starts, n_real: int, target: np.ndarray | None = None) -> dict:
    """`target`: where not None, labels[t] is IGNORE unless the token at t + 1 carries loss (a prompt)."""
    L = len(ids)
    seg = torch.zeros(L, dtype=torch.long)
    starts_t = torch.as_tensor(np.asarray(starts), dtype=torch.long)
    seg[starts_t[1:]] = 1
    seg = torch.cumsum(seg, 0)  # document number of each position
    start_of = starts_t[seg]
    position_ids = torch.arange(L) - start_of
    labels = torch.full((L,), IGNORE, dtype=torch.long)
    labels[:-1] = ids[1:]
    labels[:-1][seg[1:] != seg[:-1]] = IGNORE  # next token starts another document
    labels[max(n_real - 1, 0):] = IGNORE  # nothing to predict into or on padding
    if target is not None:
        labels[:-1][~torch.from_numpy(np.ascontiguousarray(target[1:]))] = IGNORE
    return {"position_ids": position_ids, "labels": labels}


FIM_WHOLE_SINCE = 6  # data/prepare.PIPELINE_VERSION from which FIM samples are never split across rows


def stale_fim(manifest: dict) -> str | None:
    """Why a prepared set's FIM data teaches less than it should (None: it doesn't): sets made before
    PIPELINE_VERSION 6 rewrote whole files into FIM order and then cut them into rows, which leaves most
    long files' middles in a row without their prefix (docs/data.md, stage 8). Usable; worth re-preparing."""
    fim_rate = (manifest.get("config") or {}).get("fim_rate") or 0
    if fim_rate > 0 and int(manifest.get("format") or 0) < FIM_WHOLE_SINCE:
        return (f"this set was prepared by an older codetune (format {manifest.get('format')}), whose FIM samples of "
                "files longer than a row lost their prefix to another row; re-run `codetune prepare` with the "
                "same flags to rebuild it (docs/data.md, stage 8)")
    return None


def read_manifest(data_dir: str | Path) -> dict:
    p = Path(data_dir) / "manifest.json"
    if not p.exists():
        if not Path(data_dir).is_dir() or not any(Path(data_dir).iterdir()):
            raise FileNotFoundError(f"no prepared data in {data_dir}: run `codetune prepare --sources …` first "
                                    "(or pass --data-dir)")
        raise FileNotFoundError(f"{data_dir} has no manifest.json: it was not prepared by `codetune prepare` "
                                "(or the run did not finish); run prepare again")
    return json.loads(p.read_text())
