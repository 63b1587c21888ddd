"""The documentation stays true to the repository.

- Every parameter of ``ZeroSConfig.__init__`` has a row in the model-field table of
  docs/configuration.md, and every row there is a parameter.
- Every in-repo path that the code, tests, configs, scripts, README.md and the docs cite exists: plain
  references under the repository's top-level folders (as a comment citing the method page does) and
  relative Markdown links. Nothing cites files that live outside the repository.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from zeros_lm.configuration_zeros import ZeroSConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
MODEL_FIELDS_HEADING = "## Model fields"

# Where references are looked for: (folder or file, glob of the files to read).
SCANNED = [
    ("zeros_lm", "**/*.py"),
    ("tests", "**/*.py"),
    ("benchmarks", "**/*.py"),
    ("scripts", "*"),
    ("configs", "*.yaml"),
    ("docs", "*.md"),
    (".", "README.md"),
    (".", "Dockerfile"),
    (".", "pyproject.toml"),
    (".", "train.py"),
    (".", "generate.py"),
]
# Hand-written and generated reports: only their Markdown links are checked (their command lines name
# output folders of the machines they ran on, which are not paths of this repository).
LINKS_ONLY = [("reports", "**/*.md")]

# Top-level folders of the repository: "<folder>/<path>" in any scanned file is a reference to check.
IN_REPO_ROOTS = ("docs", "reports", "configs", "benchmarks", "scripts", "zeros_lm", "tests")
# Folders that only ever appear as examples of where a user's own files or outputs go (a run's
# directory, an export, a corpus, the GPU script's output). Never part of the repository, so a
# Markdown link into one is not checked. Keep this list small.
EXAMPLE_ROOTS = ("runs/", "out/", "corpus/", "gpu_out/")

PLAIN_REFERENCE = re.compile(
    r"(?<![\w./\\-])((?:" + "|".join(IN_REPO_ROOTS) + r")/[\w./*{}<>-]*)"
)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Files that belong to the project's working notes outside this repository; citing them (or the
# folder holding them) sends a reader somewhere they cannot follow.
OUTSIDE_REFERENCE = re.compile(r"(?<![\w./-])(?:ZEROS|GPU|STACK)\.md\b|(?:\.\./|/work/)shared\b")


def _files(spec: list) -> list[Path]:
    found = []
    for folder, pattern in spec:
        base = ROOT / folder
        for path in sorted(base.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".png"):
                found.append(path)
    return found


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _plain_references(text: str) -> set[str]:
    """"root/path" references in text; templates (``{...}``, ``<...>``) are not paths, and a sentence's
    full stop is not part of one."""
    refs = set()
    for match in PLAIN_REFERENCE.finditer(text):
        ref = match.group(1).rstrip(".")
        if any(c in ref for c in "{}<>"):
            continue
        refs.add(ref)
    return refs


def _resolves(ref: str) -> bool:
    """A file or folder of the repository; a glob pattern must match at least one."""
    if "*" in ref:
        return any(ROOT.glob(ref))
    return (ROOT / ref).exists()


def _link_target(md_file: Path, link: str) -> Path | None:
    """The in-repo path a relative Markdown link points at, or None for URLs, anchors and examples."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) or link.startswith("#"):
        return None
    path = link.split("#", 1)[0]
    if not path or path.startswith(EXAMPLE_ROOTS):
        return None
    return (md_file.parent / path).resolve()


def dangling_references() -> list[str]:
    """'file: reference' for every cited in-repo path that does not exist."""
    problems = []
    for path in _files(SCANNED):
        for ref in sorted(_plain_references(_text(path))):
            if not _resolves(ref):
                problems.append(f"{path.relative_to(ROOT)}: {ref}")
    for path in _files(SCANNED + LINKS_ONLY):
        if path.suffix != ".md":
            continue
        for link in MARKDOWN_LINK.findall(_text(path)):
            target = _link_target(path, link)
            if target is None:
                continue
            inside = target == ROOT or ROOT in target.parents
            if not inside or not target.exists():
                problems.append(f"{path.relative_to(ROOT)}: link ({link})")
    return problems


def documented_config_fields() -> list[str]:
    """The backticked names in the first column of docs/configuration.md's model-field table."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert MODEL_FIELDS_HEADING in text, f"docs/configuration.md has no '{MODEL_FIELDS_HEADING}' section"
    section = text.split(MODEL_FIELDS_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`(\w+)`\s*\|", section, flags=re.MULTILINE)


def config_parameters() -> list[str]:
    return [
        name for name, p in inspect.signature(ZeroSConfig.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def test_every_config_field_is_documented():
    documented = documented_config_fields()
    missing = [name for name in config_parameters() if name not in documented]
    assert not missing, (
        f"ZeroSConfig parameters without a row in docs/configuration.md ({MODEL_FIELDS_HEADING}): {missing}; "
        "add one (meaning, default, which layer kinds use it)"
    )


def test_config_table_has_no_stale_or_repeated_rows():
    documented = documented_config_fields()
    stale = sorted(set(documented) - set(config_parameters()))
    assert not stale, f"docs/configuration.md documents fields ZeroSConfig no longer has: {stale}"
    repeated = sorted({name for name in documented if documented.count(name) > 1})
    assert not repeated, f"docs/configuration.md lists these fields twice: {repeated}"


def test_config_table_defaults_match_the_signature():
    """Each row's default column shows the signature's default (numbers compared as numbers)."""
    text = CONFIG_DOC.read_text(encoding="utf-8").split(MODEL_FIELDS_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|", text, flags=re.MULTILINE))
    wrong = []
    for name, p in inspect.signature(ZeroSConfig.__init__).parameters.items():
        if name not in rows:
            continue
        shown = rows[name].strip("`")
        try:
            same = float(shown) == float(p.default)
        except (TypeError, ValueError):
            same = shown.strip('"') == str(p.default)
        if not same:
            wrong.append(f"{name}: docs say {rows[name]}, the signature {p.default!r}")
    assert not wrong, "docs/configuration.md shows other defaults than ZeroSConfig: " + "; ".join(wrong)


def test_every_cited_path_exists():
    problems = dangling_references()
    assert not problems, "cited paths that do not exist in the repository:\n  " + "\n  ".join(problems)


def test_nothing_cites_files_outside_the_repository():
    hits = []
    for path in _files(SCANNED + [("reports", "**/*.md")]):
        for number, line in enumerate(_text(path).splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repository (cite docs/ instead):\n  " + "\n  ".join(hits)


def test_the_scan_sees_references():
    """The scanner itself: it finds the citations it must check, and would report a missing file."""
    assert "docs/method.md" in _plain_references(_text(ROOT / "zeros_lm" / "ops.py"))
    missing = "docs/" + "nowhere.md"  # (spelled in two pieces: this file is scanned too)
    assert _plain_references(f"see {missing}.") == {missing}
    assert not _resolves(missing)
    assert _plain_references("https://pytorch.org/docs/stable/x.html and ~/.cache/zeros_lm/data/ab") == set()
    assert _resolves("configs/*.yaml") and not _resolves("configs/" + "*.nothing")
    assert OUTSIDE_REFERENCE.search("see " + "GPU" + ".md") and not OUTSIDE_REFERENCE.search("see docs/gpu.md")

