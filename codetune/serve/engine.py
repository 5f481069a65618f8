"""The one place the served model runs: a worker thread that takes jobs from a queue, one at a time.

A model's forward pass is not safe to run twice at once on one GPU's memory budget (two KV caches of
a 3B model may not fit) and interleaving gains nothing on a CPU, so requests queue here in arrival
order. The queue is bounded: past `max_pending` jobs the server answers "busy" at once instead of
letting latency grow without limit; a job that has waited too long can be withdrawn (`withdraw`) as
long as the worker has not taken it up, so a timed-out request never runs after it was answered.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from codetune.export.sampling import Completion, SamplingParams, generate_text
from codetune.export.static_decode import Decoder


class Busy(RuntimeError):
    """The queue is full; the client should retry later."""


@dataclass
class Job:
    prompts: list[list[int]]  # one token-id prompt per choice
    params: list[SamplingParams]
    on_text: Callable[[int, str], None] | None = None  # (choice index, text piece), for streaming
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next token
    started: Future = field(default_factory=Future)  # resolved when the worker takes the job up
    future: Future = field(default_factory=Future)  # the completions; cancelled if the job never ran


class Engine:
    def __init__(self, model, tokenizer, max_pending: int = 1024, decoder: Decoder | None = None):
        """`decoder`: how tokens are decoded (its static caches and CUDA graphs live as long as the engine,
        used by the worker thread alone); default: Decoder(model, "auto")."""
        self.model, self.tokenizer, self.max_pending = model, tokenizer, max_pending
        self.decoder = decoder if decoder is not None else Decoder(model)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._tokens = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="codetune-engine", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def tokens_generated(self) -> int:
        """Tokens generated so far, for all jobs (cancelled ones count what they produced)."""
        return self._tokens

    def submit(self, prompts: list[list[int]], params: list[SamplingParams],
               on_text: Callable[[int, str], None] | None = None) -> Job:
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(f"{self._pending} requests are already waiting; retry shortly")
            self._pending += 1
        job = Job(prompts, params, on_text)
        self._jobs.put(job)
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job back out of the queue; False if the worker has already started it (then it runs
        until it ends or `job.cancel` stops it)."""
        if not job.started.cancel():
            return False
        job.cancel.set()
        job.future.cancel()
        with self._lock:
            self._pending -= 1
        return True

    def abandon(self, job: Job) -> None:
        """The client has gone: withdraw the job if it waits, stop it at the next token if it runs."""
        if not self.withdraw(job):
            job.cancel.set()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.started.set_running_or_notify_cancel():
                continue  # withdrawn while it waited, and counted out then
            job.started.set_result(None)
            result, error = None, None
            if not job.cancel.is_set():  # else the client left while the job waited
                try:
                    result = self._run(job)
                except Exception as e:  # the error goes to the waiting request, which answers 500
                    error = e
            # count the job done before anyone waiting on it wakes up, so `pending` is never stale to them
            with self._lock:
                self._pending -= 1
                self._tokens += sum(c.completion_tokens for c in result or [])
            if job.cancel.is_set() and result is None and error is None:
                job.future.cancel()
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _run(self, job: Job) -> list[Completion]:
        out = []
        for i, (ids, params) in enumerate(zip(job.prompts, job.params)):
            on_text = None if job.on_text is None else (lambda piece, i=i: job.on_text(i, piece))
            out.append(generate_text(self.model, self.tokenizer, ids, params, on_text=on_text,
                                     cancelled=job.cancel.is_set, decoder=self.decoder))
            if job.cancel.is_set():
                break
        return out
