"""Peak memory (and time) of 2k tokens read by the LM: every layer's hidden states kept (what
``output_hidden_states=True`` did) against the key layer only (:class:`nest_core.lm.KeyLayer`),
for a decoding prompt and for passage encoding, which also stops at the key layer.

    python -m benchmarks.bench_memory [--tokens 2048] [--out benchmarks/results/memory.json]

Each variant runs in its own fresh process (peak RSS cannot be reset within one); prints the
peak resident memory of each, in MiB, and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

OUT = Path(__file__).parent / "results" / "memory.json"
VARIANTS = {
    "prompt-all-layers": "decoding prompt, output_hidden_states=True (before)",
    "prompt-key-layer": "decoding prompt, key-layer hook (LanguageModel.forward)",
    "encode-all-layers": "passage encoding, LM body with output_hidden_states=True (before)",
    "encode-key-layer": "passage encoding, stopped at the key layer (encode_hidden)",
}
WINDOW = 512  # passage encoding reads windows of max_passage_tokens (default 512)


def one(variant: str, tokens: int) -> dict[str, object]:
    """Load the bundled model, read ``tokens`` tokens once the way ``variant`` says."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nest_core import load_model

    lm = load_model()
    ids = [int(i) % lm.vocab_size for i in range(1000, 1000 + tokens)]
    batch = torch.tensor(ids).reshape(-1, WINDOW)  # [B, WINDOW]: B windows of one passage set
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        if variant == "prompt-all-layers":
            out = lm.model(input_ids=torch.tensor([ids]), use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
            rows = out.hidden_states[-2][0].shape[0]
        elif variant == "prompt-key-layer":
            rows = lm.forward(ids, lm.new_cache(), -2, last_only=True).hidden.shape[0]
        elif variant == "encode-all-layers":
            body = lm.model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch),
                                       use_cache=False, output_hidden_states=True)
            rows = body.hidden_states[-2].shape[0] * body.hidden_states[-2].shape[1]
        else:
            states = lm.encode_hidden(batch, torch.ones_like(batch), -2)  # [B, WINDOW, D]
            rows = states.shape[0] * states.shape[1]
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "what": VARIANTS[variant], "tokens": tokens,
            "peak_mib": round(after, 1), "forward_mib": round(after - before, 1),
            "seconds": round(seconds, 3), "rows": int(rows)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="a multiple of 512")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tokens % WINDOW:
        ap.error(f"--tokens must be a multiple of {WINDOW}")
    if args.variant:
        print(json.dumps(one(args.variant, args.tokens)))
        return 0
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--tokens",
                              str(args.tokens), "--variant", variant],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    by = {r["variant"]: r for r in rows}
    for kind in ("prompt", "encode"):
        a, b = by[f"{kind}-all-layers"], by[f"{kind}-key-layer"]
        print(f"{kind} {args.tokens} tokens: peak {a['peak_mib']:.0f} MiB with every layer's "
              f"states, {b['peak_mib']:.0f} MiB with the key layer only "
              f"({a['peak_mib'] - b['peak_mib']:.0f} MiB less)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": f"python -m benchmarks.bench_memory --tokens {args.tokens}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "model": "SmolLM2-135M-Instruct float32", "window": WINDOW}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n",
                        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
