"""Stage 9a: tokenization in the worker processes, with the fast (Rust) tokenizer and batches.

Pieces of a FIM document are encoded separately and joined with the FIM token ids, so a FIM token
can never merge with neighbouring text, and `encode_special_tokens` makes a literal "<|endoftext|>"
or "<fim_middle>" inside someone's source code plain text instead of a control token.
"""

from __future__ import annotations

import numpy as np

from codetune.data.fim import FimPieces


class PieceEncoder:
    def __init__(self, tokenizer_json: str, special_ids: dict[str, int]):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_str(tokenizer_json)
        self.tk.encode_special_tokens = True
        self.special = special_ids
        self._batch = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)  # no offsets: faster

    def encode(self, docs: list[FimPieces]) -> list[np.ndarray]:
        texts = [text for d in docs for _, text in d.parts]
        encs = self._batch(texts, add_special_tokens=False)
        out, i = [], 0
        for d in docs:
            ids: list[int] = []
            for tok, _ in d.parts:
                if tok is not None:
                    ids.append(self.special[tok])
                ids.extend(encs[i].ids)
                i += 1
            out.append(np.asarray(ids, dtype=np.uint32))
        return out
