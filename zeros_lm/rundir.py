"""A run owns its output directory (``--trainer.default_root_dir``): the run lock, refusing a
directory that holds another run unless it is continued or replaced, and removing a replaced run
once the new one is ready to train. What ``--overwrite`` may replace is decided here too: an earlier
export (recognised by its files, :func:`export_problem`), never a run's directory or anything else."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ._locks import LockBusy, acquire, describe_holder
from .atomic import remove_path

__all__ = [
    "RunError",
    "claim_root_dir",
    "remove_previous_run",
    "export_problem",
    "RUN_LOCK_NAME",
    "EXPORT_CHECK_NAME",
    "EXPORT_FILE_PATTERNS",
]


class RunError(ValueError):
    """A problem with a run's arguments or its output directory, found before any data is prepared."""


RUN_LOCK_NAME = ".run.lock"
EXPORT_CHECK_NAME = "export_check.json"
CHECKPOINT_DIR_NAME = "checkpoints"  # <default_root_dir>/checkpoints
LOGS_DIR_NAME = "logs"  # <default_root_dir>/logs/version_N
# What a Hugging Face model directory holds (weights, configs, tokenizer files), as written by
# save_pretrained; besides these, an export of ours holds the package's modeling code (*.py).
EXPORT_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# The modeling code save_pretrained copies beside the weights comes from the package's own modules.
_PACKAGE_FILES = frozenset(p.name for p in Path(__file__).parent.glob("*.py"))


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _is_export_file(entry: Path) -> bool:
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.name in _PACKAGE_FILES or any(fnmatch.fnmatchcase(entry.name, p) for p in EXPORT_FILE_PATTERNS)


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def export_problem(path) -> Optional[str]:
    """Why the directory ``path`` is not an export that ``--overwrite`` may replace, as the end of a
    sentence starting with its name (None if it is one, is empty or does not exist): a run's
    directory (it holds the run lock, checkpoints or logs), or a directory holding anything else
    than the files of a Hugging Face model directory (:data:`EXPORT_FILE_PATTERNS`) and our modeling
    code."""
    path = Path(path)
    if not path.is_dir():
        return None
    names = sorted(p.name for p in path.iterdir())
    run_marks = [n for n in (RUN_LOCK_NAME, CHECKPOINT_DIR_NAME, LOGS_DIR_NAME) if n in names]
    if run_marks:
        return f"is a training run's directory (it holds {', '.join(run_marks)})"
    others = [n for n in names if not _is_export_file(path / n)]
    if others:
        return f"holds files that are not part of an export ({_shown(others)})"
    return None


def _same_or_inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or inside it (links and spellings resolved)."""
    path, other = Path(os.path.realpath(path)), Path(os.path.realpath(other))
    return path == other or other in path.parents


def _checkpoint_entries(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if p.name.endswith(".ckpt"))


# Lightning's own names for a checkpoint of the run being resumed (not paths)
CKPT_PATH_KEYWORDS = ("last", "best", "hpc")


def _foreign_checkpoint_folder(ckpt_path: str, checkpoint_dir: str) -> Optional[Path]:
    """The folder of ``ckpt_path`` when that is not this run's checkpoint directory (None when it
    is, or ``ckpt_path`` is one of Lightning's keywords)."""
    if ckpt_path in CKPT_PATH_KEYWORDS or str(ckpt_path).startswith("registry"):
        return None
    folder = Path(os.path.realpath(ckpt_path)).parent
    return None if folder == Path(os.path.realpath(checkpoint_dir)) else folder


def _check_export_dir(export: Path, root: Path, checkpoint_dir: Path) -> None:
    """The end-of-training export replaces ``export`` as a whole: it must be a directory of its own
    that is empty, missing, or an earlier export."""
    overlaps = _same_or_inside(export, checkpoint_dir) or _same_or_inside(checkpoint_dir, export)
    if overlaps or _same_or_inside(root, export):
        raise RunError(
            f"the export directory {export} is, holds or lies in the run's own directory or checkpoints; the "
            "export replaces its directory as a whole: give --export.dirpath a directory of its own (default: "
            "<default_root_dir>/hf)"
        )
    problem = export_problem(export)
    if problem:
        raise RunError(
            f"the export directory {export} {problem}; the export would replace it, and --overwrite only ever "
            "replaces an earlier export: give another --export.dirpath"
        )


def claim_root_dir(
    root: str, checkpoint_dir: str, export_dir: Optional[str], ckpt_path: Optional[str], overwrite: bool
) -> list[Path]:
    """Make ``root`` this run's own, before any data is prepared.

    Takes the run lock ``<root>/.run.lock`` (held until the process exits: a second live run in the
    same directory is refused at once), then refuses a directory that holds another run (checkpoints,
    or an export in ``export_dir``) unless this run continues it from one of its own checkpoints
    (``ckpt_path``) or replaces it (``overwrite``). A checkpoint of another run is continued only in
    a directory that holds no run. ``export_dir`` must be empty, missing or an earlier export (see
    :func:`export_problem`), and apart from the run's directory and checkpoints. Returns what a
    replacing run must remove once it is ready to train (see :func:`remove_previous_run`). Raises
    :class:`RunError`.
    """
    root_path = Path(root)
    if ckpt_path is not None and overwrite:
        raise RunError("--ckpt_path continues the run in the directory and --overwrite replaces it: give one of them")
    root_path.mkdir(parents=True, exist_ok=True)
    lock = root_path / RUN_LOCK_NAME
    try:
        acquire(lock, timeout=0)
    except LockBusy as e:
        raise RunError(
            f"another run ({describe_holder(e.holder)}) is using {root_path} right now; wait for it to finish, "
            "or give this one another --trainer.default_root_dir"
        ) from None
    export = Path(export_dir) if export_dir else None
    if export is not None:
        _check_export_dir(export, root_path, Path(checkpoint_dir))
    checkpoints = _checkpoint_entries(Path(checkpoint_dir))
    exported = export is not None and _non_empty(export)
    held = []
    if checkpoints:
        files = [p for p in checkpoints if not p.is_symlink()] or checkpoints
        held.append(f"{len(files)} checkpoint(s) in {checkpoint_dir}")
    if exported:
        held.append(f"an export in {export}")
    if not held:
        return []
    if ckpt_path is not None:
        foreign = _foreign_checkpoint_folder(ckpt_path, checkpoint_dir)
        if foreign is not None:
            raise RunError(
                f"--ckpt_path {ckpt_path} is a checkpoint of another run (in {foreign}), and {root_path} holds a "
                f"run of its own ({' and '.join(held)}); continue from it in its own run's directory or in a new, "
                "empty --trainer.default_root_dir"
            )
        return []
    if not overwrite:
        raise RunError(
            f"{root_path} holds another run ({' and '.join(held)}); continue it with --ckpt_path last, "
            "start a new run in another --trainer.default_root_dir, or replace it with --overwrite"
        )
    return [Path(checkpoint_dir)] + ([export] if exported else []) + [root_path / EXPORT_CHECK_NAME]


def remove_previous_run(paths: list[Path]) -> None:
    """Delete what :func:`claim_root_dir` listed (an overwritten run's checkpoints and export; its
    logs stay, in their own ``logs/version_N``)."""
    removed = [p for p in paths if p.exists() or p.is_symlink()]
    for path in removed:
        remove_path(path)
    if removed:
        rank_zero_info(f"Replacing the earlier run: removed {', '.join(str(p) for p in removed)}")
