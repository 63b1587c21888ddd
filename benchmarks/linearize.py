"""Evidence for ``zeros-lm linearize`` (docs/linearize.md): held-out perplexity of a teacher, its converted
students (a hybrid and pure ZeroS) and the same student architecture trained from scratch on the same
tokens, a recall probe (zero-shot multi-query associative recall at a few lengths) and the generation state
of each against the teacher's KV cache.

    python benchmarks/linearize.py --teacher runs/softmax/hf --tokens 160000 --out runs/linearize-bench
    python benchmarks/linearize.py --teacher path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 2000000 \
        --softmax-every 4 --data-train-files stdlib:json --seq-len 512
    python benchmarks/linearize.py --state-table --layers 30 --heads 9 --kv-heads 3 --head-dim 64   # SmolLM2's shapes

Every conversion runs the real command (``zeros-lm linearize``); the from-scratch row runs
``zeros-lm train`` with the hybrid's config and the same token budget; outputs already in OUT are
evaluated, not rebuilt. The recall probe (``recall_probe``) needs no training and works on any causal LM:
K random key tokens each followed by a random value token, then the K keys again in a shuffled order, each
followed by its value; the score is the share of queried values that the greedy next-token prediction gets
right (teacher-forced). Results go to OUT/results.json
and a markdown table to stdout. On a 2-core CPU use tiny settings (the defaults); the SmolLM2 rows need
hours there, or a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CONTEXTS = (1024, 8192)  # state size vs KV cache at these context lengths
STATE_PROBE = 16  # state_table's short prefills: this many tokens and twice as many
RECALL_PAIRS = (8, 32, 128)  # the recall probe's key-value pairs per sequence (sequences of 4x as many tokens)
RECALL_SEQUENCES = 32  # sequences per length
RECALL_RANGE = 256  # keys and values are each drawn from this many ordinary token ids; chance = 1 / RECALL_RANGE
RECALL_SEED = 0
RECALL_BATCH = 8


def _run(argv: list[str]) -> None:
    print("$", " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def held_out_perplexity(model, blocks: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            ids = blocks[start:start + batch]
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def recall_token_ids(tokenizer, size: int = RECALL_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The recall probe's vocabulary: two disjoint runs of ``size`` ordinary token ids (keys, values), taken
    around the middle of the tokenizer's ids with its special tokens left out, so every model that shares the
    tokenizer sees the same tokens."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    if len(ordinary) < 2 * size:
        raise ValueError(f"the recall probe needs {2 * size} ordinary token ids, the tokenizer has {len(ordinary)}")
    middle = len(ordinary) // 2
    ids = torch.tensor(ordinary[middle - size:middle + size])
    return ids[:size], ids[size:]


def recall_sequences(keys: torch.Tensor, values: torch.Tensor, pairs: int, sequences: int, seed: int = RECALL_SEED,
                     bos_id=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-query associative recall: ``pairs`` distinct keys, each followed by a random value, then every key
    again in a shuffled order, each followed by its value. Returns ids (N, L), the positions of the queried
    keys (Q,) (where the model must predict the value) and the values expected there (N, Q); N = ``sequences``,
    Q = ``pairs``, L = 4 ``pairs`` (+1 with ``bos_id``)."""
    if pairs > len(keys):
        raise ValueError(f"{pairs} pairs need {pairs} distinct keys, the probe has {len(keys)}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + pairs)
    rows, answers = [], []
    for _ in range(sequences):
        k = keys[torch.randperm(len(keys), generator=generator)[:pairs]]
        v = values[torch.randint(len(values), (pairs,), generator=generator)]
        order = torch.randperm(pairs, generator=generator)
        context = torch.stack([k, v], dim=1).flatten()
        queries = torch.stack([k[order], v[order]], dim=1).flatten()
        rows.append(torch.cat([context, queries]))
        answers.append(v[order])
    ids = torch.stack(rows)
    offset = 0
    if bos_id is not None:
        ids = torch.cat([torch.full((sequences, 1), int(bos_id)), ids], dim=1)
        offset = 1
    positions = offset + 2 * pairs + 2 * torch.arange(pairs)
    return ids, positions, torch.stack(answers)


def recall_accuracy(model, keys: torch.Tensor, values: torch.Tensor, pairs: int, sequences: int = RECALL_SEQUENCES,
                    seed: int = RECALL_SEED, bos_id=None, batch: int = RECALL_BATCH) -> float:
    """Share of the queried values that the model's greedy next-token prediction gets right, teacher-forced
    (one forward per batch of sequences; the whole vocabulary competes)."""
    ids, positions, answers = recall_sequences(keys, values, pairs, sequences, seed, bos_id)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            logits = model(input_ids=ids[start:start + batch], use_cache=False).logits
            predicted = logits[:, positions].argmax(dim=-1)
            correct += int((predicted == answers[start:start + batch]).sum())
    return correct / answers.numel()


def recall_probe(model, keys: torch.Tensor, values: torch.Tensor, pair_counts=RECALL_PAIRS, **kwargs) -> dict[int, float]:
    """``recall_accuracy`` at each number of pairs."""
    return {pairs: recall_accuracy(model, keys, values, pairs, **kwargs) for pairs in pair_counts}


def state_bytes(model, context: int) -> int:
    """Generation state after ``context`` tokens: ZeroS / hybrid models' ZeroSCache, measured on a
    1-token step after a prefill; a Hugging Face softmax model's KV cache, computed from its shapes."""
    config = model.config
    if getattr(config, "model_type", None) == "zeros":
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, context, dtype=torch.long), use_cache=True)
        return int(out.cache.nbytes)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * context * 4  # keys and values, float32


def state_table(layers: int, heads: int, kv_heads: int, head_dim: int, softmax_every: int = 4,
                contexts=CONTEXTS) -> list[dict]:
    """Measured generation state (``ZeroSCache.nbytes``, float32) of students of a teacher with these
    attention shapes: K/V heads shared (the model's grouped K/V heads) or repeated to one per query head,
    pure ZeroS and 1 softmax layer in ``softmax_every``; and the teacher's KV cache (a softmax model of the
    same shapes). The state depends on these shapes only, so the models are narrow (hidden size, MLP and
    vocabulary are small). Every state is a constant plus a part linear in the context (the KV caches),
    so it is measured after prefills of two short contexts and evaluated at ``contexts``."""
    import zeros_lm
    from zeros_lm.configuration_zeros import FULL_LAYER, LINEAR_LAYER

    hybrid = [FULL_LAYER if (i + 1) % softmax_every == 0 else LINEAR_LAYER for i in range(layers)]
    variants = [("teacher (softmax, KV cache)", "softmax", kv_heads, None),
                ("pure ZeroS, K/V shared per group", "zeros", kv_heads, None),
                ("pure ZeroS, K/V repeated per query head", "zeros", heads, None),
                (f"hybrid 1 in {softmax_every}, K/V shared", "zeros", kv_heads, hybrid)]
    rows = []
    for name, kind, kv, layer_types in variants:
        config = zeros_lm.ZeroSConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                                      attention_type=kind, layer_types=layer_types, attention_backend="torch")
        model = zeros_lm.ZeroSForCausalLM(config).eval()
        short = (STATE_PROBE, 2 * STATE_PROBE)
        small, large = (state_bytes(model, c) for c in short)
        per_token = (large - small) // STATE_PROBE
        row = {"model": name, "bytes_per_token": per_token}
        for context in contexts:
            row[f"state_bytes_{context}"] = small + per_token * (context - STATE_PROBE)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher")
    parser.add_argument("--state-table", action="store_true", help="only measure the state sizes of the shapes below")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default="runs/linearize-bench")
    parser.add_argument("--tokens", type=int, default=160_000)
    parser.add_argument("--softmax-every", type=int, default=4)
    parser.add_argument("--data-train-files", default="stdlib")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--skip-scratch", action="store_true")
    parser.add_argument("--skip-zeros", action="store_true", help="convert the hybrid only (no pure ZeroS row)")
    parser.add_argument("--linearize-options", default="",
                        help='more options for both conversions, one string: "--lr-transfer 3e-3 --trainable all"')
    parser.add_argument("--recall-pairs", default=",".join(map(str, RECALL_PAIRS)),
                        help="the recall probe's key-value pairs per sequence, comma-separated (empty: no probe)")
    parser.add_argument("--recall-sequences", type=int, default=RECALL_SEQUENCES)
    args = parser.parse_args(argv)
    if args.state_table:
        rows = state_table(args.layers, args.heads, args.kv_heads, args.head_dim, args.softmax_every)
        print(f"| {args.layers} layers, {args.heads} heads, {args.kv_heads} K/V heads, d {args.head_dim} | "
              + " | ".join(f"state @ {c}" for c in CONTEXTS) + " | per token |\n|---|" + "---|" * (len(CONTEXTS) + 1))
        for row in rows:
            print(f"| {row['model']} | " + " | ".join(f"{row[f'state_bytes_{c}'] / 2**20:.2f} MiB" for c in CONTEXTS)
                  + f" | {row['bytes_per_token'] / 2**10:.1f} KiB |")
        return 0
    if not args.teacher:
        parser.error("--teacher is required (or --state-table)")

    import zeros_lm  # noqa: F401
    from zeros_lm.data import TextDataModule
    from zeros_lm.linearize import load_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(args.teacher)
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    data = ["--data.train_files", args.data_train_files, "--data.seq_len", str(args.seq_len),
            "--data.batch_size", str(args.batch_size)]
    dm = TextDataModule(train_files=args.data_train_files, tokenizer=str(tok_dir), seq_len=args.seq_len,
                        batch_size=args.batch_size, document_resets=False)
    blocks = torch.stack([b for batch in dm.val_dataloader() for b in batch])[: args.eval_blocks]

    rows = {"teacher": teacher}
    variants = [("hybrid", ["--softmax-every", str(args.softmax_every)])] + ([] if args.skip_zeros else [("zeros", [])])
    for name, extra in variants:
        target = out / name
        if not (target / "config.json").is_file():
            _run([sys.executable, "-m", "zeros_lm.cli", "linearize", args.teacher, "--out", str(target),
                  "--tokens", str(args.tokens), "--overwrite", *extra, *data, *shlex.split(args.linearize_options)])
        rows[name] = zeros_lm.ZeroSForCausalLM.from_pretrained(target).eval()
    if not args.skip_scratch:
        hybrid = rows["hybrid"].config
        scratch = out / "scratch"
        if not (scratch / "hf" / "config.json").is_file():
            steps = max(1, args.tokens // (args.batch_size * args.seq_len))
            _run([sys.executable, "-m", "zeros_lm.cli", "train", "--overwrite", "--trainer.default_root_dir", str(scratch),
                  "--trainer.max_steps", str(steps), "--data.tokenizer", str(tok_dir), "--data.document_resets", "false",
                  "--model.hidden_size", str(hybrid.hidden_size), "--model.num_hidden_layers", str(hybrid.num_hidden_layers),
                  "--model.num_attention_heads", str(hybrid.num_attention_heads),
                  "--model.num_key_value_heads", str(hybrid.num_key_value_heads),
                  "--model.head_dim", str(hybrid.head_dim), "--model.rope_theta", str(hybrid.rope_theta),
                  "--model.rms_norm_eps", str(hybrid.rms_norm_eps),
                  "--model.intermediate_size", str(hybrid.intermediate_size),
                  # the conversion's stages warm up over a tenth of their steps: so does this run
                  "--model.warmup_steps", str(max(1, steps // 10)),
                  "--model.softmax_every", str(args.softmax_every), "--model.zero_order_all_layers", "true",
                  "--model.tie_word_embeddings", str(hybrid.tie_word_embeddings).lower(), *data])
        rows["scratch (hybrid architecture)"] = zeros_lm.ZeroSForCausalLM.from_pretrained(scratch / "hf").eval()

    pair_counts = [int(p) for p in args.recall_pairs.split(",") if p.strip()]
    keys, values = recall_token_ids(tokenizer)
    results = {}
    for name, model in rows.items():
        results[name] = {"perplexity": held_out_perplexity(model, blocks),
                         **{f"state_bytes_{c}": state_bytes(model, c) for c in CONTEXTS},
                         "recall": {str(p): acc for p, acc in recall_probe(model, keys, values, pair_counts,
                                                                           sequences=args.recall_sequences).items()}}
        print(f"{name}: perplexity {results[name]['perplexity']:.2f}, recall {results[name]['recall']}", flush=True)
    results["_setup"] = {"teacher": args.teacher, "tokens": args.tokens, "seq_len": args.seq_len,
                         "eval_tokens": int(blocks[:, 1:].numel()), "softmax_every": args.softmax_every,
                         "linearize_options": args.linearize_options,
                         "recall": {"pairs": pair_counts, "sequences": args.recall_sequences, "seed": RECALL_SEED,
                                    "key_ids": [int(keys[0]), int(keys[-1])], "value_ids": [int(values[0]), int(values[-1])],
                                    "chance": 1 / len(values)}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    teacher_ppl = results["teacher"]["perplexity"]
    recall_heads = "".join(f" recall @ {p} pairs |" for p in pair_counts)
    print(f"\n| model | held-out ppl | vs teacher | state @ {CONTEXTS[0]} | state @ {CONTEXTS[1]} |{recall_heads}\n"
          f"|---|---|---|---|---|" + "---|" * len(pair_counts))
    for name, r in results.items():
        if name.startswith("_"):
            continue
        print(f"| {name} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / teacher_ppl - 1):+.1f}% | "
              f"{r[f'state_bytes_{CONTEXTS[0]}'] / 2**20:.2f} MiB | {r[f'state_bytes_{CONTEXTS[1]}'] / 2**20:.2f} MiB |"
              + "".join(f" {r['recall'][str(p)]:.3f} |" for p in pair_counts))
    if pair_counts:
        print(f"(recall: {args.recall_sequences} sequences per length, chance {1 / len(values):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
