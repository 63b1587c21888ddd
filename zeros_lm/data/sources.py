"""Where the documents come from: files, directories, glob patterns, the Python standard library,
jsonl / json / parquet tables and hub datasets, read as one ``datasets`` row (column ``text``)
per document. Every problem is one :class:`DataError` naming the file (and row)."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from .cache import die_with
from .errors import DataError

STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """The Python standard library's own ``.py`` sources: no tests, no site-packages."""
    root = stdlib_dir()
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}")
    return _walk(root, extensions=[".py"], exclude=list(STDLIB_EXCLUDED_DIRS))


def _walk(root: Path, extensions: Optional[Sequence[str]], exclude: Sequence[str]) -> list[str]:
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions) if extensions else None
    excluded = set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in excluded)
        for name in sorted(filenames):
            if name.startswith(".") or name in excluded:
                continue
            if exts and not name.endswith(exts):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                out.append(path)
    return out


def resolve_files(
    sources: Union[str, Sequence[str], None],
    extensions: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> list[str]:
    """Expand files, directories (recursively), glob patterns and ``"stdlib"`` into a sorted list
    of files. Raises :class:`DataError` for a missing path, a pattern or directory matching no
    file, or an empty list of sources."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise DataError("no data source given")
    exclude = list(exclude or [])
    files: list[str] = []
    for src in sources:
        if src == "stdlib":
            files.extend(stdlib_files())
            continue
        if src.startswith("stdlib:"):
            # A part of the standard library, e.g. "stdlib:json" or "stdlib:email/*.py".
            rel = src[len("stdlib:") :]
            files.extend(resolve_files([str(stdlib_dir() / rel)], [".py"], list(STDLIB_EXCLUDED_DIRS)))
            continue
        expanded = os.path.expanduser(src)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(globlib.glob(expanded, recursive=True))
            found = []
            for m in matches:
                if os.path.isdir(m):
                    found.extend(_walk(Path(m), extensions, exclude))
                elif os.path.isfile(m):
                    found.append(m)
            if not found:
                raise DataError(f"no file matched the pattern {src!r}")
            files.extend(found)
        elif os.path.isdir(expanded):
            found = _walk(Path(expanded), extensions, exclude)
            if not found:
                what = f" with extension {list(extensions)}" if extensions else ""
                raise DataError(f"no file{what} found in the directory {src!r}")
            files.extend(found)
        elif os.path.isfile(expanded):
            files.append(expanded)
        else:
            raise DataError(f"no such file or directory: {src!r}")
    seen, unique = set(), []
    for f in files:
        a = os.path.abspath(f)
        if a not in seen:
            seen.add(a)
            unique.append(a)
    return sorted(unique)


def _kind(path: str) -> str:
    p = path.lower()
    if p.endswith(JSON_SUFFIXES):
        return "json"
    if p.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def files_fingerprint(files: Sequence[str]) -> str:
    """A hash of the files' paths, sizes and modification times (part of the cache keys)."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_text_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (undecodable byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or leave it out (--data.extensions / --data.exclude)"
        ) from None


def _split_text(text: str, sample_by: str) -> list[str]:
    if sample_by == "document":
        return [text]
    if sample_by == "line":
        return text.splitlines()
    if sample_by == "paragraph":
        return [p for p in text.split("\n\n")]
    raise DataError(f"sample_by must be 'document', 'paragraph' or 'line', got {sample_by!r}")


def _text_generator(files: list[str], sample_by: str, parent_pid: Optional[int] = None) -> Iterator[dict]:
    if parent_pid is not None:
        die_with(parent_pid)
    for f in files:
        for doc in _split_text(_read_text_file(f), sample_by):
            yield {"text": doc}


def unwrap_generation_error(e: BaseException) -> None:
    """Raise the :class:`DataError` that ``e`` (an error of ``datasets`` reading our generator) wraps,
    if any; else return."""
    cause = e
    while cause is not None:
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        cause = cause.__cause__ or cause.__context__
    return None


def _load_structured(kind: str, files: list[str], text_column: str, cache_dir: str, streaming: bool):
    import datasets

    try:
        ds = datasets.load_dataset(
            kind, data_files=files, split="train", cache_dir=None if streaming else cache_dir, streaming=streaming
        )
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        unwrap_generation_error(e)
        problem = _first_structured_problem(kind, files, text_column)
        if problem:
            raise DataError(problem) from None
        message = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"could not read {kind} file(s) {_short(files)}: {message}") from None
    what = f"{kind} file(s) {_short(files)}"
    ds = _select_text_column(ds, text_column, what=what)
    feature = ds.features.get("text") if ds.features is not None else None  # None: streamed, not known yet
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        problem = _first_structured_problem(kind, files, text_column)
        raise DataError(
            problem or f"{what}: the text column {text_column!r} holds {feature}, not strings; set --data.text_column"
        )
    return ds


def describe_value(value: Any) -> str:
    """``a <type> (<short repr>)``, for error messages about a value that is not text."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({shown})"


def _not_a_string(path: str, where: str, text_column: str, value: Any) -> str:
    return (
        f"{path}, {where}: the text column {text_column!r} holds {describe_value(value)}, not a string; "
        "fix that row, or choose another column with --data.text_column"
    )


def _first_structured_problem(kind: str, files: Sequence[str], text_column: str) -> Optional[str]:
    """The first row of the first file that is malformed or whose text column is not a string, as
    a one-line message naming the file and row (None if none is found). Only called once reading
    has failed, so it may read the files again."""
    for path in files:
        try:
            problem = (_json_problem if kind == "json" else _parquet_problem)(path, text_column)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{path}: cannot be read as {kind}: {' '.join(str(e).split())}"
        if problem:
            return problem
    return None


def _json_problem(path: str, text_column: str) -> Optional[str]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                whole = _json_document_problem(path, opener, text_column)
                if whole is not False:  # the file is one JSON document, not JSON lines
                    return whole
                return f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
            if isinstance(record, list):  # a JSON document written on one line
                problem = _records_problem(path, record, text_column, where=lambda i: f"record {i}")
            else:
                problem = _records_problem(path, [record], text_column, where=lambda i, n=n: f"line {n}")
            if problem:
                return problem
    return None


def _records_problem(path: str, records: list, text_column: str, where) -> Optional[str]:
    """The first record (a dict) whose text column holds something other than a string or null;
    ``where(i)`` names the i-th record (1-based) in the message."""
    for i, record in enumerate(records, 1):
        value = record.get(text_column) if isinstance(record, dict) else None
        if value is not None and not isinstance(value, str):
            return _not_a_string(path, where(i), text_column, value)
    return None


def _json_document_problem(path: str, opener, text_column: str):
    """For a file holding one JSON document (a list of records): its problem, None, or False if it
    is not one valid JSON document."""
    with opener(path, "rt", encoding="utf-8") as fh:
        try:
            document = json.load(fh)
        except json.JSONDecodeError:
            return False
    records = document if isinstance(document, list) else [document]
    return _records_problem(path, records, text_column, where=lambda i: f"record {i}")


def _parquet_problem(path: str, text_column: str) -> Optional[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_column not in schema.names:
        return None
    for i, value in enumerate(pq.read_table(path, columns=[text_column]).column(0).to_pylist(), 1):
        if value is not None and not isinstance(value, str):
            return _not_a_string(path, f"row {i}", text_column, value)
    return None


def _select_text_column(ds, text_column: str, what: str):
    columns = ds.column_names
    if columns is None:  # a streaming dataset whose features are unknown until read
        first = next(iter(ds), None)
        columns = list(first) if first else []
    if text_column not in columns:
        raise DataError(f"{what} has no column {text_column!r} (columns: {columns}); set --data.text_column")
    drop = [c for c in columns if c != text_column]
    if drop:
        ds = ds.remove_columns(drop)
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def _short(files: Sequence[str], n: int = 3) -> str:
    files = list(files)
    s = ", ".join(files[:n])
    return s + (f" and {len(files) - n} more" if len(files) > n else "")


def load_documents(
    files: list[str],
    *,
    text_column: str = "text",
    sample_by: str = "document",
    cache_dir: str,
    num_proc: Optional[int] = None,
    streaming: bool = False,
):
    """One ``datasets`` row (column ``text``) per document from local files of any supported kind."""
    import datasets

    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_kind(f), []).append(f)
    parts = []
    if "text" in groups:
        text_files = groups["text"]
        features = datasets.Features({"text": datasets.Value("string")})
        if streaming:
            ds = datasets.IterableDataset.from_generator(
                _text_generator, gen_kwargs={"files": text_files, "sample_by": sample_by}, features=features
            )
        else:
            nproc = num_proc if num_proc and num_proc > 1 and len(text_files) >= 4 * num_proc else None
            try:
                ds = datasets.Dataset.from_generator(
                    _text_generator,
                    gen_kwargs={"files": text_files, "sample_by": sample_by, "parent_pid": os.getpid()},
                    features=features,
                    cache_dir=cache_dir,
                    num_proc=nproc,
                )
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                unwrap_generation_error(e)
                raise
        parts.append(ds)
    for kind in ("json", "parquet"):
        if kind in groups:
            parts.append(_load_structured(kind, groups[kind], text_column, cache_dir, streaming))
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts)


def load_hub_documents(name: str, config: Optional[str], split: str, text_column: str, streaming: bool):
    """A dataset by hub name (or a local dataset directory / script), reduced to its text column."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load the dataset {name!r} (config {config!r}, split {split!r}): {e}") from None
    return _select_text_column(ds, text_column, what=f"dataset {name!r}")


__all__ = [
    "STDLIB_EXCLUDED_DIRS",
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "stdlib_dir",
    "stdlib_files",
    "resolve_files",
    "load_documents",
    "load_hub_documents",
    "describe_value",
    "files_fingerprint",
    "unwrap_generation_error",
]
