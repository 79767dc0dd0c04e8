"""Peak training memory of each provider (a fresh process each) and its exact state bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.conftest import quick
from bench.machine import REPO_ROOT
from bench.measure import state_bytes
from bench.providers import PROVIDERS, build_provider


def _fresh_process_peak(name: str, dtype: str, batch_tokens: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.memworker", "--provider", name, "--dtype", dtype]
    cmd += ["--batch-tokens", str(batch_tokens)] + (["--quick"] if quick() else [])
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", PROVIDERS)
def test_peak_memory(benchmark, base, workload, stamp, name: str, dtype: str) -> None:
    provider = build_provider(name, base[0], dtype)
    exact = state_bytes(provider, provider.batch(workload.step_examples(0), workload.pad_id))
    del provider
    # AdamW keeps two moments per trainable value (plus a step counter per tensor).
    assert exact["grads"] > 0 and exact["optimizer"] >= 2 * exact["grads"]

    mem = benchmark.pedantic(
        _fresh_process_peak, args=(name, dtype, workload.batch_tokens), rounds=1, iterations=1
    )
    assert mem["peak"] >= mem["setup"] > 0
    stamp(provider=name, dtype=dtype, **{f"{k}_bytes": v for k, v in exact.items()}, **mem)
