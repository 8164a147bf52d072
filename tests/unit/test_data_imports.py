"""The pure pieces of unimoe_ray.data (and unimoe_ray.media, which data, train and serve share)
import without Ray, and every third-party import of the package is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def test_pure_modules_do_not_import_ray():
    code = (
        "import sys\n"
        "import unimoe_ray.media.video, unimoe_ray.data.quality, unimoe_ray.data.music\n"
        "assert 'torch' not in sys.modules, 'video/quality/music must stay numpy-only at import'\n"
        "import unimoe_ray.data.mini_corpus, unimoe_ray.data.decode, unimoe_ray.data.stages\n"
        "import unimoe_ray.data.encode, unimoe_ray.data.balance, unimoe_ray.data.shards\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dist(requirement: str) -> str:
    """'ray[train]>=2.50' -> 'ray'; names normalised as pip does (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_every_third_party_import_is_declared():
    """A clean `pip install` must bring what the code imports: pyproject dependencies or extras,
    or the codec packages scripts/setup_venv.sh installs with --no-deps (pyproject explains why
    they cannot be dependencies)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_dist(r) for r in project["dependencies"]}
    declared |= {_dist(r) for extra in project["optional-dependencies"].values() for r in extra}
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    for line in setup.splitlines():  # `$PIP install -q --no-deps pkg==1.0 pkg2 ...`
        if "install" in line and "--no-deps" in line and not line.lstrip().startswith("#"):
            words = line.split("--no-deps", 1)[1].split("#")[0].split()
            declared |= {_dist(w) for w in words if re.match(r"[A-Za-z0-9]", w)}

    imported = set()
    for root in ("unimoe_ray", "jobs"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"unimoe_ray", "__future__"}

    # An import name maps to the distribution that provides it (dac -> descript-audio-codec);
    # one not installed here (torch_npu, laion_clap) must be declared under its own name.
    provides = importlib.metadata.packages_distributions()
    dists_of = {name: provides.get(name, [name]) for name in sorted(imported)}
    undeclared = {name: dists for name, dists in dists_of.items() if not {_dist(d) for d in dists} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
