"""What each stage kept and dropped, by reason, plus the distributions the report draws."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

STAGES = ("decode", "language", "quality", "redact", "dedup", "decontam", "split", "fim", "tokenize")


@dataclass
class Stats:
    kept: Counter = field(default_factory=Counter)  # stage -> documents passed on
    dropped: dict = field(default_factory=lambda: defaultdict(Counter))  # stage -> reason -> documents
    dropped_bytes: Counter = field(default_factory=Counter)  # reason -> input bytes
    seconds: Counter = field(default_factory=Counter)  # stage -> CPU seconds summed over workers
    bytes_in: Counter = field(default_factory=Counter)  # stage -> bytes that entered it
    languages: Counter = field(default_factory=Counter)  # kept documents per language
    language_bytes: Counter = field(default_factory=Counter)
    redactions: Counter = field(default_factory=Counter)  # placeholder -> values replaced
    fim_modes: Counter = field(default_factory=Counter)
    split_documents: Counter = field(default_factory=Counter)  # split -> documents
    contaminated: list = field(default_factory=list)  # {"path", "match"}
    file_bytes: list = field(default_factory=list)  # kept documents' sizes
    doc_tokens: list = field(default_factory=list)  # kept documents' token counts
    lsh_bands: tuple = ()  # (bands, rows) of the near-dedup index
    dedup_index_bytes: int = 0  # approximate memory of the exact + near indexes at the end
    dedup_indexed: int = 0
    input_bytes: int = 0
    files_seen: int = 0
    kinds: dict = field(default_factory=lambda: defaultdict(Counter))  # code/chat -> seen, kept, dropped, tokens

    def drop(self, stage: str, reason: str, n_bytes: int = 0, kind: str = "code") -> None:
        self.kinds[kind]["dropped"] += 1
        self.dropped[stage][reason] += 1
        self.dropped_bytes[f"{stage}:{reason}"] += n_bytes

    def add_timing(self, stage: str, seconds: float, n_bytes: int) -> None:
        self.seconds[stage] += seconds
        self.bytes_in[stage] += n_bytes

    def to_dict(self) -> dict:
        stages = {}
        for s in STAGES:
            mb = self.bytes_in[s] / 1e6
            stages[s] = {"kept": self.kept[s], "dropped": dict(sorted(self.dropped[s].items())),
                         "cpu_seconds": round(self.seconds[s], 3),
                         "mb_per_cpu_second": round(mb / self.seconds[s], 2) if self.seconds[s] > 0 else None}
        for s in sorted(set(self.dropped) - set(STAGES)):  # e.g. "error": unexpected failures, counted
            stages[s] = {"kept": 0, "dropped": dict(sorted(self.dropped[s].items()))}
        return {"files_seen": self.files_seen, "input_bytes": self.input_bytes, "stages": stages,
                "languages": dict(self.languages.most_common()), "redactions": dict(sorted(self.redactions.items())),
                "fim": dict(sorted(self.fim_modes.items())),
                "split_documents": dict(sorted(self.split_documents.items())), "contaminated": self.contaminated,
                "kinds": {k: {f: v[f] for f in ("seen", "kept", "dropped", "tokens", "loss_tokens")}
                          for k, v in sorted(self.kinds.items())}}
