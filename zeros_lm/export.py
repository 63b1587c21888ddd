"""Export a trained model as a Hugging Face directory.

From a Lightning checkpoint written by ``train.py`` (a ``.ckpt`` file, or the directory of shards
that DeepSpeed writes), or from a model in memory. The directory holds ``model.safetensors``,
``config.json`` with ``auto_map`` and the modeling code (so it loads with
``trust_remote_code=True`` where ``zeros_lm`` is not installed), the tokenizer and
``generation_config.json``.

Command line (``zeros-lm export`` runs the same)::

    python -m zeros_lm.export CHECKPOINT OUT_DIR [--tokenizer DIR] [--dtype bfloat16] [--overwrite]

What the checkpoint holds besides its weights (the model's config, the tokenizer) is read through
:mod:`zeros_lm.checkpoint`.

A directory that is not empty is only replaced with ``--overwrite`` (``overwrite=True``), only if
it is an earlier export (it holds nothing but a model directory's files: never a training run's
directory or a folder of other files), and then as a whole: the export is written to a temporary
directory beside it and swapped in, so the directory never holds a mix of two models.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

from .atomic import atomic_write_dir, remove_stale_temporaries
from .checkpoint import read_config, read_tokenizer
from .data import load_tokenizer
from .modeling_zeros import ZeroSForCausalLM
from .rundir import export_problem

__all__ = [
    "ExportError",
    "CheckpointError",
    "load_checkpoint",
    "check_checkpoint",
    "newest_readable_checkpoint",
    "export_from_checkpoint",
    "export_model",
    "compare_logits",
    "main",
]

MODEL_PREFIX = "model."
EXIT_ERROR = 2  # bad input or misuse: one line starting with "error:", as every zeros-lm command


class ExportError(ValueError):
    """A problem with an export's input or output, reported as one line."""


class CheckpointError(ExportError):
    """A checkpoint that cannot be read (missing, truncated, or not written by ``train.py``)."""


def _is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir())


def _zip_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable ``torch.save`` archive (None if it looks whole): the zip
    directory sits at the end of the file, so a truncated file has none."""
    if not zipfile.is_zipfile(path):
        return "truncated, or not a file written by torch.save"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive, but not one written by torch.save"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{type(e).__name__}: {e}"
    return None


def checkpoint_problem(path) -> Optional[str]:
    """Why ``path`` cannot be resumed from or exported (None if it can), without loading its
    tensors: a file must be a whole ``torch.save`` archive holding a Lightning ``state_dict``; a
    DeepSpeed directory must hold its model-state shards."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            return f"it points to {os.readlink(p)}, which does not exist"
        return "it does not exist"
    if p.is_dir():
        if not _is_deepspeed_checkpoint(p):
            return "a directory, but not a DeepSpeed checkpoint (no 'latest' file)"
        tag = (p / "latest").read_text().strip() if (p / "latest").is_file() else "checkpoint"
        shards = sorted((p / tag).glob("*model_states.pt")) if (p / tag).is_dir() else []
        if not shards:
            return f"a DeepSpeed checkpoint without model states in {tag}/"
        for shard in shards:
            problem = _zip_problem(shard)
            if problem:
                return f"its shard {shard.name} is {problem}"
        return None
    problem = _zip_problem(p)
    if problem:
        return problem
    try:
        # Memory-mapped: the tensors are not read, only the archive's structure and metadata.
        checkpoint = torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "a torch file, but not a train.py checkpoint (no state_dict)"
    return None


def _step_order(path: Path) -> tuple:
    import re

    match = re.search(r"step=(\d+)", path.name)
    return (int(match.group(1)) if match else -1, path.lstat().st_mtime)


def newest_readable_checkpoint(directory, exclude=()) -> Optional[Path]:
    """The newest checkpoint in ``directory`` (highest step, then latest written) that
    :func:`checkpoint_problem` finds nothing wrong with; links (``last.ckpt``) and ``exclude`` are
    skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    skip = {os.path.realpath(e) for e in exclude}
    candidates = [
        c for c in directory.iterdir()
        if c.name.endswith(".ckpt") and not c.is_symlink() and os.path.realpath(c) not in skip
    ]
    for candidate in sorted(candidates, key=_step_order, reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate
    return None


def unreadable_checkpoint(path, problem: str) -> CheckpointError:
    """The one-line error for an unreadable checkpoint, naming the newest readable one beside it."""
    p = Path(path)
    shown = str(p)
    if p.is_symlink():
        shown += f" (-> {os.readlink(p)})"
    alternative = newest_readable_checkpoint(p.parent, exclude=[p])
    advice = (
        f"the newest readable checkpoint there is {alternative}: use that one"
        if alternative is not None
        else f"no other readable checkpoint in {p.parent}"
    )
    return CheckpointError(f"cannot read the checkpoint {shown}: {problem}; {advice}")


def check_checkpoint(path) -> None:
    """Raise :class:`CheckpointError` (naming the newest readable alternative) unless ``path`` can
    be read; cheap, see :func:`checkpoint_problem`."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise unreadable_checkpoint(path, problem)


def load_checkpoint(path: str) -> dict:
    """The checkpoint as a plain dict with a full fp32 ``state_dict`` (DeepSpeed shards are
    consolidated). An unreadable one raises :class:`CheckpointError`."""
    p = Path(path)
    check_checkpoint(p)
    if p.is_dir():
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import io

        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), _quiet_tqdm():
            try:
                checkpoint = convert_zero_checkpoint_to_fp32_state_dict(str(p), os.path.join(tmp, "consolidated.pt"))
            except Exception as e:  # noqa: BLE001
                raise unreadable_checkpoint(p, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        return checkpoint
    try:
        return torch.load(str(p), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - e.g. damaged in the middle, which the cheap check cannot see
        raise unreadable_checkpoint(p, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


@contextlib.contextmanager
def _quiet_tqdm():
    """DeepSpeed's consolidation shows tqdm bars; silence them (stderr) unless it fails."""
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def _model_state_dict(checkpoint: dict) -> dict:
    state = checkpoint.get("state_dict")
    if state is None:
        raise ExportError("the checkpoint has no state_dict")
    out = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not out:
        raise ExportError("the checkpoint's state_dict holds no 'model.' weights: not a zeros-lm checkpoint?")
    return out


def _config_from_checkpoint(checkpoint: dict):
    try:
        return read_config(checkpoint)
    except ValueError as e:
        raise ExportError(str(e)) from None


def build_model(checkpoint: dict):
    """A ``ZeroSForCausalLM`` with the checkpoint's trained weights (float32)."""
    config = _config_from_checkpoint(checkpoint)
    model = ZeroSForCausalLM(config)
    state = _model_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if not (config.tie_word_embeddings and k in tied)]
    if missing or unexpected:
        raise ExportError(f"the checkpoint's weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.float().eval()


def _generation_config(model_config, generation: Optional[dict]):
    g = {"max_new_tokens": 200, "temperature": 0.8, "top_p": 0.95}
    g.update(generation or {})
    return GenerationConfig(
        bos_token_id=model_config.bos_token_id,
        eos_token_id=model_config.eos_token_id,
        pad_token_id=model_config.pad_token_id,
        do_sample=True,
        **g,
    )


@contextlib.contextmanager
def _quiet_transformers():
    """No per-shard progress bars from transformers while exporting / reloading."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_target(out_dir, overwrite: bool = False) -> None:
    """Raise :class:`ExportError` if ``out_dir`` may not be written: a file; a directory that is not
    an earlier export (a run's directory, or one holding other files: see
    :func:`zeros_lm.rundir.export_problem`), whatever ``overwrite`` says; an earlier export unless
    ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"the export target {out} exists and is not a directory")
    problem = export_problem(out)
    if problem:
        raise ExportError(
            f"the export target {out} {problem}; an export replaces its directory as a whole, and --overwrite "
            "only ever replaces an earlier export: choose another directory"
        )
    if out.is_dir() and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise ExportError(
                f"the export target {out} is not empty (it holds {shown}); choose another directory, "
                "or replace it as a whole with --overwrite"
            )


def export_model(
    model,
    tokenizer,
    out_dir: str,
    generation: Optional[dict] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
):
    """Write ``model`` (a ``ZeroSForCausalLM``), ``tokenizer`` and a generation config to ``out_dir``.

    A non-empty ``out_dir`` raises :class:`ExportError` unless ``overwrite``; it is then replaced
    as a whole: written beside it and swapped in (:func:`zeros_lm.atomic.atomic_write_dir`), so it
    never holds a mix of two models, and a failure leaves it as it was."""
    check_target(out_dir, overwrite)
    out = Path(out_dir).absolute()
    remove_stale_temporaries(out.parent, of=out.name)  # what exports that were killed left beside it
    with _quiet_transformers():
        atomic_write_dir(out_dir, lambda tmp: _export_model(model, tokenizer, tmp, generation, dtype))
    return str(out_dir)


def _export_model(model, tokenizer, out_dir, generation, dtype):
    out = Path(out_dir)
    was_training = model.training
    model.eval()
    try:
        if dtype is not None and dtype != torch.float32:
            import copy

            model = copy.deepcopy(model).to(dtype)
        elif any(p.dtype != torch.float32 for p in model.parameters()):
            import copy

            model = copy.deepcopy(model).float()
        model.save_pretrained(str(out), safe_serialization=True)
        _generation_config(model.config, generation).save_pretrained(str(out))
    finally:
        model.train(was_training)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return str(out)


def export_from_checkpoint(
    checkpoint_path: str,
    out_dir: str,
    tokenizer=None,
    generation: Optional[dict] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
):
    """Export a ``train.py`` checkpoint (plain file or DeepSpeed directory). The tokenizer stored in
    the checkpoint is used unless one is given. ``overwrite``: see :func:`export_model`."""
    check_target(out_dir, overwrite)
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    if tokenizer is None:
        tokenizer = read_tokenizer(checkpoint)
    if tokenizer is None:
        raise ExportError("the checkpoint holds no tokenizer; pass one with --tokenizer DIR")
    if len(tokenizer) != model.config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary {model.config.vocab_size}"
        )
    export_model(model, tokenizer, out_dir, generation=generation, dtype=dtype, overwrite=overwrite)
    return model


@torch.no_grad()
def compare_logits(out_dir: str, input_ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """Reload ``out_dir`` with ``AutoModelForCausalLM.from_pretrained`` and compare its logits with
    ``reference`` on ``input_ids`` (importing zeros_lm registered the model with the Auto classes)."""
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    diff = (logits - reference.float()).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "probe_shape": list(input_ids.shape)}


def main(argv: Optional[list[str]] = None) -> int:
    # "zeros-lm export" when run by the zeros-lm command (it sets sys.argv[0]), else the module.
    invoked_as = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(
        prog=invoked_as if invoked_as.startswith("zeros-lm") else "python -m zeros_lm.export",
        description="Export a train.py checkpoint (a .ckpt file or a DeepSpeed checkpoint directory) "
        "as a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint file or DeepSpeed checkpoint directory (e.g. runs/default/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="directory to write")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one stored in the checkpoint)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-check", action="store_true", help="skip reloading the export and comparing logits")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier export (as a whole, never mixed)"
    )
    args = parser.parse_args(argv)

    try:
        tokenizer = None
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        dtype = getattr(torch, args.dtype)
        model = export_from_checkpoint(
            args.checkpoint, args.out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=args.overwrite
        )
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"Exported {args.checkpoint} -> {args.out_dir}")
    if not args.no_check:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=g)
        with torch.no_grad():
            ref = model.to(getattr(torch, args.dtype)).float()(input_ids=ids, use_cache=False).logits
        check = compare_logits(args.out_dir, ids, ref)
        print(f"Reloaded with from_pretrained: max |logit difference| = {check['max_abs_diff']:.2e}")
    print(f'Stream a sample with:  python generate.py {args.out_dir} --prompt "def main("')
    return 0


if __name__ == "__main__":
    sys.exit(main())
