"""Stage 9a: tokenization in the worker processes.

Pieces of a FIM document are encoded separately and joined with the FIM token ids, so a FIM token
can never merge with neighbouring text, and special-token strings inside someone's source code
("<|endoftext|>", "<fim_middle>") are plain text, never control tokens (`encode_special_tokens`).

Two interchangeable encoders give the same ids: `fastbpe.FastBPE` (tiktoken, about 5x faster) when
the parent has checked that it is faithful for this tokenizer, else the `tokenizers` fast tokenizer in
batches. Ids are built with numpy, never as Python lists of ints.
"""

from __future__ import annotations

import numpy as np

from codetune.data.fim import FimPieces


class PieceEncoder:
    def __init__(self, tokenizer_json: str, special_ids: dict[str, int], fast: bool = False):
        from tokenizers import Tokenizer

        self.special = {k: np.asarray([v], dtype=np.uint32) for k, v in special_ids.items()}
        self.fast, self.json, self._markup = None, tokenizer_json, None
        if fast:  # verified once in the parent (fastbpe.build), and inherited from it when forked
            from codetune.data import fastbpe

            self.fast = fastbpe.get(tokenizer_json)
            return
        self.tk = Tokenizer.from_str(tokenizer_json)
        self.tk.encode_special_tokens = True
        self._batch = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)  # no offsets: faster

    def texts(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of plain text: special-token strings in it stay text."""
        if self.fast is not None:
            return [self.fast.encode(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._batch(texts, add_special_tokens=False)]

    def template_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of chat markup (chat.py), where special-token strings are the control tokens they name."""
        if self._markup is None:
            from tokenizers import Tokenizer

            self._markup = Tokenizer.from_str(self.json)
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._markup.encode_batch(texts, add_special_tokens=False)]

    def encode(self, docs: list[FimPieces]) -> list[np.ndarray]:
        encs = iter(self.texts([text for d in docs for _, text in d.parts]))
        out = []
        for d in docs:
            arrays = []
            for tok, _ in d.parts:
                if tok is not None:
                    arrays.append(self.special[tok])
                arrays.append(next(encs))
            out.append(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        return out


def compact(ids: np.ndarray) -> np.ndarray:
    """uint16 when every id fits (any vocabulary up to 65536): half the bytes sent to the parent."""
    return ids.astype(np.uint16) if len(ids) and ids.max() < 65536 else ids
