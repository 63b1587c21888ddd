#!/usr/bin/env python
"""Stream text from a saved ZeroS model (or one of its softmax / linear baselines).

    python generate.py MODEL_DIR --prompt "def main():" --max-new-tokens 200
    python generate.py MODEL_DIR --prompt-file prompt.txt --greedy
    echo "some prompt" | python generate.py MODEL_DIR --seed 0
    python generate.py MODEL_DIR --interactive --stats

MODEL_DIR is a directory written by ``save_pretrained`` holding the weights and a tokenizer.
Generated text goes to stdout as it is produced (a transformers TextStreamer); statistics and
errors go to stderr. Errors are one line starting with ``error:`` and a non-zero exit status.

Decoding options left out come from the model's generation_config.json (written by the export:
sampling at temperature 0.8, top-p 0.95, 200 new tokens); --greedy forces greedy decoding.

--interactive reads one turn per line from stdin (after --prompt / --prompt-file, if given, as the
first turn). Each line, plus a newline, is appended to the conversation and the model continues it.
The model's recurrent state (its cache) is kept between turns, so a turn costs only its new tokens,
however long the conversation has grown. Type /quit or send EOF to leave.

Statistics (prompt length, tokens/s, cache size in bytes) are printed at the end; with --stats
also after every turn in interactive mode, with prefill and decode rates.

States as files: the model's whole memory of a prompt is its state, a few MiB whatever the prompt's
length, so a long prompt can be read once and reused:

    python generate.py MODEL_DIR --prompt-file manual.txt --save-state manual.state --max-new-tokens 1
    python generate.py MODEL_DIR --load-state manual.state --prompt "Question: ..."

--save-state FILE writes the state after the prompt (before generating), --save-final-state FILE after
the generation; --load-state FILE starts from a saved state, and the prompt (may be empty) continues it.
In interactive mode, `/save FILE` and `/load FILE` do the same between turns.
Where a state goes is checked before anything is generated (its directory exists and takes a file);
a save never replaces a file that is not a state file, nor an existing state file unless
--overwrite-state is given.
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2
DEFAULT_MAX_NEW_TOKENS = 128  # when neither --max-new-tokens nor the model's generation_config sets a length
PENDING_KEY = "generate.pending_ids"  # state-file metadata: tokens of the context not yet in the state


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def run_command(run, parse_args, argv=None) -> int:
    """A command's exit status: 0, 2 with one ``error:`` line for a CLIError (bad input), 130 on Ctrl-C."""
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)  # (end the interrupted line)
        return 130
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one CLIError line (exit 2) instead of usage + message."""

    def error(self, message):
        raise CLIError(message)


def parse_args(argv):
    p = OneLineParser(description="Stream text from a ZeroS model directory.")
    p.add_argument("model_dir", help="directory written by save_pretrained (weights + tokenizer)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate per turn (default: the model's "
                   f"generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's generation_config.json)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0: off (default: generation_config)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: generation_config)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default: generation_config)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignores the sampling options)")
    p.add_argument("--interactive", action="store_true", help="read turns from stdin, keeping the state")
    p.add_argument("--stats", action="store_true", help="print statistics after every generation")
    p.add_argument("--load-state", metavar="FILE", help="start from a state saved by --save-state")
    p.add_argument("--save-state", metavar="FILE", help="save the state after reading the prompt")
    p.add_argument("--save-final-state", metavar="FILE", help="save the state after the generation")
    p.add_argument("--overwrite-state", action="store_true",
                   help="let --save-state, --save-final-state and /save replace an existing state file "
                        "(a file that is not a state file is never replaced)")
    p.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=2048,
        help="feed long prompts this many tokens at a time (bounds the memory of the prefill; default 2048)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise CLIError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.prefill_chunk_size <= 0:
        raise CLIError(f"--prefill-chunk-size must be a positive integer, got {args.prefill_chunk_size}")
    if not args.greedy:
        if args.temperature is not None and not args.temperature > 0:
            raise CLIError(
                f"--temperature must be > 0 (use --greedy for deterministic decoding), got {args.temperature}"
            )
        if args.top_k is not None and args.top_k < 0:
            raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise CLIError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.load_state is not None:
        check_load_source(args.load_state, "--load-state")
    for flag, target in (("--save-state", args.save_state), ("--save-final-state", args.save_final_state)):
        if target is not None:
            check_save_target(target, flag, args.overwrite_state)
    if (args.save_state is not None and args.save_final_state is not None and not args.overwrite_state
            and Path(args.save_state).resolve() == Path(args.save_final_state).resolve()):
        raise CLIError("--save-state and --save-final-state name the same file: the second save would replace "
                       "the first; give two names, or --overwrite-state")


def check_load_source(source: str, what: str) -> None:
    """``source`` is a file (what it holds is checked when it is read)."""
    if Path(source).is_dir():
        raise CLIError(f"{what}: '{source}' is a directory, not a state file")
    if not Path(source).is_file():
        raise CLIError(f"state file '{source}' does not exist")


def check_save_target(target: str, what: str, overwrite: bool) -> None:
    """A state can be written to ``target``: its directory exists and is writable, it is not a
    directory, and it is no existing file but (with ``overwrite``) a state file. Checked before any
    generation (and by /save), so that nothing is computed for a save that cannot happen."""
    from zeros_lm.cache_zeros import check_state_target

    parent = Path(target).resolve().parent
    if not parent.exists():
        raise CLIError(f"{what}: the directory of '{target}' does not exist")
    if not parent.is_dir():
        raise CLIError(f"{what}: the directory of '{target}' ('{parent}') is not a directory")
    try:  # the honest test (permissions, read-only file systems, root): write a file there
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".zeros-lm-write-check-"):
            pass
    except OSError as e:
        raise CLIError(f"{what}: cannot write into the directory '{parent}' ({e.strerror or one_line(e)})") from None
    try:  # what may be replaced: the rule of ZeroSCache.save
        check_state_target(target, overwrite, overwrite_option="--overwrite-state")
    except (FileExistsError, IsADirectoryError) as e:
        raise CLIError(f"{what}: {e}") from None


def generation_kwargs(args, generation_config) -> dict:
    """The options given on the command line; the model's generation_config.json supplies the rest."""
    kw = {"prefill_chunk_size": args.prefill_chunk_size}
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    elif generation_config.max_new_tokens is None:
        kw["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    if args.greedy:
        kw["do_sample"] = False
    elif sampling:  # a sampling option asks for sampling
        kw.update(sampling, do_sample=True)
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    return kw


def check_model_dir(path: Path) -> None:
    """Cheap checks before torch is imported: the directory exists and holds a ZeroS config."""
    if not path.exists():
        raise CLIError(f"model directory '{path}' does not exist")
    if not path.is_dir():
        raise CLIError(f"'{path}' is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"'{path}' is not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read '{config_file}': {one_line(e)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "zeros":
        raise CLIError(f"'{path}' holds a model of model_type '{model_type}', not a ZeroS model ('zeros')")


def read_prompt(args) -> str | None:
    """The prompt of --prompt / --prompt-file, or stdin (one-shot mode only); None if there is none."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read the prompt file: {one_line(e)}") from None
    if args.interactive:
        return None
    if sys.stdin.isatty():
        print("(reading the prompt from stdin; end it with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read()


def one_line(e) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------


class Session:
    """A loaded model + tokenizer and one conversation state (the cache and the pending token)."""

    def __init__(self, args):
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        from zeros_lm import ZeroSCache
        from zeros_lm.pretrained import WeightsMismatchError, load_pretrained

        self.torch = torch
        self.args = args
        path = Path(args.model_dir)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise CLIError(f"bad --device: {one_line(e)}") from None
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any failure is reported in one line
            raise CLIError(f"could not load the tokenizer from '{path}': {one_line(e)}") from None
        try:
            model = load_pretrained(path, dtype=getattr(torch, dtype))
        except WeightsMismatchError as e:
            raise CLIError(str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"could not load the model from '{path}': {one_line(e)}") from None
        self.model = model.to(self.device).eval()
        self.cache_class = ZeroSCache
        self.cache = self._owned(ZeroSCache(self.model.config))
        self.pending = torch.empty(1, 0, dtype=torch.long, device=self.device)  # in the context, not yet in the state
        if args.seed is not None:
            transformers.set_seed(args.seed)
        self.gen_kwargs = generation_kwargs(args, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.gen_kwargs["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        self.totals = {"prompt": 0, "generated": 0, "seconds": 0.0}

    @staticmethod
    def _owned(cache):
        """The conversation's cache, whose states nothing but this session reads: decoding may update them in
        place (``ZeroSCache.in_place_updates``)."""
        cache.in_place_updates = True
        return cache

    def save_state(self, path: str, what: str = "/save") -> None:
        """Write the state and the pending token(s) to ``path``."""
        check_save_target(path, what, self.args.overwrite_state)
        if self.cache.get_seq_length() == 0 and self.pending.shape[1] == 0:
            raise CLIError(f"{what}: nothing to save yet: no text has been read")
        try:
            # A one-token prompt leaves the state empty: the file then holds only its pending token.
            self.cache.save(path, self.model, metadata={PENDING_KEY: json.dumps(self.pending[0].tolist())},
                            overwrite=self.args.overwrite_state, allow_empty=True)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' own error: one line
            raise CLIError(f"could not save the state to '{path}': {one_line(e)}") from None
        print(f"[state] saved the state after {self.cache.get_seq_length() + self.pending.shape[1]} tokens "
              f"to {path} ({Path(path).stat().st_size:,} bytes)", file=sys.stderr)

    def load_state(self, path: str, what: str = "/load") -> None:
        """Continue from a state written by :meth:`save_state` (the current one is dropped)."""
        check_load_source(path, what)
        try:
            cache = self.cache_class.load(path, self.model)
            pending = json.loads(cache.metadata.get(PENDING_KEY, "[]"))
        except (OSError, ValueError) as e:
            raise CLIError(one_line(e)) from None
        self.cache = self._owned(cache)
        self.pending = self.torch.tensor([pending], dtype=self.torch.long, device=self.device).reshape(1, -1)
        print(f"[state] loaded the state of {cache.get_seq_length() + self.pending.shape[1]} tokens from {path}",
              file=sys.stderr)

    def _prefill(self, ids) -> None:
        """Read ids into the state, prefill_chunk_size tokens at a time (no generation)."""
        torch = self.torch
        step = self.args.prefill_chunk_size
        with torch.inference_mode():
            for start in range(0, ids.shape[1], step):
                piece = ids[:, start : start + step]
                mask = torch.ones(1, self.cache.get_seq_length() + piece.shape[1], dtype=torch.long, device=self.device)
                self.model(piece, attention_mask=mask, cache=self.cache, logits_to_keep=1)

    def generate(self, text: str, first: bool, save_after_prompt: str | None = None) -> dict:
        """Feed text (after the pending token), stream the continuation, keep the state; return stats.

        With ``save_after_prompt``, the prompt is read and the state saved there before generating."""
        torch = self.torch
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=first).input_ids.to(self.device)
        ids = torch.cat([self.pending, ids], dim=1)
        if ids.shape[1] == 0:
            raise CLIError("nothing to continue: give a prompt")
        n_prompt = ids.shape[1]
        start = time.perf_counter()
        if save_after_prompt is not None:  # all but the last token enter the state; the last one stays pending
            self._prefill(ids[:, :-1])
            self.pending = ids = ids[:, -1:]
            self.save_state(save_after_prompt, "--save-state")
        past = self.cache.get_seq_length()
        streamer = _timed_streamer_class()(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones(1, past + ids.shape[1], dtype=torch.long, device=self.device),
                cache=self.cache,
                streamer=streamer,
                **self.gen_kwargs,
            )
        seconds = time.perf_counter() - start
        self.pending = out[:, -1:]
        n_new = out.shape[1] - ids.shape[1]
        first_token = (streamer.token_times[0] - start) if streamer.token_times else seconds
        decode_time = seconds - first_token
        stats = {
            "prompt": n_prompt,
            "generated": n_new,
            "seconds": seconds,
            "tokens_per_s": n_new / seconds if seconds > 0 else float("inf"),
            "first_token_s": first_token,
            "decode_tokens_per_s": (n_new - 1) / decode_time if n_new > 1 and decode_time > 0 else float("nan"),
            "context": self.cache.get_seq_length(),
            "cache_bytes": self.cache.nbytes,
        }
        for key in self.totals:
            self.totals[key] += stats[key]
        return stats


@functools.cache
def _timed_streamer_class():
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """A TextStreamer that also records when each generated token arrives."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_times = []
            self._prompt_seen = False

        def put(self, value):
            if self._prompt_seen:  # the first call carries the prompt
                self.token_times.append(time.perf_counter())
            self._prompt_seen = True
            super().put(value)

    return TimedStreamer


def format_stats(s: dict, detailed: bool) -> str:
    line = (
        f"[stats] prompt: {s['prompt']} tokens | generated: {s['generated']} tokens in {s['seconds']:.2f} s, "
        f"{s['tokens_per_s']:.1f} tokens/s"
    )
    if detailed:
        line += f" (first token {s['first_token_s'] * 1e3:.0f} ms, decode {s['decode_tokens_per_s']:.1f} tokens/s)"
    return line + f" | context: {s['context']} tokens | cache: {s['cache_bytes']:,} bytes"


def run(args) -> None:
    check_args(args)
    check_model_dir(Path(args.model_dir))
    prompt = read_prompt(args)
    if prompt is not None and not prompt.strip() and args.load_state is None:
        raise CLIError("empty prompt: give some text with --prompt, --prompt-file or on stdin")
    if args.save_state is not None and prompt is None:
        raise CLIError("--save-state saves the state after the prompt: give one with --prompt or --prompt-file "
                       "(in --interactive mode, /save FILE saves between turns)")
    session = Session(args)
    first = True
    if args.load_state is not None:
        session.load_state(args.load_state, "--load-state")
        first = False

    if not args.interactive:
        stats = session.generate(prompt or "", first=first, save_after_prompt=args.save_state)
        print(format_stats(stats, detailed=args.stats), file=sys.stderr)
        if args.save_final_state is not None:
            session.save_state(args.save_final_state, "--save-final-state")
        return

    if prompt is not None:
        stats = session.generate(prompt + "\n", first=first, save_after_prompt=args.save_state)
        first = False
        if args.stats:
            print(format_stats(stats, detailed=True), file=sys.stderr)
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command, _, target = line.strip().partition(" ")
        if command in ("/save", "/load"):
            try:
                if not target.strip():
                    raise CLIError(f"{command} needs a file name: {command} FILE")
                if command == "/save":
                    session.save_state(target.strip())
                else:
                    session.load_state(target.strip())
                    first = False
            except CLIError as e:  # a bad command does not end the conversation
                print(f"error: {e}", file=sys.stderr)
            continue
        stats = session.generate(line + "\n", first=first)
        first = False
        if args.stats:
            print(format_stats(stats, detailed=True), file=sys.stderr)
    if not args.stats and session.totals["generated"]:
        t = session.totals
        print(
            f"[stats] total prompt: {t['prompt']} tokens | generated: {t['generated']} tokens in "
            f"{t['seconds']:.2f} s, {t['generated'] / t['seconds']:.1f} tokens/s | "
            f"context: {session.cache.get_seq_length()} tokens | cache: {session.cache.nbytes:,} bytes",
            file=sys.stderr,
        )
    if args.save_final_state is not None:
        session.save_state(args.save_final_state, "--save-final-state")


def main(argv=None) -> int:
    return run_command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
