"""Export a trained model as a Hugging Face directory.

From a Lightning checkpoint written by ``train.py`` (a ``.ckpt`` file, or the directory of shards
that DeepSpeed writes), or from a model in memory. The directory holds ``model.safetensors``,
``config.json`` with ``auto_map`` and the modeling code (so it loads with
``trust_remote_code=True`` where ``zeros_lm`` is not installed), the tokenizer and
``generation_config.json``.

Command line::

    python -m zeros_lm.export CHECKPOINT OUT_DIR [--tokenizer DIR] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["load_checkpoint", "export_from_checkpoint", "export_model", "compare_logits", "main"]

CHECKPOINT_KEY = "zeros_lm"
MODEL_PREFIX = "model."


class ExportError(ValueError):
    pass


def _is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir())


def load_checkpoint(path: str) -> dict:
    """The checkpoint as a plain dict with a full fp32 ``state_dict`` (DeepSpeed shards are
    consolidated)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"no such checkpoint: {path!r}")
    if p.is_dir():
        if not _is_deepspeed_checkpoint(p):
            raise ExportError(f"{path!r} is a directory but not a DeepSpeed checkpoint (no 'latest' file)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import io

        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), _quiet_tqdm():
            checkpoint = convert_zero_checkpoint_to_fp32_state_dict(str(p), os.path.join(tmp, "consolidated.pt"))
        return checkpoint
    return torch.load(str(p), map_location="cpu", weights_only=False)


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
    from zeros_lm import ZeroSConfig

    extra = checkpoint.get(CHECKPOINT_KEY) or {}
    if extra.get("config"):
        cfg = dict(extra["config"])
        for k in ("auto_map", "architectures", "transformers_version", "model_type"):
            cfg.pop(k, None)
        return ZeroSConfig(**cfg)
    hp = dict(checkpoint.get("hyper_parameters") or {})
    if not hp:
        raise ExportError("the checkpoint holds neither a zeros-lm config nor hyper-parameters")
    keys = ZeroSConfig.__init__.__code__.co_varnames
    return ZeroSConfig(**{k: v for k, v in hp.items() if k in keys and k not in ("self", "kwargs")})


def _tokenizer_from_checkpoint(checkpoint: dict):
    from .data import tokenizer_from_json

    extra = checkpoint.get(CHECKPOINT_KEY) or {}
    js = extra.get("tokenizer_json")
    return tokenizer_from_json(js) if js else None


def build_model(checkpoint: dict):
    """A ``ZeroSForCausalLM`` with the checkpoint's trained weights (float32)."""
    from zeros_lm import ZeroSForCausalLM

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
    from transformers import GenerationConfig

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
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def export_model(model, tokenizer, out_dir: str, generation: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    """Write ``model`` (a ``ZeroSForCausalLM``), ``tokenizer`` and a generation config to ``out_dir``."""
    with _quiet_transformers():
        return _export_model(model, tokenizer, out_dir, generation, dtype)


def _export_model(model, tokenizer, out_dir, generation, dtype):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
):
    """Export a ``train.py`` checkpoint (plain file or DeepSpeed directory). The tokenizer stored in
    the checkpoint is used unless one is given."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    if tokenizer is None:
        tokenizer = _tokenizer_from_checkpoint(checkpoint)
    if tokenizer is None:
        raise ExportError("the checkpoint holds no tokenizer; pass one with --tokenizer DIR")
    if len(tokenizer) != model.config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary {model.config.vocab_size}"
        )
    export_model(model, tokenizer, out_dir, generation=generation, dtype=dtype)
    return model


@torch.no_grad()
def compare_logits(out_dir: str, input_ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """Reload ``out_dir`` with ``AutoModelForCausalLM.from_pretrained`` and compare its logits with
    ``reference`` on ``input_ids``."""
    import zeros_lm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    diff = (logits - reference.float()).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "probe_shape": list(input_ids.shape)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zeros_lm.export",
        description="Export a train.py checkpoint (a .ckpt file or a DeepSpeed checkpoint directory) "
        "as a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint file or DeepSpeed checkpoint directory (e.g. runs/default/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="directory to write")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one stored in the checkpoint)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-check", action="store_true", help="skip reloading the export and comparing logits")
    args = parser.parse_args(argv)

    import zeros_lm  # noqa: F401

    try:
        tokenizer = None
        if args.tokenizer:
            from .data import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        dtype = getattr(torch, args.dtype)
        model = export_from_checkpoint(args.checkpoint, args.out_dir, tokenizer=tokenizer, dtype=dtype)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
