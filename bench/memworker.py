"""Peak training memory of one provider, measured in a fresh process.

Run as ``python -m bench.memworker --provider fastmid --dtype bf16`` from the repository root;
prints one JSON object. A fresh process per provider keeps earlier providers' freed-but-cached
memory out of the peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memworker")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--loss-on", default=None)
    args = parser.parse_args(argv)
    # The benchmark measures the shipped execution paths, never the Triton interpreter.
    os.environ.pop("TRITON_INTERPRET", None)

    import torch

    from bench.measure import peak_training_memory
    from bench.providers import build_provider, load_base, make_workload

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    base, tokenizer, model_name = load_base(args.quick)
    workload = make_workload(
        tokenizer, num_steps=args.steps, batch_tokens=args.batch_tokens, loss_on=args.loss_on
    )
    provider = build_provider(args.provider, base, args.dtype, inplace=True)
    del base
    gc.collect()
    batches = [
        provider.batch(workload.step_examples(i), workload.pad_id) for i in range(args.steps)
    ]
    mem = peak_training_memory(provider, batches)
    mem.update(
        provider=args.provider,
        dtype=args.dtype,
        model=model_name,
        steps=args.steps,
        real_tokens=[workload.real_tokens(i) for i in range(args.steps)],
        padded_shapes=[list(workload.padded_shape(i)) for i in range(args.steps)],
    )
    json.dump(mem, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
