"""Linearize a pretrained softmax transformer into a ZeroS (or hybrid) model (docs/linearize.md).

    zeros-lm linearize TEACHER --out DIR [options]

    zeros-lm linearize runs/softmax/hf --out runs/softmax-zeros --softmax-every 4          # 1 layer in 4 stays softmax
    zeros-lm linearize SmolLM2-135M-Instruct.Q4_1.gguf --out smol-zeros --keep-softmax 7 --tokens 2000000
    zeros-lm linearize TEACHER --out DIR --resume                                          # continue an interrupted run

TEACHER: a Hugging Face Llama-family causal-LM directory (Llama, Mistral, Qwen2-style without q/k/v
biases), a ``.gguf`` file, or a softmax model of this framework. The data options are pretraining's
(``--data.*``; the embedded corpus by default), tokenised with the teacher's tokenizer. Stage 1 (attention
transfer) and stage 2 (distillation) run as Lightning fits with pretraining's checkpoints, logs and
progress bars in ``--run-dir`` (default ``DIR.work``); ``--resume`` continues where a run stopped. The
output DIR is a Hugging Face directory with the teacher's tokenizer, chat template and generation
config; its config.json records the teacher, the recipe and the tokens (``linearized_from``).

Bad arguments, a missing teacher or an unsupported architecture: one line starting with ``error:``,
exit status 2, nothing written.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal, Optional

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# validation blocks (sequences), whatever --data.batch_size is: for the init's mean queries and output scales, and
# for the per-layer transfer errors (which --keep-softmax chooses by) and the held-out perplexities
CALIBRATION_BLOCKS = 16
EVAL_BLOCKS = 32
STAGE1_SHARE = 0.5  # of --tokens


def build_parser():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Trainer

    from zeros_lm.data import TextDataModule

    parser = ArgumentParser(prog="zeros-lm linearize", description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", help="HF Llama-family directory, .gguf file, or zeros-lm softmax model directory")
    parser.add_argument("--out", required=True, help="the output Hugging Face directory")
    parser.add_argument("--run-dir", default=None, help="checkpoints, logs and the stages' models (default: OUT.work)")
    parser.add_argument("--tokens", type=Optional[int], default=None,
                        help="training tokens of both stages together (default: 0.1 per teacher parameter, at least 262,144)")
    parser.add_argument("--stage1-share", type=float, default=STAGE1_SHARE, help="share of --tokens for stage 1")
    parser.add_argument("--layer-types", type=Optional[str], default=None,
                        help="comma-separated, one per layer: linear_attention (converted) or full_attention (stays softmax)")
    parser.add_argument("--softmax-every", type=int, default=0, help="every N-th layer (N-1, 2N-1, ...) stays softmax")
    parser.add_argument("--keep-softmax", type=int, default=0,
                        help="after stage 1, the K layers with the largest transfer error go back to softmax")
    parser.add_argument("--conv-size", type=int, default=0, help="short convolution in the converted layers (0: off)")
    parser.add_argument("--trainable", type=Literal["attention", "lora", "all"], default="attention",
                        help="stage 2's trainable parameters")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of stage 2's low-rank adapters (--trainable lora)")
    parser.add_argument("--next-token-weight", type=float, default=0.0,
                        help="stage 2: weight of the next-token loss beside the KL (0.05-0.2 helped a small teacher; "
                             "docs/linearize.md)")
    parser.add_argument("--lr-transfer", type=float, default=1e-3, help="stage 1 peak learning rate")
    parser.add_argument("--lr-distill", type=float, default=3e-4, help="stage 2 peak learning rate")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint interval in optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT and the run directory")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_class_arguments(TextDataModule, "data", skip={"document_resets"})
    parser.add_class_arguments(
        Trainer, "trainer",
        skip={"max_steps", "max_epochs", "min_steps", "min_epochs", "default_root_dir", "callbacks", "logger",
              "enable_checkpointing", "num_sanity_val_steps", "check_val_every_n_epoch", "max_time", "fast_dev_run",
              "limit_train_batches", "overfit_batches", "model_registry", "plugins"},
    )
    parser.set_defaults({"trainer.val_check_interval": 50, "trainer.log_every_n_steps": 10,
                         "trainer.gradient_clip_val": 1.0, "trainer.enable_model_summary": False})
    return parser


def _softmax_layers(args, num_layers: int) -> list[int]:
    from zeros_lm.configuration_zeros import FULL_LAYER, LAYER_TYPES
    from zeros_lm.linearize import LinearizeError

    given = []
    if args.layer_types:
        kinds = [k.strip() for k in args.layer_types.split(",")]
        if len(kinds) != num_layers or any(k not in LAYER_TYPES for k in kinds):
            raise LinearizeError(f"--layer-types must list {num_layers} entries (the teacher's layers), each of {LAYER_TYPES}")
        given = [i for i, k in enumerate(kinds) if k == FULL_LAYER]
    if args.softmax_every < 0:
        raise LinearizeError(f"--softmax-every must be >= 0, got {args.softmax_every}")
    if args.softmax_every:
        given += [i for i in range(num_layers) if (i + 1) % args.softmax_every == 0]
    if not 0 <= args.keep_softmax < num_layers:
        raise LinearizeError(f"--keep-softmax must be in [0, {num_layers - 1}] (the teacher has {num_layers} layers)")
    given = sorted(set(given))
    if len(given) == num_layers:
        raise LinearizeError("every layer would stay softmax: there is nothing to convert")
    return given


def _check_paths(args) -> Path:
    from zeros_lm.linearize import LinearizeError

    out, run = Path(args.out), Path(args.run_dir or f"{args.out}.work")
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} exists and is not a directory")
    if args.resume and args.overwrite:
        raise LinearizeError("--resume and --overwrite exclude each other")
    if not args.overwrite:
        if out.is_dir() and any(out.iterdir()):
            raise LinearizeError(f"--out {out} is not empty; choose another directory, or replace it with --overwrite")
        if run.is_dir() and any(run.iterdir()) and not args.resume:
            raise LinearizeError(f"the run directory {run} holds an earlier linearization; continue it with --resume "
                                 "or replace it with --overwrite")
    return run


def _trainer(args, root: Path, max_steps: int):
    from lightning.pytorch import Trainer

    from zeros_lm.callbacks import StepProgressBar, ThroughputLogger, ZeroSCheckpoint
    from zeros_lm.cli.train import default_loggers

    options = dict(vars(args.trainer)) if not isinstance(args.trainer, dict) else dict(args.trainer)
    interval = options.get("val_check_interval")
    if isinstance(interval, int) and interval > max_steps:
        options["val_check_interval"] = max_steps
    callbacks = [ZeroSCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=args.checkpoint_every),
                 ThroughputLogger()]
    if options.get("enable_progress_bar") is not False:
        callbacks.append(StepProgressBar())
    return Trainer(**options, max_steps=max_steps, default_root_dir=str(root), callbacks=callbacks,
                   logger=default_loggers(str(root)), num_sanity_val_steps=0, check_val_every_n_epoch=None)


def _resume_path(root: Path, resume: bool) -> Optional[str]:
    last = root / "checkpoints" / "last.ckpt"
    return str(last) if resume and os.path.lexists(last) else None


def _trained_model(module, trainer):
    """The stage's trained student (consolidated from the checkpoint under DeepSpeed)."""
    from zeros_lm.strategies import uses_deepspeed

    if uses_deepspeed(trainer.strategy):
        from zeros_lm.export import load_checkpoint

        state = load_checkpoint(trainer.checkpoint_callback.save_final(trainer))["state_dict"]
        module.load_state_dict(state, strict=False)
    return module


def _save(model, tokenizer, directory: Path, generation_config=None) -> None:
    from zeros_lm.atomic import atomic_write_dir

    def write(tmp):
        model.save_pretrained(str(tmp), safe_serialization=True)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    atomic_write_dir(directory, write)


def _teacher_generation_config(teacher, spec):
    from transformers import GenerationConfig

    config = getattr(teacher, "generation_config", None)
    if config is None:
        config = GenerationConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is None and getattr(spec, name) is not None:
            setattr(config, name, getattr(spec, name))
    return config


def _blocks(loader, n: int) -> list:
    """The loader's first ``n`` blocks, in its batches (the last one cut to fit; fewer when it has fewer)."""
    out, rows = [], 0
    for batch in loader:
        out.append(batch[: n - rows])
        rows += len(out[-1])
        if rows >= n:
            break
    return out


def _perplexity(model, batches) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


def run(args) -> int:
    import torch
    from lightning.pytorch import seed_everything

    import zeros_lm  # noqa: F401
    from zeros_lm import ZeroSForCausalLM
    from zeros_lm.data import TextDataModule
    from zeros_lm.linearize import (
        RECORD_KEY, DistillLitModule, LinearizeError, TransferLitModule, choose_softmax_layers, convert,
        default_tokens, load_teacher, record, revert_to_softmax, teacher_spec, transfer_errors,
    )

    run_dir = _check_paths(args)
    teacher, tokenizer = load_teacher(args.teacher)
    spec = teacher_spec(teacher)
    given = _softmax_layers(args, spec.num_hidden_layers)
    if args.overwrite:
        for path in (Path(args.out), run_dir):
            if path.is_dir():
                shutil.rmtree(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher_tokenizer_dir = run_dir / "tokenizer"
    if not (teacher_tokenizer_dir / "tokenizer_config.json").is_file():
        _save_tokenizer(tokenizer, teacher_tokenizer_dir)
    seed_everything(args.seed, verbose=False)
    data_args = dict(vars(args.data)) if not isinstance(args.data, dict) else dict(args.data)
    data_args["tokenizer"] = str(teacher_tokenizer_dir)
    dm = TextDataModule(document_resets=False, **data_args)
    if len(dm.tokenizer) > spec.vocab_size:
        raise LinearizeError(f"the teacher's tokenizer has {len(dm.tokenizer)} entries but its model only {spec.vocab_size}")
    val = _blocks(dm.val_dataloader() or dm.train_dataloader(), EVAL_BLOCKS)
    if not val:
        val = _blocks(dm.train_dataloader(), EVAL_BLOCKS)
    per_step = dm.batch_size * dm.seq_len * int(args.trainer.accumulate_grad_batches or 1)
    tokens = args.tokens if args.tokens is not None else default_tokens(sum(p.numel() for p in teacher.parameters()))
    if tokens <= 0:
        raise LinearizeError(f"--tokens must be positive, got {tokens}")
    if not 0 < args.stage1_share < 1:
        raise LinearizeError(f"--stage1-share must be in (0, 1), got {args.stage1_share}")
    steps1 = max(1, round(tokens * args.stage1_share / per_step))
    steps2 = max(1, round(tokens * (1 - args.stage1_share) / per_step))
    recipe = {"stage1": {"objective": "attention transfer (relative MSE per layer)", "steps": steps1,
                         "tokens": steps1 * per_step, "learning_rate": args.lr_transfer},
              "stage2": {"objective": "KL to the teacher's logits", "next_token_weight": args.next_token_weight,
                         "trainable": args.trainable, "lora_rank": args.lora_rank if args.trainable == "lora" else None,
                         "steps": steps2, "tokens": steps2 * per_step, "learning_rate": args.lr_distill},
              "seq_len": dm.seq_len, "data": str(data_args.get("train_files"))}
    print(f"Teacher: {spec.model_type}, {spec.num_hidden_layers} layers x {spec.hidden_size}, {spec.num_attention_heads} heads "
          f"({spec.num_key_value_heads} K/V), vocab {spec.vocab_size}; held-out perplexity {_perplexity(teacher, val):.2f}", flush=True)
    print(f"Plan: stage 1 {steps1} steps, stage 2 {steps2} steps, {per_step:,} tokens a step ({tokens:,} tokens); "
          f"work in {run_dir}", flush=True)

    # Stage 0: map and initialise
    stage0 = run_dir / "stage0"
    if not (stage0 / "config.json").is_file():
        student = convert(teacher, given, calibration_ids=torch.cat(val)[:CALIBRATION_BLOCKS, :-1],
                          seed=args.seed, conv_size=args.conv_size)
        record(student.config, teacher=str(args.teacher), teacher_model_type=spec.model_type, recipe=recipe,
               given_softmax_layers=given)
        _save(student, dm.tokenizer, stage0)

    # Stage 1: attention transfer
    stage1, stage1_hf = run_dir / "stage1", run_dir / "stage1" / "hf"
    if not (stage1_hf / "config.json").is_file():
        module = TransferLitModule(str(args.teacher), str(stage0), learning_rate=args.lr_transfer,
                                   warmup_steps=min(50, steps1 // 10), vocab_size=spec.vocab_size)
        trainer = _trainer(args, stage1, steps1)
        trainer.fit(module, datamodule=dm, ckpt_path=_resume_path(stage1, args.resume))
        student = _trained_model(module, trainer).model.float().eval()
        errors = transfer_errors(teacher, student, [b[:, :-1] for b in val])
        softmax = choose_softmax_layers(errors, args.keep_softmax, given)
        if args.keep_softmax:
            student = revert_to_softmax(teacher, student, softmax)
        record(student.config, transfer_error={str(i): round(e, 5) for i, e in sorted(errors.items())},
               softmax_layers=softmax, chosen_by="keep_softmax" if args.keep_softmax else "given")
        print("Stage 1: transfer error per layer (0 = exact, 1 = no better than zeros): "
              + ", ".join(f"{i}: {e:.3f}" for i, e in sorted(errors.items())) + f"; softmax layers {softmax}", flush=True)
        _save(student, dm.tokenizer, stage1_hf)

    # Stage 2: distillation
    stage2 = run_dir / "stage2"
    module = DistillLitModule(str(args.teacher), str(stage1_hf), trainable=args.trainable, lora_rank=args.lora_rank,
                              next_token_weight=args.next_token_weight, learning_rate=args.lr_distill,
                              warmup_steps=min(50, steps2 // 10), vocab_size=spec.vocab_size)
    trainer = _trainer(args, stage2, steps2)
    trainer.fit(module, datamodule=dm, ckpt_path=_resume_path(stage2, args.resume))
    if not trainer.is_global_zero:
        return 0
    student = _trained_model(module, trainer).merged_model().float().eval()
    ppl = {"teacher": _perplexity(teacher, val), "student": _perplexity(student, val)}
    record(student.config, held_out_perplexity={k: round(v, 4) for k, v in ppl.items()},
           tokens=(steps1 + steps2) * per_step)
    _save(student, dm.tokenizer, Path(args.out), _teacher_generation_config(teacher, spec))
    reloaded = ZeroSForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = float((reloaded(input_ids=val[0][:1, :-1], use_cache=False).logits
                      - student(input_ids=val[0][:1, :-1], use_cache=False).logits).abs().max())
    kinds = reloaded.config.mixer_types
    print(f"Done: {kinds.count('softmax')} of {len(kinds)} layers softmax; held-out perplexity teacher {ppl['teacher']:.2f}, "
          f"student {ppl['student']:.2f}; wrote {args.out} (reloaded, max |logit difference| {diff:.1e}); "
          f"recorded in config.json under {RECORD_KEY!r}", flush=True)
    print(f'Stream a sample with:  python generate.py {args.out} --prompt "def main("', flush=True)
    return 0


def _save_tokenizer(tokenizer, directory: Path) -> None:
    from zeros_lm.atomic import atomic_write_dir

    atomic_write_dir(directory, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def main(argv: Optional[list[str]] = None) -> int:
    from zeros_lm.cli.train import quiet_known_noise
    from zeros_lm.data import DataError
    from zeros_lm.linearize import LinearizeError

    quiet_known_noise()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    try:
        status = run(args)
    except (LinearizeError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nInterrupted; continue with the same command and --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"({(time.time() - start) / 60:.1f} min)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
