"""One progress bar per pipeline phase, with files/s and MB/s (rich)."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class _Rates(ProgressColumn):
    def render(self, task) -> Text:
        t = max(task.elapsed or 0.0, 1e-9)
        files = task.fields.get("files", 0)
        return Text(f"{files:,} files  {files / t:,.0f} files/s  {task.completed / 1e6 / t:,.1f} MB/s")


class Bars:
    """`tick(phase, files, bytes)`; the bar shows bytes (total known for the input, not for tokens)."""

    PHASES = {"clean": "read, filter, redact, dedup", "tokenize": "FIM, tokenize, pack"}

    def __init__(self, total_bytes: int | None):
        self.p = Progress(TextColumn("{task.description:<30}"), BarColumn(), _Rates(), TimeElapsedColumn())
        self.tasks = {k: self.p.add_task(v, total=total_bytes, files=0) for k, v in self.PHASES.items()}
        self.files = dict.fromkeys(self.PHASES, 0)

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.stop()

    def tick(self, phase: str, files: int, n_bytes: int) -> None:
        self.files[phase] += files
        self.p.update(self.tasks[phase], advance=n_bytes, files=self.files[phase])
