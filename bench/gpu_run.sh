#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine, as one command from the repository root:
#
#   bash bench/gpu_run.sh [bench.gpu flags]      (e.g. --smoke to try it on a CPU first)
#
# Runs `python -m bench.gpu` (at most 7 minutes on one H100, model construction included: give
# the device call a 600 s timeout), writes <device>.json, <device>.md and gpu.log to $OUT (a
# temporary folder when OUT is unset), prints the markdown report last, and exits non-zero when
# the benchmark failed (1: a provider raised an error; 2: bad flags; anything else: a crash).
#
# Installs nothing from a registry. Python packages missing on the machine (its image has torch,
# triton, transformers and peft, not liger-kernel or flash-attn) can be carried as wheels in
# .whl/ (the device notes say how to download them); they are installed offline into a
# temporary folder that only this run sees.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# fastmid.kernels is the folder kernels/ (pyproject's package-dir). Where fastmid is not
# installed from this checkout, a link makes the source tree importable as it would be.
if ! "$py" -c "import fastmid.kernels" 2>/dev/null; then
    ln -sfn ../kernels fastmid/kernels
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"
"$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"

status=0
"$py" -m bench.gpu --out "$out" "$@" 2>&1 | tee "$out/gpu.log" || status=$?
if [ "$status" -eq 0 ] && ! compgen -G "$out/*.json" >/dev/null; then
    echo "bench/gpu_run.sh: no report was written to $out" >&2
    status=3
fi
echo "bench/gpu_run.sh: exit $status; reports in $out"
exit "$status"
