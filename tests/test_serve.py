"""``zeros-lm serve``: greedy output equals model.generate (alone, batched, in a session, after a restart),
the official openai client, disconnects, errors, overload, metrics, SIGTERM. Loopback only."""

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import tiny_model

from zeros_lm.cache_zeros import SoftmaxLayerState
from zeros_lm.cli.serve import build_server, parse_args
from zeros_lm.serving.engine import (MAX_PADDED_SHARE, REPLACEMENT_CHAR, Engine, Job, SamplingParams, TextStream,
                                     padded_batches)
from zeros_lm.serving.sessions import SessionState

KINDS = {  # name -> (attention_type, config overrides)
    "zeros": ("zeros", {}),
    "softmax": ("softmax", {}),
    "linear": ("linear", {}),
    "hybrid_conv": ("zeros", {"softmax_every": 2, "conv_size": 3}),
}
OUTPUT_SCALE = 0.3  # std of the mixers' output projections: large enough that the mixer's state shapes the logits
START_TIMEOUT_S = 60
LOGITS_ATOL = 1e-4


def _model(kind, seed=3):
    attention_type, overrides = KINDS[kind]
    model = tiny_model(attention_type, seed=seed, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.o_proj.weight.normal_(0.0, OUTPUT_SCALE)
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve_models")
    dirs = {}
    for kind in KINDS:
        _model(kind).save_pretrained(root / kind)
        tiny_tokenizer.save_pretrained(root / kind)
        dirs[kind] = root / kind
    # for streams that must run until they are stopped: no end-of-text token
    endless = tiny_model("zeros", seed=3, eos_token_id=None)
    endless.save_pretrained(root / "endless")
    tiny_tokenizer.save_pretrained(root / "endless")
    dirs["endless"] = root / "endless"
    return dirs


@contextlib.contextmanager
def serving(model_dir, *options):
    """A server on an ephemeral loopback port, in a thread; shut down (drained) on exit."""
    server, app = build_server(parse_args([str(model_dir), "--port", "0", "--log-level", "warning", *options]))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not shut down"


def _reference(model, ids, max_tokens):
    """Greedy continuation of ids by model.generate (stops at eos, as the server does)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=1)
    return out[0, len(ids):].tolist()


def _complete(client, prompt, max_tokens, **extra):
    res = client.post("/v1/completions", json={"model": _name(client), "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, **extra})
    assert res.status_code == 200, res.text
    return res.json()


_NAMES = {}


def _name(client):
    if client not in _NAMES:
        _NAMES[client] = client.get("/v1/models").json()["data"][0]["id"]
    return _NAMES[client]


def _stream_text(client, body):
    """The text of a streamed completion, and its events."""
    text, events = "", []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as res:
        assert res.status_code == 200
        for line in res.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if events[-1] != "[DONE]":
                    text += "".join(c["text"] for c in json.loads(events[-1])["choices"])
    return text, events


# -------------------------------------------------------------------------------------------------------
# The engine: logits and tokens of streams joining and leaving a batch equal model.generate's
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_engine_batched_streams_match_generate(kind, tiny_tokenizer):
    """Eight streams of different lengths join (a small prefill budget spreads their prompts over several
    steps) and leave (different max_tokens) at different steps; each one's logits and greedy tokens are
    those of model.generate on it alone."""
    model = _model(kind)
    engine = Engine(model, tiny_tokenizer, max_batch=8, prefill_budget=7)
    engine.start()
    g = torch.Generator().manual_seed(0)
    jobs = []
    try:
        for length, max_tokens in [(5, 9), (17, 4), (3, 12), (30, 7), (8, 1), (12, 10), (2, 6), (21, 3)]:
            ids = torch.randint(2, 320, (length,), generator=g).tolist()
            events = queue.Queue()
            job = Job(ids, SamplingParams(max_tokens=max_tokens, temperature=0), events.put, record_logits=True)
            engine.submit(job)
            jobs.append((ids, max_tokens, job, events))
            time.sleep(0.003)  # later ones arrive while the first decode
        for ids, max_tokens, job, events in jobs:
            while events.get(timeout=60)[0] != "end":
                pass
            ref = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=1,
                                 output_logits=True, return_dict_in_generate=True)
            choice = job.choices[0]
            assert choice.tokens == ref.sequences[0, len(ids):].tolist()
            for got, want in zip(choice.logits, ref.logits, strict=True):
                torch.testing.assert_close(got, want[0], atol=LOGITS_ATOL, rtol=0)
    finally:
        engine.stop()
    assert max(len(j[2].choices[0].tokens) for j in jobs) > 1


class _SessionsSeen:
    """A session store that only records what the engine hands back."""

    def __init__(self):
        self.released = {}

    def release(self, session_id, state):
        self.released[session_id] = state


@pytest.mark.parametrize("kind", list(KINDS))
def test_engine_prefills_the_pieces_of_one_step_in_one_forward(kind, tiny_tokenizer):
    """Seven jobs admitted together: in the first step four fresh prompts of very different lengths (the longest
    only partly read) go through one forward; in the second, the long prompt's rest and two sessions' continuations
    (states that have read tokens) through another, and a fresh prompt through a third. Every stream's logits and
    greedy tokens are those of model.generate on its whole text, and the sessions come back with their state."""
    model = _model(kind)
    sessions = _SessionsSeen()
    engine = Engine(model, tiny_tokenizer, max_batch=8, prefill_budget=32, sessions=sessions)
    g = torch.Generator().manual_seed(1)
    base_forward, decode = model.model.forward, engine._decode
    forwards, decodes = [], []
    # (prompt length, tokens its session has already read or None, max_tokens, n)
    specs = [(2, None, 5, 1), (13, None, 3, 1), (1, None, 4, 2), (30, None, 3, 1), (3, 9, 4, 1), (8, 4, 6, 1),
             (5, None, 4, 1)]
    jobs = []
    try:
        for i, (length, read, max_tokens, n) in enumerate(specs):
            ids = torch.randint(2, 320, ((read or 0) + length,), generator=g).tolist()
            session = session_id = None
            if read is not None:
                with torch.no_grad():
                    cache = model(torch.tensor([ids[:read]]), use_cache=True).cache
                session, session_id = SessionState(cache, SessionState.tokens(ids[:read]), read), f"s{i}"
            events = queue.Queue()
            job = Job(ids[read or 0:], SamplingParams(max_tokens=max_tokens, temperature=0, n=n), events.put,
                      session_id=session_id, session=session, record_logits=True)
            engine.submit(job)
            jobs.append((ids, max_tokens, job, events))
        model.model.forward = lambda *a, **kw: forwards.append(1) or base_forward(*a, **kw)
        engine._decode = lambda: decodes.append(1) or decode()
        engine.start()  # admits them all at once
        for ids, max_tokens, job, events in jobs:
            while events.get(timeout=60)[0] != "end":
                pass
    finally:
        engine.stop()
        model.model.forward = base_forward
    assert len(forwards) - len(decodes) == 3  # prefill forwards, for seven jobs
    for ids, max_tokens, job, _ in jobs:
        ref = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=1,
                             output_logits=True, return_dict_in_generate=True)
        for choice in job.choices:
            assert choice.tokens == ref.sequences[0, len(ids):].tolist()
            for got, want in zip(choice.logits, ref.logits, strict=True):
                torch.testing.assert_close(got, want[0], atol=LOGITS_ATOL, rtol=0)
        if job.session_id is not None:
            state = sessions.released[job.session_id]
            assert state.history.tolist() == ids + job.choices[0].tokens
            assert state.read == len(ids) + job.choices[0].fed == int(state.cache.num_tokens[0])
            for slot in state.cache.layer_states:  # the prefill's padding has not stayed in its keys
                assert not isinstance(slot, SoftmaxLayerState) or bool(slot.valid.all())


def test_prefill_pieces_split_only_where_one_forward_would_be_mostly_padding():
    similar = [(f"job{i}", 12 + i % 2) for i in range(32)]
    assert padded_batches(similar) == [sorted(similar, key=lambda p: -p[1])]  # one forward, longest first
    mixed = [("short0", 1), ("long", 30), *[(f"short{i}", 1) for i in range(1, 6)], ("mid", 9)]
    batches = padded_batches(mixed)
    assert sorted(p for b in batches for p in b) == sorted(mixed)
    assert 1 < len(batches) < len(mixed)
    for batch in batches:
        width = max(take for _, take in batch)
        assert sum(take for _, take in batch) >= (1 - MAX_PADDED_SHARE) * width * len(batch)


# -------------------------------------------------------------------------------------------------------
# Text: decoded a window at a time, unfinished characters and stop strings held back
# -------------------------------------------------------------------------------------------------------

TEXT = "def café(x):\n    return '漢字 ü 🙂' * x  # naïve\n" * 12


def _push_all(stream, ids):
    pieces = [stream.push(ids[: i + 1], final=i == len(ids) - 1) for i in range(len(ids))]
    return [p for p, _ in pieces], [stopped for _, stopped in pieces]


def test_text_stream_equals_the_whole_decode_and_decodes_only_a_window(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT).input_ids
    lengths = []
    decode = tiny_tokenizer.decode

    class Counting:
        def decode(self, tokens, **kw):
            lengths.append(len(tokens))
            return decode(tokens, **kw)

    pieces, stopped = _push_all(TextStream(Counting(), ()), ids)
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any(REPLACEMENT_CHAR in p for p in pieces)  # a character split over tokens goes out whole
    assert any(p == "" for p in pieces[:-1])  # (and this text has such characters)
    assert not any(stopped)
    assert len(ids) > 300 and max(lengths) <= 8  # a window of a few tokens, not the sequence so far


def test_text_stream_ends_at_a_stop_string_and_holds_back_its_beginning(tiny_tokenizer):
    text = "alpha beta\nUser: gamma delta"
    ids = tiny_tokenizer(text).input_ids
    stream = TextStream(tiny_tokenizer, ("\nUser:", "zzz"))
    sent, stopped_at = "", None
    for i in range(len(ids)):
        piece, stopped = stream.push(ids[: i + 1], final=False)
        sent += piece
        assert "\n" not in sent  # "\n" may begin the stop string: it is never sent
        if stopped:
            stopped_at = i
            break
    assert sent == "alpha beta" and stopped_at is not None
    assert tiny_tokenizer.decode(ids[: stopped_at + 1]).endswith(("User:", "User: "))
    # at the end of the sequence what was held back goes out
    tail = TextStream(tiny_tokenizer, ("\nUser:",))
    pieces, stopped = _push_all(tail, tiny_tokenizer("alpha\nUs").input_ids)
    assert "".join(pieces) == "alpha\nUs" and not any(stopped)


# -------------------------------------------------------------------------------------------------------
# Over HTTP: alone, batched, in a session, after a restart
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_served_greedy_equals_generate(kind, model_dirs, tiny_tokenizer, tmp_path):
    model = _model(kind)
    enc = tiny_tokenizer
    prompts = ["def wrap(text, width=70):", "x", "class Template:\n    delimiter = '$'\n", "import re\n" * 5,
               "    return", "# Copyright 2001", "lines = []\nfor", "a, b = 1, 2"]
    state_dir = tmp_path / "states"
    with serving(model_dirs[kind], "--state-dir", str(state_dir), "--max-sessions", "1") as (client, _):
        # alone
        body = _complete(client, prompts[0], 9)
        ids = enc(prompts[0]).input_ids
        assert body["choices"][0]["text"] == enc.decode(_reference(model, ids, 9), skip_special_tokens=True)
        assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

        # eight at once, of different lengths, streamed
        results = [None] * len(prompts)

        def one(i):
            results[i] = _stream_text(client, {"model": _name(client), "prompt": prompts[i], "max_tokens": 3 + 2 * i,
                                               "temperature": 0})[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            want = enc.decode(_reference(model, enc(p).input_ids, 3 + 2 * i), skip_special_tokens=True)
            assert results[i] == want, f"prompt {i}"

        # a session across two requests: the second reads only its new text
        first = _complete(client, prompts[2], 6, session_id="s1")
        history = enc(prompts[2]).input_ids + _reference(model, enc(prompts[2]).input_ids, 6)
        assert len(history) == len(enc(prompts[2]).input_ids) + 6, "the reference stopped early"
        second = _complete(client, " more", 6, session_id="s1")
        new = enc(" more", add_special_tokens=False).input_ids
        want = _reference(model, history + new, 6)
        assert second["choices"][0]["text"] == enc.decode(want, skip_special_tokens=True)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history) - 1  # the last is pending
        assert second["usage"]["prompt_tokens"] == len(history) + len(new)
        assert first["session_id"] == second["session_id"] == "s1"
        history = history + new + want
        # another session pushes s1 out of memory (--max-sessions 1): it waits in its state file
        _complete(client, "y", 2, session_id="s2")
        assert (state_dir / "s1.state").is_file()
        assert client.get("/v1/sessions/s1").json()["where"] == "disk"

    # a restart: the session comes back from its state file
    with serving(model_dirs[kind], "--state-dir", str(state_dir)) as (client, _):
        third = _complete(client, "\nend", 5, session_id="s1")
        new = enc("\nend", add_special_tokens=False).input_ids
        want = _reference(model, history + new, 5)
        assert third["choices"][0]["text"] == enc.decode(want, skip_special_tokens=True)
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history) - 1


def test_an_idle_session_is_parked_in_one_block_of_its_size():
    """SessionState.parked copies the state and history into one mapping (no allocator holes between them)."""
    from zeros_lm.serving.sessions import PARK_ALIGN, SessionState

    model = _model("hybrid_conv")
    with torch.no_grad():
        cache = model(torch.randint(2, 300, (1, 9)), use_cache=True).cache
    state = SessionState(cache, SessionState.tokens(list(range(10))), 9)
    parked = state.parked()
    before, after = [state.history], [parked.history]
    state.cache.map(lambda x: before.append(x) or x)
    parked.cache.map(lambda x: after.append(x) or x)
    assert len(before) == len(after) > 10
    for x, y in zip(before, after):
        assert torch.equal(x, y) and x.dtype == y.dtype and x.data_ptr() != y.data_ptr()
    (storage,) = {y.untyped_storage().data_ptr() for y in after}  # one block ...
    assert after[0].untyped_storage().nbytes() <= state.nbytes + len(after) * PARK_ALIGN  # ... of the state's size
    assert parked.cache.seen_tokens == cache.seen_tokens and parked.read == 9


def test_chat_session_reuses_only_a_matching_state(model_dirs, tiny_tokenizer):
    """A chat conversation re-sent whole reuses the state when it starts with exactly what the state read, and
    is read afresh when it does not; both answer as model.generate on the conversation's tokens."""
    from zeros_lm.serving.app import render_plain_chat
    from zeros_lm.serving.protocol import ChatMessage

    model, enc = _model("zeros"), tiny_tokenizer

    def tokens(messages):
        return enc(render_plain_chat([ChatMessage(**m) for m in messages])).input_ids

    with serving(model_dirs["zeros"]) as (client, _):
        def chat(messages, **extra):
            res = client.post("/v1/chat/completions", json={"model": _name(client), "messages": messages,
                                                            "max_tokens": 5, "temperature": 0, **extra})
            assert res.status_code == 200, res.text
            return res.json()

        turn1 = [{"role": "user", "content": "def main():"}]
        a1 = chat(turn1, session_id="c")
        reply = a1["choices"][0]["message"]["content"]
        assert reply == enc.decode(_reference(model, tokens(turn1), 5), skip_special_tokens=True)
        history = tokens(turn1) + _reference(model, tokens(turn1), 5)
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "return 0"}]
        a2 = chat(turn2, session_id="c")
        conv = tokens(turn2)
        matches = conv[: len(history)] == history
        assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(history) - 1 if matches else 0)
        assert a2["choices"][0]["message"]["content"] == enc.decode(_reference(model, conv, 5), skip_special_tokens=True)
        # an edited conversation does not match the state: read afresh
        edited = [{"role": "user", "content": "def other():"}] + turn2[1:]
        a3 = chat(edited, session_id="c")
        assert a3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert a3["choices"][0]["message"]["content"] == enc.decode(_reference(model, tokens(edited), 5),
                                                                    skip_special_tokens=True)


# -------------------------------------------------------------------------------------------------------
# Clients, disconnects, errors, overload, metrics
# -------------------------------------------------------------------------------------------------------


def test_openai_client_streams_completion_and_chat(model_dirs):
    import openai

    with serving(model_dirs["zeros"]) as (client, _):
        oa = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
        name = oa.models.list().data[0].id
        whole = oa.completions.create(model=name, prompt="def f(x):", max_tokens=8, temperature=0)
        pieces = [c.choices[0].text for c in oa.completions.create(model=name, prompt="def f(x):", max_tokens=8,
                                                                   temperature=0, stream=True) if c.choices]
        assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        whole = oa.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        stream = oa.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        # n > 1 forks one prefilled state: greedy choices are all the same
        forked = oa.completions.create(model=name, prompt="def f(x):", max_tokens=8, temperature=0, n=3)
        assert [c.text for c in sorted(forked.choices, key=lambda c: c.index)] == [pieces and "".join(pieces)] * 3


def test_a_stop_string_ends_the_text_whole_and_streamed(model_dirs):
    with serving(model_dirs["endless"]) as (client, _):
        full = _complete(client, "def f(x):", 24)["choices"][0]["text"]
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        want = full[: full.index(stop)]
        done = _complete(client, "def f(x):", 24, stop=[stop])["choices"][0]
        assert (done["text"], done["finish_reason"]) == (want, "stop")
        text, events = _stream_text(client, {"model": _name(client), "prompt": "def f(x):", "max_tokens": 24,
                                             "temperature": 0, "stop": [stop]})
        assert text == want and json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"


def test_disconnect_frees_the_slot_and_metrics_count(model_dirs):
    with serving(model_dirs["endless"], "--max-batch", "2") as (client, app):
        body = {"model": _name(client), "prompt": "x", "max_tokens": 1_000_000, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert got and app.state.server.engine.in_flight == 1
        deadline = time.monotonic() + 30
        while app.state.server.engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json() == {"status": "ok", "active_streams": 0}
        _complete(client, "x", 3)
        metrics = client.get("/metrics").text
        assert _metric(metrics, "zeros_lm_cancelled_streams_total") == 1
        assert _metric(metrics, 'zeros_lm_requests_total{endpoint="/v1/completions",status="200"}') >= 1
        assert _metric(metrics, "zeros_lm_generated_tokens_total") >= 3 + len(got)
        assert _metric(metrics, "zeros_lm_time_to_first_token_seconds_count") == 2


def _metric(text, name):
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def test_errors_are_openai_shaped(model_dirs):
    with serving(model_dirs["softmax"], "--max-context", "40") as (client, _):
        name = _name(client)

        def error(path, body, status):
            res = client.post(path, json=body)
            assert res.status_code == status, res.text
            err = res.json()["error"]
            assert err["message"] and err["type"]
            return err

        assert "not served here" in error("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 400)["message"]
        assert error("/v1/completions", {"model": name, "prompt": "x", "temperature": -1}, 400)["param"] == "temperature"
        assert error("/v1/completions", {"model": name}, 400)["param"] == "prompt"
        assert "n = 1" in error("/v1/completions", {"model": name, "prompt": "x", "n": 2, "session_id": "a"}, 400)["message"]
        assert "session_id" in error("/v1/completions", {"model": name, "prompt": "x", "session_id": "../x"}, 400)["message"]
        assert error("/v1/completions", {"model": name, "prompt": "x", "stop": list("abcde")}, 400)["param"] == "stop"
        assert error("/v1/completions", {"model": name, "prompt": [5, 99999]}, 400)["param"] == "prompt"
        over = error("/v1/completions", {"model": name, "prompt": "word " * 30, "max_tokens": 20}, 400)
        assert over["code"] == "context_length_exceeded" and "40" in over["message"]
        assert error("/v1/chat/completions", {"model": name, "messages": []}, 400)["param"] == "messages"
        assert client.get("/v1/sessions/nobody").status_code == 404
        assert client.delete("/v1/sessions/nobody").json()["error"]["code"] == "session_not_found"
        # a rejected request leaves its session as it was: usable at once
        _complete(client, "x", 2, session_id="kept")
        error("/v1/completions", {"model": name, "prompt": "word " * 30, "session_id": "kept"}, 400)
        assert _complete(client, "y", 2, session_id="kept")["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        # every answer is counted by route and status, errors and unknown paths included
        metrics = client.get("/metrics").text
        assert _metric(metrics, 'zeros_lm_requests_total{endpoint="/v1/completions",status="400"}') == 9
        assert _metric(metrics, 'zeros_lm_requests_total{endpoint="/v1/sessions/{session_id}",status="404"}') == 2
        assert client.get("/nowhere").status_code == 404
        assert _metric(client.get("/metrics").text, 'zeros_lm_requests_total{endpoint="other",status="404"}') == 1


def test_overload_answers_429_then_503_when_draining(model_dirs):
    with serving(model_dirs["endless"], "--max-batch", "1", "--max-queue", "1") as (client, app):
        engine = app.state.server.engine
        body = {"model": _name(client), "prompt": "x", "max_tokens": 1_000_000, "temperature": 0, "stream": True}
        with contextlib.ExitStack() as streams:
            running = streams.enter_context(client.stream("POST", "/v1/completions", json=body))
            lines = running.iter_lines()  # (kept: a dropped iterator closes the response)
            next(lines)
            waiting = threading.Thread(target=lambda: client.post("/v1/completions", json={**body, "stream": False,
                                                                                          "max_tokens": 2}))
            waiting.start()
            deadline = time.monotonic() + 30
            while len(engine._waiting) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            res = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert res.status_code == 429 and res.headers["retry-after"] == "1"
            assert res.json()["error"]["type"] == "rate_limit_error"
        waiting.join(timeout=30)  # the running stream was closed: the queued request ran
        assert not waiting.is_alive()
        metrics = client.get("/metrics").text
        assert _metric(metrics, 'zeros_lm_rejected_requests_total{reason="overloaded"}') == 1
        engine.begin_drain()
        res = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        assert client.get("/health").status_code == 503


def test_sigterm_drains_and_writes_sessions(model_dirs, tmp_path, clean_env):
    """The command itself: SIGTERM lets the running request finish, then writes the session's state file."""
    state_dir = tmp_path / "states"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**clean_env, "PYTHONPATH": repo}
    proc = subprocess.Popen([sys.executable, "-m", "zeros_lm.cli", "serve", str(model_dirs["zeros"]), "--port", "0",
                             "--state-dir", str(state_dir)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the server did not report its port"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answer = _complete(client, "def f():", 4, session_id="term")
            assert answer["usage"]["completion_tokens"] >= 1
            body = {"model": _name(client), "prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)  # while the stream runs: it still ends properly
                assert [line for line in lines if line][-1] == "data: [DONE]"
            # uvicorn re-raises the signal once it has shut down cleanly: killed by SIGTERM, after the drain
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert (state_dir / "term.state").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_misuse_is_one_line(tmp_path, capsys):
    from zeros_lm.cli.serve import main

    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist")
    assert main([str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be a positive integer" in capsys.readouterr().err
