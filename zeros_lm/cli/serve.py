"""``zeros-lm serve MODEL_DIR``: an OpenAI-compatible streaming server (see docs/serving.md).

    zeros-lm serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-sessions 1024]
                             [--state-dir DIR] [--dtype auto]

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent events),
GET /v1/models, GET /health, GET /metrics, GET/DELETE /v1/sessions/ID. Ctrl-C or SIGTERM drains: the
running streams finish (up to --drain-timeout seconds), then the sessions' states go to --state-dir.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from zeros_lm.cli.generate import CLIError, OneLineParser, check_model_dir, one_line, run_command

DEFAULTS = {"max_batch": 32, "max_queue": 64, "max_sessions": 1024, "prefill_budget": 512, "max_context": 32768}


def parse_args(argv):
    p = OneLineParser(description="Serve a ZeroS model directory over an OpenAI-compatible HTTP API.")
    p.add_argument("model_dir", help="directory written by save_pretrained (weights + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--model-name", help="the model's name in the API (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"], help="streams decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                   help="requests that may wait for a slot; beyond, 429 (default %(default)s)")
    p.add_argument("--max-sessions", type=int, default=DEFAULTS["max_sessions"],
                   help="idle sessions kept in memory; the least recently used beyond go to --state-dir (default %(default)s)")
    p.add_argument("--state-dir", help="directory of the sessions' state files (spilled, and written on shutdown)")
    p.add_argument("--prefill-budget", type=int, default=DEFAULTS["prefill_budget"],
                   help="prompt tokens read per scheduler step, between decode steps (default %(default)s)")
    p.add_argument("--max-context", type=int, default=DEFAULTS["max_context"],
                   help="models with softmax layers: most tokens per stream, prompt + max_tokens (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="a chat request's max_tokens when it gives none (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on shutdown, seconds the running streams get to finish (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_batch", "max_queue", "prefill_budget", "max_context", "max_tokens"):
        if getattr(args, flag) <= 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.max_sessions < 0:
        raise CLIError(f"--max-sessions must be >= 0, got {args.max_sessions}")
    if args.drain_timeout < 0:
        raise CLIError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.state_dir is not None and Path(args.state_dir).exists() and not Path(args.state_dir).is_dir():
        raise CLIError(f"--state-dir '{args.state_dir}' exists and is not a directory")


def build_server(args):
    """(uvicorn.Server, FastAPI app) for the parsed arguments."""
    from zeros_lm.serving import ServerConfig, create_app, load_model

    try:
        model, tokenizer = load_model(args.model_dir, args.dtype, args.device)
    except Exception as e:  # noqa: BLE001 - one line
        raise CLIError(f"could not load the model from '{args.model_dir}': {one_line(e)}") from None
    config = ServerConfig(
        model_name=args.model_name or Path(args.model_dir).resolve().name, max_batch=args.max_batch,
        max_queue=args.max_queue, max_sessions=args.max_sessions, state_dir=args.state_dir,
        prefill_budget=args.prefill_budget, max_context=args.max_context, default_max_tokens=args.max_tokens,
        drain_timeout=args.drain_timeout,
    )
    app = create_app(model, tokenizer, config)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=args.drain_timeout)
    return DrainingServer(uv_config), app


class DrainingServer(uvicorn.Server):
    """A signal (Ctrl-C, SIGTERM) first makes the engine refuse new work (503), then uvicorn shuts down: it waits
    for the open streams (up to --drain-timeout), and the app's shutdown writes the sessions' states."""

    def handle_exit(self, sig, frame):
        self.config.app.state.server.engine.begin_drain()
        super().handle_exit(sig, frame)


def run(args) -> None:
    check_args(args)
    check_model_dir(Path(args.model_dir))
    from zeros_lm.serving.engine import limit_heap_arenas

    limit_heap_arenas()  # before the server's threads start
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    server, _ = build_server(args)
    server.run()


def main(argv=None) -> int:
    return run_command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
