"""The README's commands: CI runs its test command verbatim, and its kernel example runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_both_readme_commands_verbatim():
    quick_start = _bash_blocks()[:2]
    train_cmd, test_cmd = (block.strip() for block in quick_start)
    assert train_cmd.endswith("fastmid train")
    assert test_cmd.endswith("pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert train_cmd in ci_lines
    assert test_cmd in ci_lines
    # The demo uses the base install: no extra may bring in what the default path needs.
    assert ".[" not in train_cmd


def test_kernel_example_runs(monkeypatch):
    # The example is plain fp32 CPU code; it must work as written for another trainer.
    monkeypatch.setattr("fastmid.kernels._common.INTERPRET", False)
    python_blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    example = next(b for b in python_blocks if "from fastmid.kernels import lora_linear" in b)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    x, a, b = scope["x"], scope["a"], scope["b"]
    assert scope["y"].shape == (8, 128, 576)
    assert x.grad is not None and a.grad is not None and b.grad is not None
    assert torch.count_nonzero(b.grad) > 0 and torch.count_nonzero(a.grad) == 0  # B starts at 0


def test_readme_is_a_short_guide_with_working_links():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 350
    # The torch build is chosen before the first command runs.
    assert text.index("download.pytorch.org/whl/cpu") < text.index("```bash")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
