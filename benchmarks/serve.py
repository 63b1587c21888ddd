#!/usr/bin/env python
"""Serving throughput and latency of ``zeros-lm serve`` on this machine (CPU), loopback only.

A model of the generation benchmark's shape (6 layers, hidden 384, 6 heads, vocab 8192, random weights,
float32; ``--config default`` for the default ZeroSConfig) is saved with a small byte-level BPE tokenizer
and served by ``zeros-lm serve`` in a subprocess. Then:

1. N concurrent clients (1, 8, 32, 64) each stream one completion of ``--max-tokens`` tokens: aggregate
   generated tokens/s, p50 / p95 time to first token and inter-token latency, the server's resident memory;
2. idle sessions: the server's memory per idle session against the state's size (GET /v1/sessions/ID);
3. a session's follow-up after a ``--history``-token history: time to first token against re-reading the
   history (the same text, no session);
4. memory per active stream at a ``--context``-token context: ``--long-streams`` streams decode together after
   prompts of that length; the server's resident memory above its idle level, and the batched cache's bytes
   (``zeros_lm_active_state_bytes``), per stream;
5. ``--soak SECONDS`` (instead of 1-4): ``--soak-clients`` clients request completions in a loop (some in
   sessions, spilled to state files) and hang up at random points; errors counted, memory growth reported.

    python benchmarks/serve.py                       # 1, 8, 32, 64 clients, zeros and softmax
    python benchmarks/serve.py --quick               # 1 and 8 clients, zeros only, shorter history
    python benchmarks/serve.py --attention zeros --clients 1 32
    python benchmarks/serve.py --soak 600            # 32 clients with random disconnects for ten minutes
    python benchmarks/serve.py --dtype bfloat16      # the server's weights in bfloat16 (states stay float32)

Prints tables; asserts nothing about time. Targets (docs/serving.md): >= 8x a single stream's tokens/s at
32 streams, p95 inter-token latency at 32 streams <= 3x a single stream's, memory per idle session = its
state (+-10%), follow-up TTFT after a 4,000-token history >= 20x lower than re-reading it, ZeroS memory per
active stream at a 4096-token context <= 1/20 of softmax's; soak: no error, memory growth <= 5%. Every figure
is printed with the load average of the machine when it was taken (os.getloadavg, 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import httpx

TOKENIZER_VOCAB = 8192  # the generation benchmark's vocabulary
CORPUS_FILES = 40  # stdlib modules the tokenizer is trained on
EOS = "<|endoftext|>"
START_TIMEOUT_S = 300
PROMPT = "def parse(text, width=70):\n    "
SETTLE_S = 0.5  # after the last response, before reading idle memory: the server returns its heap's free pages
PROMPT_IDS = (10, 8000)  # token ids of the synthetic long prompts (inside the tokenizer's vocabulary)
SOAK_SESSIONS_PER_CLIENT = 3
SOAK_HANG_UP = 0.3  # share of soak requests whose client goes away mid-stream
SOAK_IN_SESSION = 0.3  # share of soak requests in a session
SOAK_SAMPLE_S = 1.0
SOAK_WINDOW = 0.15  # memory growth: median of the last 15% of the run's samples vs the 15% after the first 15%


def load() -> float:
    """The machine's 1-minute load average (other work running beside the benchmark)."""
    return os.getloadavg()[0]


def build_model_dir(root: pathlib.Path, attention_type: str, config_name: str) -> pathlib.Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zeros_lm import ZeroSConfig, ZeroSForCausalLM

    path = root / f"{attention_type}-{config_name}"
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(f.read_text(encoding="utf-8") for f in sorted(stdlib.glob("*.py"))[:CORPUS_FILES])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainer=trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS, "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>").save_pretrained(path)
    # every id the model can sample decodes to text: the vocabulary is the tokenizer's (about 8192)
    shape = {} if config_name == "default" else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6)
    config = ZeroSConfig(attention_type=attention_type, vocab_size=tok.get_vocab_size(), eos_token_id=None,
                         bos_token_id=None, pad_token_id=1, **shape)
    torch.manual_seed(0)
    ZeroSForCausalLM(config).eval().save_pretrained(path)
    return path


class ServerProcess:
    def __init__(self, model_dir, *options, threads: int | None = None):
        cmd = [sys.executable, "-m", "zeros_lm.cli", "serve", str(model_dir), "--port", "0", "--log-level", "info",  # (info: uvicorn reports its port)
               *options]
        env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
        if threads:  # torch's intra-op threads in the server (on a shared machine, 1 spares it the contention)
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        self.port = None
        log = []
        for line in self.proc.stderr:
            log.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(log[-20:]))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def rss_bytes(self) -> int:
        status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def stream_one(client, name, prompt, max_tokens, **extra):
    """(arrival times of the streamed pieces, completion tokens, start time)."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times, tokens, start


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def concurrency_run(server, clients: int, max_tokens: int):
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        await stream_one(client, server.name, PROMPT, 4)  # warm-up
        peak = server.rss_bytes()
        start = time.perf_counter()
        tasks = [asyncio.create_task(stream_one(client, server.name, PROMPT + str(i), max_tokens)) for i in range(clients)]
        while not all(t.done() for t in tasks):
            peak = max(peak, server.rss_bytes())
            await asyncio.sleep(0.05)
        results = [t.result() for t in tasks]
        wall = time.perf_counter() - start
    ttft = [times[0] - t0 for times, _, t0 in results if times]
    itl = [b - a for times, _, _ in results for a, b in zip(times, times[1:])]
    total = sum(n for _, n, _ in results)
    return {"clients": clients, "tokens": total, "tok_s": total / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p95": pct(ttft, 95), "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95), "rss": peak, "load": load()}


def idle_sessions(server, count: int):
    with httpx.Client(base_url=server.url, timeout=600) as client:
        def complete(sid):
            res = client.post("/v1/completions", json={"model": server.name, "prompt": PROMPT, "max_tokens": 2,
                                                       "temperature": 0, "session_id": sid})
            res.raise_for_status()

        complete("warm-up")
        time.sleep(SETTLE_S)
        before = server.rss_bytes()
        for i in range(count):
            complete(f"idle-{i}")
        time.sleep(SETTLE_S)
        after = server.rss_bytes()
        state = client.get("/v1/sessions/idle-0").json()["state_bytes"]
    return {"sessions": count, "rss_per_session": (after - before) / count, "state_bytes": state, "load": load()}


def follow_up(server, history_tokens: int):
    """TTFT of a session's follow-up after a long history, and of re-reading that history."""
    unit = "x = compute(value) + 1\n"
    with httpx.Client(base_url=server.url, timeout=600) as client:
        def ttft(prompt, **extra):
            start = time.perf_counter()
            res = client.post("/v1/completions", json={"model": server.name, "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0, **extra})
            res.raise_for_status()
            return time.perf_counter() - start, res.json()["usage"]

        history = unit * max(1, history_tokens // 8)
        _, usage = ttft(history, session_id="long")
        n = usage["prompt_tokens"]
        history = unit * max(1, int(len(history) // len(unit) * history_tokens / max(n, 1)))  # about the target
        client.delete("/v1/sessions/long")
        _, usage = ttft(history, session_id="long")
        follow, usage_f = ttft(" y = 2\n", session_id="long")
        reread, _ = ttft(history + " y = 2\n")
    return {"history": usage["prompt_tokens"], "cached": usage_f["prompt_tokens_details"]["cached_tokens"],
            "follow_up_s": follow, "reread_s": reread, "load": load()}


async def active_streams(server, streams: int, context: int):
    """Memory per stream while ``streams`` streams decode together at about ``context`` tokens each: the server's
    resident memory above its idle level (prefill temporaries included) and the batched cache's bytes."""
    # each stream's prompt is read in steps of the prefill budget (512) while the others decode: enough new
    # tokens that all of them are still decoding when the last one joins
    max_tokens = 16 + streams * (context // 512 + 1)
    rng = random.Random(0)
    prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(context - max_tokens)] for _ in range(streams)]
    async with httpx.AsyncClient(base_url=server.url, timeout=1800) as client:
        await stream_one(client, server.name, PROMPT, 2)  # warm-up
        await asyncio.sleep(SETTLE_S)
        idle = server.rss_bytes()
        tasks = [asyncio.create_task(stream_one(client, server.name, p, max_tokens)) for p in prompts]
        peak_rss, peak_state = idle, 0.0
        while not all(t.done() for t in tasks):
            peak_rss = max(peak_rss, server.rss_bytes())
            peak_state = max(peak_state, await asyncio.to_thread(server.metric, "zeros_lm_active_state_bytes"))
            await asyncio.sleep(0.05)
        for t in tasks:
            t.result()
    return {"streams": streams, "context": context, "rss_per_stream": (peak_rss - idle) / streams,
            "state_per_stream": peak_state / streams, "load": load()}


async def soak(server, seconds: float, clients: int, seed: int = 0):
    """``clients`` loops of streaming completions for ``seconds``: random prompt lengths and max_tokens, some in
    sessions (spilled and restored), some hung up mid-stream. Returns counts and the server's memory over time."""
    counts = {"requests": 0, "completed": 0, "hung_up": 0, "busy_409": 0, "errors": 0, "tokens": 0}
    errors: list[str] = []
    end = time.perf_counter() + seconds
    samples: list[tuple[float, int]] = []

    async def one_client(i: int, client):
        r = random.Random(seed * 1000 + i)
        while time.perf_counter() < end:
            max_tokens = r.randint(4, 48)
            body = {"model": server.name, "prompt": [r.randrange(*PROMPT_IDS) for _ in range(r.randint(1, 200))],
                    "max_tokens": max_tokens, "temperature": r.choice([0, 0.8]), "seed": r.randrange(2**31),
                    "stream": True}
            if r.random() < SOAK_IN_SESSION:
                body["session_id"] = f"soak-{i}-{r.randrange(SOAK_SESSIONS_PER_CLIENT)}"
            hang_up_after = r.randint(0, max_tokens // 2) if r.random() < SOAK_HANG_UP else None
            counts["requests"] += 1
            try:
                async with client.stream("POST", "/v1/completions", json=body) as res:
                    if res.status_code == 409:  # its session still winds down a stream it hung up on
                        counts["busy_409"] += 1
                        await res.aread()
                        continue
                    if res.status_code != 200:
                        counts["errors"] += 1
                        errors.append(f"{res.status_code}: {(await res.aread())[:200]!r}")
                        continue
                    chunks = 0
                    async for line in res.aiter_lines():
                        if line.startswith("data: {") and '"error"' in line[:20]:
                            counts["errors"] += 1
                            errors.append(line[:200])
                        elif line.startswith("data: {"):
                            chunks += 1
                        if hang_up_after is not None and chunks > hang_up_after:
                            counts["hung_up"] += 1
                            break
                    else:
                        counts["completed"] += 1
                    counts["tokens"] += chunks
            except httpx.HTTPError as e:
                counts["errors"] += 1
                errors.append(f"{type(e).__name__}: {e}")

    async def sampler():
        while time.perf_counter() < end:
            samples.append((time.perf_counter(), server.rss_bytes()))
            await asyncio.sleep(SOAK_SAMPLE_S)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        await stream_one(client, server.name, PROMPT, 4)  # warm-up
        await asyncio.sleep(SETTLE_S)
        idle_before = server.rss_bytes()
        await asyncio.gather(sampler(), *(one_client(i, client) for i in range(clients)))
        await asyncio.sleep(SETTLE_S * 4)
        health = (await client.get("/health")).status_code
    rss = [m for _, m in samples]
    w = max(1, int(len(rss) * SOAK_WINDOW))
    early, late = statistics.median(rss[w : 2 * w]), statistics.median(rss[-w:])
    start = samples[0][0]
    per_minute = [statistics.median([m for t, m in samples if k * 60 <= t - start < (k + 1) * 60])
                  for k in range(int((samples[-1][0] - start) // 60) + 1)]
    return {**counts, "error_samples": errors[:5], "health": health, "rss_early": early, "rss_late": late,
            "rss_idle_before": idle_before, "rss_per_minute": per_minute,
            "rss_max": max(rss), "rss_idle_after": server.rss_bytes(),
            "active_after": server.metric("zeros_lm_active_streams"),
            "spills": server.metric("zeros_lm_session_spills_total"),
            "restores": server.metric("zeros_lm_session_restores_total"), "load": load()}


PARTS = ("clients", "idle", "follow-up", "active")


def run_parts(server, args, clients, history):
    if "clients" in args.parts:
        print("| clients | tokens | tokens/s | x single | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms "
              "| server RSS MiB | load |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        single = None
        for n in clients:
            r = asyncio.run(concurrency_run(server, n, args.max_tokens))
            single = single or r["tok_s"]
            print(f"| {n} | {r['tokens']} | {r['tok_s']:.1f} | {r['tok_s'] / single:.2f} | "
                  f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p95'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | "
                  f"{r['itl_p95'] * 1e3:.1f} | {r['rss'] / 2**20:.0f} | {r['load']:.1f} |", flush=True)
    if "idle" in args.parts:
        s = idle_sessions(server, args.sessions)
        print(f"\nidle sessions: {s['sessions']}, server memory per session {s['rss_per_session'] / 1024:.0f} KiB, "
              f"state {s['state_bytes'] / 1024:.0f} KiB (ratio {s['rss_per_session'] / s['state_bytes']:.2f}; "
              f"load {s['load']:.1f})", flush=True)
    if "follow-up" in args.parts:
        f = follow_up(server, history)
        print(f"follow-up after a {f['history']}-token history ({f['cached']} cached): TTFT "
              f"{f['follow_up_s'] * 1e3:.0f} ms vs re-reading {f['reread_s'] * 1e3:.0f} ms "
              f"({f['reread_s'] / f['follow_up_s']:.1f}x; load {f['load']:.1f})", flush=True)
    if "active" in args.parts:
        a = asyncio.run(active_streams(server, args.long_streams, args.context))
        print(f"active streams: {a['streams']} at {a['context']} tokens of context: server memory per stream "
              f"{a['rss_per_stream'] / 2**20:.2f} MiB (above idle), batched cache per stream "
              f"{a['state_per_stream'] / 2**20:.2f} MiB (load {a['load']:.1f})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", nargs="+", default=None, choices=["zeros", "softmax", "linear"])
    p.add_argument("--config", default="generation", choices=["generation", "default"],
                   help="the generation benchmark's model shape, or the default ZeroSConfig")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (default: all)")
    p.add_argument("--clients", nargs="+", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--history", type=int, default=None, help="tokens of the long session history (default 4000)")
    p.add_argument("--sessions", type=int, default=32, help="idle sessions for the memory measurement")
    p.add_argument("--context", type=int, default=4096, help="context of the active-stream memory measurement")
    p.add_argument("--long-streams", type=int, default=4, help="streams of the active-stream memory measurement")
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                   help="run the soak test for SECONDS instead of the measurements")
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's choice)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the server's weights dtype (its --dtype; default: the server's, float32 on a CPU)")
    p.add_argument("--quick", action="store_true", help="1 and 8 clients, zeros only, a 1,000-token history")
    args = p.parse_args(argv)
    attention = args.attention or (["zeros"] if args.quick or args.soak else ["zeros", "softmax"])
    clients = args.clients or ([1, 8] if args.quick else [1, 8, 32, 64])
    history = args.history or (1000 if args.quick else 4000)
    import torch

    print(f"# zeros-lm serve benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, config {args.config}, "
          f"max_tokens {args.max_tokens}, server threads {args.threads or 'default'}, weights {args.dtype or 'default'}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, "
          f"load {load():.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for attention_type in attention:
            model_dir = build_model_dir(pathlib.Path(tmp), attention_type, args.config)
            dtype = ["--dtype", args.dtype] if args.dtype else []
            if args.soak:
                n = args.soak_clients
                server = ServerProcess(model_dir, "--max-batch", str(n), "--max-queue", str(2 * n),
                                       "--max-sessions", str(n // 2), "--state-dir", str(pathlib.Path(tmp) / "states"),
                                       *dtype, threads=args.threads)
            else:
                longest = max(history, args.context) + 1024
                server = ServerProcess(model_dir, "--max-batch", str(max(clients)), "--max-queue", str(max(clients)),
                                       "--max-sessions", str(args.sessions + 8), "--max-context", str(longest),
                                       *dtype, threads=args.threads)
            try:
                print(f"\n## {attention_type}\n", flush=True)
                if not args.soak:
                    run_parts(server, args, clients, history)
                    continue
                r = asyncio.run(soak(server, args.soak, args.soak_clients))
                growth = r["rss_late"] / r["rss_early"] - 1
                print(f"soak: {args.soak:.0f} s, {args.soak_clients} clients: {r['requests']} requests, "
                      f"{r['completed']} completed, {r['hung_up']} hung up, {r['busy_409']} answered 409 (session "
                      f"still closing), {r['errors']} errors, {r['tokens']} chunks; sessions spilled {r['spills']:.0f}, "
                      f"restored {r['restores']:.0f}; health {r['health']}, active streams after {r['active_after']:.0f}")
                print(f"soak memory: idle before {r['rss_idle_before'] / 2**20:.0f} MiB, "
                      f"{r['rss_early'] / 2**20:.0f} MiB early, {r['rss_late'] / 2**20:.0f} MiB late "
                      f"({growth * 100:+.1f}%), max {r['rss_max'] / 2**20:.0f} MiB, idle after "
                      f"{r['rss_idle_after'] / 2**20:.0f} MiB (load {r['load']:.1f}); median per minute: "
                      + ", ".join(f"{m / 2**20:.0f}" for m in r["rss_per_minute"]) + " MiB")
                for e in r["error_samples"]:
                    print("  error:", e)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
