"""The "Using fastmid in your own trainer" scripts (docs/trainers.md, linked from the README) run
as written, on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch
from safetensors.torch import load_file

import fastmid.engine.models
from tests.fastmid._runs import make_model_dir

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Using fastmid in your own trainer"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}

try:
    import trl
except ImportError:
    trl = None


def section_scripts() -> dict[str, str]:
    """The section's Python blocks, keyed by the trainer each one drives."""
    text = (ROOT / "docs" / "trainers.md").read_text()
    assert SECTION in text, "docs/trainers.md lost its trainer section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scripts = {
        "loop": [b for b in blocks if "optimizer.step()" in b],
        "trainer": [b for b in blocks if "MidBlockTrainer(" in b],
        "sft": [b for b in blocks if "MidBlockSFTTrainer(" in b],
    }
    assert all(len(found) == 1 for found in scripts.values()), scripts
    return {name: found[0] for name, found in scripts.items()}


@pytest.fixture
def tiny_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts' load_model() gives a tiny Llama with its tokenizer instead of SmolLM2, and
    they write under a temporary directory."""
    model_dir = make_model_dir(tmp_path / "model", num_layers=5)
    load = fastmid.engine.models.load_model
    monkeypatch.setattr(
        fastmid.engine.models, "load_model", lambda spec=None, **kw: load(str(model_dir), **kw)
    )
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(script: str) -> dict:
    scope: dict = {"__name__": "__main__"}
    exec(compile(script, "README.md", "exec"), scope)
    return scope


def check_adapter(path: Path) -> None:
    assert {f.name for f in path.iterdir()} >= ADAPTER_FILES
    assert not list(path.glob("model*.safetensors"))
    tensors = load_file(path / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)  # trained from B = 0


@pytest.mark.usefixtures("tiny_default_model")
def test_plain_loop_script_runs(capsys):
    run(section_scripts()["loop"])
    assert len(re.findall(r"step \d: loss \d+\.\d+", capsys.readouterr().out)) == 8
    check_adapter(Path("out/loop/adapter"))


@pytest.mark.usefixtures("tiny_default_model")
def test_trainer_script_runs():
    scope = run(section_scripts()["trainer"])
    assert scope["trainer"].state.global_step == 8
    for path in ("out/trainer/checkpoint-4", "out/trainer/checkpoint-8", "out/trainer/adapter"):
        check_adapter(Path(path))


@pytest.mark.skipif(
    trl is None,
    reason="trl is not installed (it is in fastmid's dev extra); the script uses trl.SFTConfig",
)
@pytest.mark.usefixtures("tiny_default_model")
def test_sft_trainer_script_runs():
    scope = run(section_scripts()["sft"])
    assert scope["trainer"].state.global_step == 8
    for path in ("out/sft/checkpoint-4", "out/sft/checkpoint-8", "out/sft/adapter"):
        check_adapter(Path(path))
