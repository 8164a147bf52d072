"""What the code and the docs point at exists in this repository: every repository path named
in a comment, docstring, README or config; every `docs/DESIGN.md §N` section (and the `"Name"`
subsection after it); every `CONTRIBUTING.md "Section"` and `README "Section"`. Design notes
outside the repository (a design file at the top, a style file) are not references a reader can
follow, so naming one is an error too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "unimoe_ray"
SCANNED_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".txt", ".json"}
SCANNED_NAMES = {"Makefile", "run"}  # run: .ci/run
# Not ours, or generated: the venv, caches, run outputs, user data written by the jobs' defaults.
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "outputs", "build", "node_modules"}
SKIPPED_TOP = {"data"}  # README's examples write data/mini etc. at the top
# Raw benchmark rows (machine records, not references), and this file: its patterns and planted
# examples are references on purpose (the planted ones are tested below, one by one).
SKIPPED_FILES = {"benchmarks/results", "tests/unit/test_docs_refs.py"}

TOP_DIRS = (
    "unimoe_ray",
    "jobs",
    "tests",
    "benchmarks",
    "serve_configs",
    "cluster",
    "configs",
    "scripts",
    "docs",
    ".ci",
)
# Folders of outputs: a script names the file it will write there before it has run.
OUTPUT_DIRS = ("benchmarks/results/",)
UNITS = ("model", "audio", "media", "text", "inference", "parallel", "data", "train", "serve")

_DESIGN_WORD = re.compile(r"(?<![\w])([\w./-]*)DESIGN(\.md)?(?![\w])")
_STYLE_WORD = re.compile(r"(?<![\w])STYLE(\.md|\s*§)")
_DESIGN_SECTION = re.compile(r"docs/DESIGN\.md\s*§(\d+)(?:\s*,?\s*\"([^\"\n]+)\")?")
_DOC_SECTION = re.compile(r"(CONTRIBUTING\.md|README(?:\.md)?)\s*\"([^\"\n]+)\"")
_REPO_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./{},*-]*[\w*}/])" % "|".join(re.escape(d) for d in TOP_DIRS))
_UNIT_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/\w+\.py)\b" % "|".join(UNITS))


def _headings(md: str, level: str) -> list[str]:
    return [line[len(level) + 1 :].strip() for line in md.splitlines() if line.startswith(level + " ")]


def design_sections(design_md: str) -> dict[int, tuple[str, list[str]]]:
    """{N: (title, [### subsection titles])} of a `## N. Title` document."""
    sections: dict[int, tuple[str, list[str]]] = {}
    current = None
    for line in design_md.splitlines():
        if m := re.match(r"## (\d+)\. (.+)", line):
            current = int(m.group(1))
            sections[current] = (m.group(2).strip(), [])
        elif line.startswith("### ") and current is not None:
            sections[current][1].append(line[4:].strip())
    return sections


def _expand(path: str) -> list[str]:
    """`jobs/train_stage{1,2,3}.py` -> its three paths."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",") for x in _expand(path[: m.start()] + alt + path[m.end() :])]


def _exists(path: str, repo: Path) -> bool:
    if "*" in path:
        return any(repo.glob(path))
    return (repo / path).exists()


def problems(text: str, where: str, *, repo: Path, design_md: str, docs: dict[str, str]) -> list[str]:
    """Every reference in `text` that leads nowhere, one line each."""
    found = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    for m in _DESIGN_WORD.finditer(text):
        if m.group(0) != "docs/DESIGN.md":
            found.append(
                f"{where}:{line_of(m.start())}: {m.group(0)!r} is not a repository file: point at docs/DESIGN.md §N"
            )
    for m in _STYLE_WORD.finditer(text):
        found.append(
            f'{where}:{line_of(m.start())}: {m.group(0)!r} is not a repository file: point at CONTRIBUTING.md "Style"'
        )
    sections = design_sections(design_md)
    for m in _DESIGN_SECTION.finditer(text):
        n, sub = int(m.group(1)), m.group(2)
        if n not in sections:
            found.append(
                f"{where}:{line_of(m.start())}: docs/DESIGN.md has no §{n} (it has §"
                + ", §".join(map(str, sorted(sections)))
                + ")"
            )
        elif sub and sub not in sections[n][1]:
            found.append(
                f"{where}:{line_of(m.start())}: docs/DESIGN.md §{n} has no subsection {sub!r} (it has {sections[n][1]})"
            )
    for m in _DOC_SECTION.finditer(text):
        doc = "CONTRIBUTING.md" if m.group(1).startswith("CONTRIBUTING") else "README.md"
        heads = [h for level in ("##", "###", "####") for h in _headings(docs[doc], level)]
        if not any(h == m.group(2) or h.startswith(m.group(2) + " ") for h in heads):  # "Serving (Ray Serve): .."
            found.append(f"{where}:{line_of(m.start())}: {doc} has no section {m.group(2)!r}")
    for m in _REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".,")
        if path.startswith(OUTPUT_DIRS):
            continue
        for p in _expand(path):
            if not _exists(p, repo):
                found.append(f"{where}:{line_of(m.start())}: {p} does not exist in the repository")
    for m in _UNIT_PATH.finditer(text):
        if not (repo / PACKAGE / m.group(1)).exists() and not (repo / m.group(1)).exists():
            found.append(f"{where}:{line_of(m.start())}: {PACKAGE}/{m.group(1)} does not exist in the repository")
    return found


def scanned_files(repo: Path = REPO) -> list[Path]:
    out = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if (
            not path.is_file()
            or SKIPPED_DIRS & set(rel.parts)
            or rel.parts[0] in SKIPPED_TOP
            or any(p.endswith(".egg-info") for p in rel.parts)
            or any(str(rel).startswith(s) for s in SKIPPED_FILES)
        ):
            continue
        if path.suffix in SCANNED_SUFFIXES or path.name in SCANNED_NAMES:
            out.append(path)
    return out


def _docs(repo: Path = REPO) -> dict[str, str]:
    return {name: (repo / name).read_text(encoding="utf-8") for name in ("CONTRIBUTING.md", "README.md")}


def test_every_reference_in_the_repository_leads_somewhere():
    files = scanned_files()
    rels = {str(p.relative_to(REPO)) for p in files}
    assert {"README.md", "docs/DESIGN.md", "unimoe_ray/config.py", ".ci/run", "Makefile"} <= rels
    design_md = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    docs = _docs()
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        found += problems(text, str(path.relative_to(REPO)), repo=REPO, design_md=design_md, docs=docs)
    assert found == [], "\n".join(found)


def test_the_design_doc_has_its_numbered_sections():
    sections = design_sections((REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8"))
    assert sorted(sections) == [1, 2, 3, 4, 5]
    assert {"Prompts", "Decoding"} <= set(sections[1][1])


# The checker on planted references, one per rule (this file is left out of the scan above).
_DESIGN = "## 1. The model\n### Prompts\ntext\n## 2. Training\n"
_DOCS = {
    "CONTRIBUTING.md": "# C\n## Style\n## Lint\n",
    "README.md": "# R\n### Installing by hand\n### Serving (Ray Serve): the API\n",
}
D, S = "DESIGN" + ".md", "STYLE" + ".md"


def _check(text: str) -> list[str]:
    return problems(text, "x.py", repo=REPO, design_md=_DESIGN, docs=_DOCS)


def test_good_references_pass():
    assert (
        _check(
            f'(docs/{D} §1 "Prompts"), docs/{D} §2, CONTRIBUTING.md "Lint", README "Installing by hand", '
            'README "Serving", '
            "unimoe_ray/config.py, inference/generate.py, jobs/train_stage{1,2,3}.py, jobs/*.py"
        )
        == []
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"see {D} §1", "'DESIGN.md' is not a repository file"),
        ("see DESIGN §5", "'DESIGN' is not a repository file"),
        (f"see ../shared/{D}", "'../shared/DESIGN.md' is not a repository file"),
        (f"{S} §1: the math", "'STYLE.md' is not a repository file"),
        (f"docs/{D} §7", "docs/DESIGN.md has no §7 (it has §1, §2)"),
        (f'docs/{D} §2 "Prompts"', "docs/DESIGN.md §2 has no subsection 'Prompts'"),
        ('CONTRIBUTING.md "Tests"', "CONTRIBUTING.md has no section 'Tests'"),
        ("see unimoe_ray/data/video.py", "unimoe_ray/data/video.py does not exist"),
        ("(serve/nothing.py)", "unimoe_ray/serve/nothing.py does not exist"),
        ("jobs/train_stage{1,9}.py", "jobs/train_stage9.py does not exist"),
    ],
)
def test_a_reference_that_leads_nowhere_is_caught(text, message):
    found = _check(f"line one\n{text}\n")
    assert len(found) == 1 and found[0].startswith("x.py:2: ") and message in found[0], found
