"""The one place the served model runs: a worker thread that takes jobs from a queue, one at a time
(or, with `max_batch`, as many as the running batch has rows).

A model's forward pass is not safe to run twice at once on one GPU's memory budget (two KV caches of
a 3B model may not fit) and interleaving gains nothing on a CPU, so requests queue here in arrival
order. The queue is bounded: past `max_pending` jobs the server answers "busy" at once instead of
letting latency grow without limit; a job that has waited too long can be withdrawn (`withdraw`) as
long as the worker has not taken it up, so a timed-out request never runs after it was answered.

With `max_batch` above 1 (`codetune serve --max-batch N`) the worker instead takes a job up once a row of
the running batch (batching.py) is free, and runs each of its choices in a thread of its own whose
forward passes decode together with every other running choice; a job with n choices takes n rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from codetune.export.sampling import Completion, SamplingParams, generate_text, max_context
from codetune.export.static_decode import Decoder
from codetune.serve.batching import BatchScheduler


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
    def __init__(self, model, tokenizer, max_pending: int = 1024, decoder: Decoder | None = None,
                 max_batch: int = 1, batch_context: int | None = None, batch_graphs: bool | None = None):
        """`decoder`: how tokens are decoded one request at a time (its static caches and CUDA graphs live as
        long as the engine, used by the worker thread alone); default: Decoder(model, "auto").
        `max_batch` above 1: up to that many choices decode together through a BatchScheduler of
        `batch_context` positions a row (default: the model's context), `batch_graphs` as its `graphs`."""
        self.model, self.tokenizer, self.max_pending = model, tokenizer, max_pending
        self.batch = None if max_batch <= 1 else BatchScheduler(model, max_batch, batch_context, batch_graphs)
        self.decoder = decoder if decoder is not None or self.batch is not None else Decoder(model)
        self._rows = threading.Semaphore(max_batch)  # free rows of the running batch, taken per choice
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._tokens = 0
        self._lock = threading.Lock()
        work = self._work if self.batch is None else self._dispatch
        self._thread = threading.Thread(target=work, name="codetune-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        """The most positions a request's prompt + max_tokens may take."""
        return max_context(self.model) if self.batch is None else min(max_context(self.model), self.batch.length)

    def describe(self) -> str:
        return self.batch.describe() if self.batch is not None else self.decoder.describe()

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
        if self.batch is not None:
            self._rows.release()  # the dispatcher may be waiting for a row before it reads the queue
        self._thread.join(timeout=30)
        if self.batch is not None:
            self.batch.close()

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
            self._finish(job, result, error)

    def _finish(self, job: Job, result: list[Completion] | None, error: Exception | None) -> None:
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

    def _choice(self, job: Job, i: int, decoder) -> Completion:
        on_text = None if job.on_text is None else (lambda piece: job.on_text(i, piece))
        return generate_text(self.model, self.tokenizer, job.prompts[i], job.params[i], on_text=on_text,
                             cancelled=job.cancel.is_set, decoder=decoder)

    def _run(self, job: Job) -> list[Completion]:
        out = []
        for i in range(len(job.prompts)):
            out.append(self._choice(job, i, self.decoder))
            if job.cancel.is_set():
                break
        return out

    def _dispatch(self) -> None:
        """The batching worker: a job is taken up once a row is free; each choice runs in its own thread
        (taking a row each), and the last one to end answers the job."""
        while True:
            self._rows.acquire()  # held for the next job's first choice
            job = self._jobs.get()
            if job is None:
                return
            if not job.started.set_running_or_notify_cancel():
                self._rows.release()
                continue  # withdrawn while it waited, and counted out then
            job.started.set_result(None)
            run = _BatchedJob(job, len(job.prompts))
            for i in range(len(job.prompts)):
                if i:
                    self._rows.acquire()
                threading.Thread(target=self._run_choice, args=(run, i), name="codetune-choice",
                                 daemon=True).start()

    def _run_choice(self, run: _BatchedJob, i: int) -> None:
        result, error = None, None
        decoder = self.batch.decoder()
        try:
            if not run.job.cancel.is_set():  # else the client left before this choice began
                result = self._choice(run.job, i, decoder)
        except Exception as e:  # noqa: BLE001 - the job's waiting request answers 500 with it
            error = e
        finally:
            decoder.release()
            self._rows.release()
        if run.done(i, result, error):
            self._finish(run.job, run.completions(), run.error)


@dataclass
class _BatchedJob:
    """A job's choices running in the batch: their completions as they end, and whether all have."""
    job: Job
    left: int
    results: dict[int, Completion] = field(default_factory=dict)
    error: Exception | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, i: int, result: Completion | None, error: Exception | None) -> bool:
        """Record choice i's end; True for the last one."""
        with self.lock:
            if result is not None:
                self.results[i] = result
            self.error = self.error or error
            self.left -= 1
            return self.left == 0

    def completions(self) -> list[Completion] | None:
        """In choice order; None where none ran (the client left before any began), as the one-at-a-time
        worker gives; choices the client left before are left out, as that worker leaves them unrun."""
        if self.error is not None or not self.results:
            return None
        return [self.results[i] for i in sorted(self.results)]
