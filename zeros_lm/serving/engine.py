"""The scheduler: continuous batching of streams over one model, in one thread.

Every step of the loop

1. admits queued jobs (requests) while the streams in flight stay within ``max_batch``;
2. prefills: reads up to ``prefill_budget`` prompt tokens in all, job after job in queue order, so that a long
   prompt is read over several steps and never stalls the streams that are decoding. The pieces read in one
   step go through one batched forward (two when some continue a cache, a session's state or the earlier
   pieces of a long prompt, and some start from nothing: :meth:`ZeroSCache.stack` joins only caches that have
   read a token; more only where one would be mostly padding: :func:`padded_batches`), padded to the longest
   with ``attention_mask`` (:meth:`Engine._read_pieces` says which side);
   a job whose prompt is read samples its first token(s) from its row's logits, forks its state for
   ``n > 1``, and its streams join the batch with their rows of the forward's cache;
3. decodes: one forward of every joined stream's last token through the batched cache (one row per stream;
   :meth:`ZeroSCache.stack <zeros_lm.cache_zeros.ZeroSCache.stack>` joins rows, each slot type its own entries,
   softmax layers' KV of ragged lengths left-padded and masked), then samples each row;
4. lets finished, stopped and cancelled streams leave at once (:meth:`ZeroSCache.drop_rows`: the last rows
   take the leavers' places, the others stay where they are); a session's stream leaves with a copy of its state
   (:meth:`ZeroSCache.take_rows`), which goes back to the session store.

The batch's tensors are the engine's alone (``ZeroSCache.in_place_updates``): a decoded token's ZeroS state is
written over the last one's, joining rows are written after the batch's in buffers of ``max_batch`` rows, and
leaving rows are filled by others; only the rows that join or move are copied, never the whole batch.

Jobs talk to their request through ``sink(event)`` (called from this thread): ``("delta", index, text)``,
``("finish", index, reason)``, ``("end", usage)`` or ``("error", message)``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Callable

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from zeros_lm.cache_zeros import ZeroSCache

from .sessions import SessionState

logger = logging.getLogger("zeros_lm.serve")

REPLACEMENT_CHAR = "\ufffd"  # what decode() shows for the bytes of an unfinished UTF-8 character
IDLE_WAIT_S = 0.5
POLL_S = 0.02
PAD_TOKEN_ID = 0  # what a batched prefill's padding columns hold: any id will do, attention_mask masks them
MAX_PADDED_SHARE = 0.5  # of a prefill forward's columns, at most this share padding (padding costs as real tokens)
TRIM_INTERVAL_S = 2.0  # while busy, how often the engine gives the heap's free pages back (malloc_trim)


def _glibc():
    """The C library when it is glibc (its malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):
        return None


_GLIBC = _glibc()
_M_ARENA_MAX = -8  # glibc's mallopt parameter: how many heaps ("arenas") threads may spread over
HEAP_ARENAS = 2  # the server's threads (engine, event loop, thread pool) share two


def limit_heap_arenas(arenas: int = HEAP_ARENAS) -> None:
    """Let the process's threads share at most ``arenas`` C heaps (glibc; elsewhere, or when the environment
    sets MALLOC_ARENA_MAX, nothing). Call it before the threads start. With one heap per thread (glibc's
    default, up to 8 per core) each heap keeps its own free space between the steps' temporaries: over a
    170-second soak (benchmarks/serve.py --soak) the server's memory grew by 45%, with two heaps by 35%."""
    if _GLIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _GLIBC.mallopt(_M_ARENA_MAX, arenas)


def return_free_memory() -> None:
    """Give the free pages of the C heap back to the system (glibc; elsewhere nothing). The steps' temporaries
    leave holes between the states that stay (idle sessions); without this the server keeps them: about 10%
    more memory than the idle sessions' states."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def padded_batches(pieces: list[tuple["Job", int]]) -> list[list[tuple["Job", int]]]:
    """The prefill pieces (job, tokens) split into as few forwards as keep each one's padding (every row
    padded to its longest piece) within ``MAX_PADDED_SHARE`` of its columns: usually one; a long prompt's piece
    and many short ones go apart (one forward would read the short ones at the long one's width). Longest first."""
    batches: list[list[tuple[Job, int]]] = []
    width = real = 0
    for job, take in sorted(pieces, key=lambda p: -p[1]):
        if batches and (len(batches[-1]) + 1) * width * (1 - MAX_PADDED_SHARE) <= real + take:
            batches[-1].append((job, take))
            real += take
        else:
            batches.append([(job, take)])
            width = real = take
    return batches


class TextStream:
    """The text of one generated sequence, decoded as its tokens come: each token decodes only a window of the
    last few tokens (the tokens since the last complete text, after those before it as context), not the whole
    sequence, whose decode grows with its length (0.8 ms a token at 2,000 tokens on a 2-core CPU, for every
    stream at every step). What an unfinished UTF-8 character's bytes decode to, and what may be the beginning
    of a stop string, are held back until the text goes on (or the sequence ends)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self._longest_stop = max((len(s) for s in stop), default=1)
        self.text = ""  # the complete text so far
        self.sent = 0  # characters of it given out
        self._context = 0  # tokens[_context:_done] are the window's context: they decode to the end of text
        self._done = 0  # tokens[:_done] are in text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """tokens: the whole sequence, one token longer than at the last call; final: it ends here (whatever
        is held back goes out). Returns (the text to send now, whether a stop string ended the text)."""
        context = self._decode(tokens[self._context : self._done])
        window = self._decode(tokens[self._context :])
        start = len(self.text)
        if len(window) > len(context) and (final or not window.endswith(REPLACEMENT_CHAR)):
            self.text += window[len(context) :]
            self._context, self._done = self._done, len(tokens)
        end = len(self.text)
        # a stop string the text did not hold before overlaps the new text: search only from there
        hits = [i for i in (self.text.find(s, max(0, start - self._longest_stop + 1)) for s in self.stop) if i >= 0]
        stopped = bool(hits)
        if stopped:
            end = min(hits)
        elif not final:
            for s in self.stop:  # hold back what may begin a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, stopped


class Overloaded(Exception):
    """The queue is full (HTTP 429)."""


class Unavailable(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature == 0:  # greedy: no warper
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


class Choice:
    """One generated sequence of a job: one row of the batch once it has joined."""

    def __init__(self, job: "Job", index: int):
        self.job = job
        self.index = index
        seed = job.params.seed + index if job.params.seed is not None else torch.seed()
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []  # generated
        self.fed = 0  # generated tokens read into the state
        self.text: TextStream | None = None  # its text, made by the engine with its first token
        self.next_token: int | None = None
        self.finish_reason: str | None = None
        self.logits: list[torch.Tensor] | None = [] if job.record_logits else None
        self.last_time = 0.0


class Job:
    """One request: its prompt tokens, sampling parameters, streams and (optionally) session."""

    _ids = itertools.count()

    def __init__(self, input_ids: list[int], params: SamplingParams, sink: Callable[[tuple], None], *,
                 session_id: str | None = None, session: SessionState | None = None, record_logits: bool = False):
        if not input_ids:
            raise ValueError("a job needs at least one token to read")
        self.id = next(self._ids)
        self.input_ids = list(input_ids)
        self.params = params
        self.sink = sink
        self.session_id = session_id
        self.session = session  # the state it continues (its pending tokens are input_ids' first ones)
        self.cached_tokens = session.read if session is not None else 0
        # the state its prompt continues (None: it starts from nothing); after each prefill, its own row
        self.cache = session.cache if session is not None else None
        self.record_logits = record_logits
        self.warpers = params.warpers()
        self.read = 0  # input_ids read so far
        self.cancelled = False
        self.choices = [Choice(self, i) for i in range(params.n)]
        self.finished = 0
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + len(self.input_ids)

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def session_state(self, choice: Choice, cache: ZeroSCache | None) -> SessionState:
        """The session after this choice: its history so far, of which what the cache has read."""
        before = self.session.history[: self.session.read] if self.session is not None else torch.empty(0)
        history = torch.cat([before.to(torch.int32), SessionState.tokens(self.input_ids + choice.tokens)])
        read = self.cached_tokens + self.read + choice.fed
        return SessionState(cache if read else None, history, read)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 64, prefill_budget: int = 512,
                 sessions=None, metrics=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.sessions = sessions
        self.metrics = metrics
        self.device = model.device
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []
        self._joining: list[Choice] = []  # streams whose prompt this step read: they join the batch
        self._joining_caches: list[ZeroSCache] = []  # their states: these caches' rows, in order, are theirs
        self._rows: list[Choice] = []  # the batch's rows, in order
        self._batch: ZeroSCache | None = None
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._trimmed = time.monotonic()  # when the heap's free pages last went back

    # -- the request side (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zeros-lm-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._draining:
                raise Unavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests wait for a slot)")
            self._waiting.append(job)
            self._cond.notify()
        self._gauge()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._joining or self._rows)

    @property
    def in_flight(self) -> int:
        """Streams admitted (prefilling or decoding)."""
        return sum(j.params.n for j in self._prefilling) + len(self._joining) + len(self._rows)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new jobs from now on (the ones in flight go on)."""
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 30.0) -> None:
        """Drain: refuse new jobs, let the running ones finish (cancel them after ``timeout``), end the thread."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self.busy:
            logger.warning("drain timed out: cancelling the streams still running")
            with self._cond:
                for job in list(self._waiting) + self._prefilling + [c.job for c in self._joining + self._rows]:
                    job.cancelled = True
                self._cond.notify()
            while self.busy and self._thread is not None and self._thread.is_alive():
                time.sleep(POLL_S)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.busy:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stopping and not self.busy:
                    return
                self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # noqa: BLE001 - fail the jobs in flight, keep serving
                logger.exception("engine step failed")
                self._fail_all(f"the model failed: {' '.join(str(e).split())[:300]}")
            self._gauge()
            now = time.monotonic()
            # the heap's free pages go back when the last stream has left, and every TRIM_INTERVAL_S while
            # streams keep coming (a server that is never idle would otherwise keep every hole it ever had)
            if not self.busy or now - self._trimmed > TRIM_INTERVAL_S:
                return_free_memory()
                self._trimmed = now

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                self._cancelled_before_start(job)
                continue
            if self.in_flight and self.in_flight + job.params.n > self.max_batch:
                break
            self._waiting.popleft()
            self._prefilling.append(job)

    def _step(self) -> None:
        self._leave()  # streams cancelled since the last step
        self._drop_cancelled_prefills()
        self._prefill()
        if self._joining:
            # the joining rows go after the batch's, in buffers of max_batch rows: the batch's rows are not copied
            self._batch = ZeroSCache.stack(([self._batch] if self._batch is not None else []) + self._joining_caches,
                                           capacity=self.max_batch)
            self._rows += self._joining
            self._joining, self._joining_caches = [], []
        if self._rows:
            # nothing but the engine reads the batch's states (a session leaves with a copy of its rows): the
            # decode step may write them in place (one pass less over every state a step), and streams join and
            # leave over its tensors
            self._batch.in_place_updates = True
            self._decode()
        self._leave()

    def _prefill(self) -> None:
        """Read this step's pieces of the prompts: up to ``prefill_budget`` tokens, job after job in queue order,
        each taking what is left of the budget or of its prompt; the jobs that start from nothing in one
        forward, those that continue a cache in another (each split further only where one forward would be
        mostly padding: :func:`padded_batches`)."""
        budget = self.prefill_budget
        pieces: list[tuple[Job, int]] = []  # (job, how many of its tokens to read)
        for job in self._prefilling:
            if budget <= 0:
                break
            take = min(budget, len(job.input_ids) - job.read)
            pieces.append((job, take))
            budget -= take
        fresh = [(job, take) for job, take in pieces if job.cache is None or job.cache.num_tokens is None]
        going_on = [(job, take) for job, take in pieces if job.cache is not None and job.cache.num_tokens is not None]
        for group, is_fresh in ((fresh, True), (going_on, False)):
            for batch in padded_batches(group):
                self._read_pieces(batch, fresh=is_fresh)

    def _read_pieces(self, pieces: list[tuple[Job, int]], *, fresh: bool) -> None:
        """One forward of the jobs' next pieces (row i: ``pieces[i]``), padded to the longest; then each job
        either keeps its row of the cache for its next piece, or (its prompt read) starts: its streams' first
        tokens come from its row's logits and they join with its row (``fresh``: no job has read a token).

        Where the padding goes: a row that continues a cache is padded on the RIGHT. Its new real tokens must
        follow its history directly: a short convolution (``conv_size``) zeroes padding inputs, so padding
        between the history and the new tokens would put zeros in their windows (and its state is gathered
        from the last real inputs, wherever they sit); ZeroS and linear attention skip padding anywhere and
        softmax attention masks it (its padded keys are kept, marked not valid). Rows that start from nothing
        are padded on the LEFT: there the padding reads as the zero history of an unpadded row (the
        convolution's windows included), and a softmax layer's padded keys lead the row, as in the decode
        batch (:meth:`ZeroSCache.stack`), rather than sit between its prompt and its generated tokens, when
        the whole cache joins that batch (:meth:`ZeroSCache.take_rows`, which the other rows go through,
        drops the columns no row uses wherever they are). Each row's logits are those of its last real column.
        """
        jobs = [job for job, _ in pieces]
        B, T = len(pieces), max(take for _, take in pieces)
        ids = torch.full((B, T), PAD_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        last = []  # each row's last real column
        for i, (job, take) in enumerate(pieces):
            start = T - take if fresh else 0
            ids[i, start : start + take] = torch.tensor(job.input_ids[job.read : job.read + take])
            mask[i, start : start + take] = 1
            last.append(start + take - 1)
        cache = ZeroSCache(self.model.config) if fresh else ZeroSCache.stack([job.cache for job in jobs])
        hidden = self.model.base_model(ids.to(self.device), attention_mask=mask.to(self.device), cache=cache,
                                       use_cache=True).last_hidden_state  # (B, T, hidden), after the final norm
        # ZeroSForCausalLM.forward applies its head to these hidden states and nothing else: here to one column a row
        rows = torch.arange(B, device=hidden.device)
        logits = self.model.get_output_embeddings()(hidden[rows, torch.tensor(last, device=hidden.device)])  # (B, V)

        joining_rows: list[int] = []  # the rows of cache the joining streams take, in order (a fork repeats its row)
        for i, (job, take) in enumerate(pieces):
            job.read += take
            if self.metrics is not None:
                self.metrics.prefill_tokens.inc(take)
            if job.read < len(job.input_ids):
                job.cache = cache if B == 1 else cache.take_rows([i])
                continue
            self._prefilling.remove(job)
            job.cache = None
            joining = self._start(job, logits[i : i + 1], lambda i=i: cache.take_rows([i]))
            self._joining += joining
            joining_rows += [i] * len(joining)
        if joining_rows:  # the whole cache, when every row joins once (no copy)
            self._joining_caches.append(cache if joining_rows == list(range(B)) else cache.take_rows(joining_rows))

    def _start(self, job: Job, logits: torch.Tensor, own_state: Callable[[], ZeroSCache]) -> list[Choice]:
        """The prompt is read: every choice samples its first token from the job's logits (1, V). Returns the
        choices that go on (each joins with its own copy of the job's state); a session's first choice that
        ends here keeps a copy made by ``own_state``."""
        joining = []
        for choice in job.choices:
            (token,) = self._sample([choice], logits)
            self._emit(choice, token)
            if choice.finish_reason is None:
                joining.append(choice)
            else:
                self._finish(choice, own_state() if job.session_id is not None and choice.index == 0 else None)
        return joining

    def _decode(self) -> None:
        ids = torch.tensor([[c.next_token] for c in self._rows], dtype=torch.long, device=self.device)
        out = self.model(ids, cache=self._batch, use_cache=True, logits_to_keep=1)
        if self.metrics is not None:
            self.metrics.decode_steps.inc()
            self.metrics.batch_size.observe(len(self._rows))
        for c in self._rows:
            c.fed += 1
        for c, token in zip(self._rows, self._sample(self._rows, out.logits[:, -1])):
            if not c.job.cancelled:
                self._emit(c, token)

    def _leave(self) -> None:
        leaving = [i for i, c in enumerate(self._rows) if c.finish_reason is not None or c.job.cancelled]
        if not leaving:
            return
        for i in leaving:
            c = self._rows[i]
            if c.job.session_id is not None and c.index == 0:
                self._finish(c, self._batch.take_rows([i]))
            else:
                self._finish(c, None)
        if len(leaving) == len(self._rows):
            self._batch, self._rows = None, []
            return
        # the batch is the engine's alone (in_place_updates): the rows that stay are not copied, the last ones
        # fill the leavers' places
        self._batch, order = self._batch.drop_rows(leaving)
        self._rows = [self._rows[i] for i in order]

    def _drop_cancelled_prefills(self) -> None:
        for job in [j for j in self._prefilling if j.cancelled]:
            self._prefilling.remove(job)
            if self.metrics is not None:
                self.metrics.cancelled_streams.inc(job.params.n)
            if job.session_id is not None:  # what it has read so far stays in the session
                self.sessions.release(job.session_id, job.session_state(job.choices[0], job.cache))

    def _cancelled_before_start(self, job: Job) -> None:
        if self.metrics is not None:
            self.metrics.cancelled_streams.inc(job.params.n)
        if job.session_id is not None:
            self.sessions.release(job.session_id, job.session)

    # -- sampling and text ------------------------------------------------------------------------------
    def _sample(self, choices: list[Choice], logits: torch.Tensor) -> list[int]:
        """One token per choice from its row of logits (B, V)."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        if len(greedy) != len(choices):  # the first tokens of a job's choices share one row
            greedy = greedy * len(choices)
            logits = logits.expand(len(choices), -1)
        tokens = []
        for i, c in enumerate(choices):
            if c.logits is not None:
                c.logits.append(logits[i].cpu().clone())
            if c.job.params.temperature == 0:
                tokens.append(greedy[i])
                continue
            scores = c.job.warpers(None, logits[i : i + 1])
            probs = torch.softmax(scores, dim=-1).cpu()
            tokens.append(int(torch.multinomial(probs, 1, generator=c.generator)))
        return tokens

    def _emit(self, choice: Choice, token: int) -> None:
        """Record a sampled token, send the text it completes, and decide whether the stream ends."""
        job, now = choice.job, time.perf_counter()
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
            if choice.tokens:
                self.metrics.inter_token.observe(now - choice.last_time)
            elif job.first_token_time is None:
                self.metrics.time_to_first_token.observe(now - job.arrival)
        if job.first_token_time is None:
            job.first_token_time = now
        choice.last_time = now
        choice.tokens.append(token)
        if choice.text is None:
            choice.text = TextStream(self.tokenizer, job.params.stop)
        eos, at_length = token in self.eos_ids, len(choice.tokens) >= job.params.max_tokens
        piece, stopped = choice.text.push(choice.tokens, final=eos or at_length)
        reason = "stop" if eos or stopped else "length" if at_length else None
        if piece:
            job.sink(("delta", choice.index, piece))
        if reason is None:
            choice.next_token = token
        else:
            choice.finish_reason = reason

    def _finish(self, choice: Choice, cache: ZeroSCache | None) -> None:
        job = choice.job
        if choice.finish_reason is None:  # cancelled
            choice.finish_reason = "cancelled"
            if self.metrics is not None:
                self.metrics.cancelled_streams.inc()
        job.sink(("finish", choice.index, choice.finish_reason))
        if job.session_id is not None and choice.index == 0:
            self.sessions.release(job.session_id, job.session_state(choice, cache))
        job.finished += 1
        if job.finished == job.params.n:
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(job.prompt_tokens)
                self.metrics.cached_tokens.inc(job.cached_tokens)
            job.sink(("end", job.usage()))

    def _fail_all(self, message: str) -> None:
        jobs = {id(j): j for j in self._prefilling + [c.job for c in self._joining + self._rows]}
        self._prefilling, self._joining, self._joining_caches, self._rows, self._batch = [], [], [], [], None
        for job in jobs.values():
            if job.session_id is not None:  # its state went with the batch: the state file, if any, remains
                self.sessions.release(job.session_id, None)
            job.sink(("error", message))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.active_streams.set(self.in_flight)
            self.metrics.waiting_requests.set(len(self._waiting))
            batch = self._batch
            self.metrics.active_state_bytes.set(batch.nbytes if batch is not None else 0)
