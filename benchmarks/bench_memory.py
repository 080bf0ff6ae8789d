"""Peak memory of one prompt forward: every layer's hidden states kept (what
``output_hidden_states=True`` did) against the key layer only (:class:`nest_core.lm.KeyLayer`).

    python -m benchmarks.bench_memory [--tokens 2048]

Each variant runs in its own fresh process (peak RSS cannot be reset within one); prints
the peak resident memory of each and their difference, in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence


def one(variant: str, tokens: int) -> dict[str, float]:
    """Load the bundled model, run one cached forward over ``tokens`` prompt tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nest_core import load_model

    lm = load_model()
    ids = [int(i) % lm.vocab_size for i in range(1000, 1000 + tokens)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.inference_mode():
        if variant == "all-layers":
            ids_t = torch.tensor([ids])
            out = lm.model(input_ids=ids_t, use_cache=True, output_hidden_states=True,
                           logits_to_keep=1)
            hidden = out.hidden_states[-2][0]
        else:
            hidden = lm.forward(ids, lm.new_cache(), -2, last_only=True).hidden
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "tokens": tokens, "peak_mib": after,
            "forward_mib": after - before, "rows": int(hidden.shape[0])}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variant", choices=("all-layers", "key-layer"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.variant, args.tokens)))
        return 0
    rows = []
    for variant in ("all-layers", "key-layer"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--tokens",
                              str(args.tokens), "--variant", variant],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    saved = rows[0]["peak_mib"] - rows[1]["peak_mib"]
    print(f"{args.tokens}-token prompt: peak {rows[0]['peak_mib']:.0f} MiB with every layer's "
          f"states, {rows[1]['peak_mib']:.0f} MiB with the key layer only ({saved:.0f} MiB less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
