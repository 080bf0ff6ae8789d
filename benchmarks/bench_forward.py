"""LM forward time by the number of tokens fed, with and without the weight-first kernel.

A draft is verified by one forward of 2-16 tokens after the KV cache of the prompt; this
times such forwards (and a 74-token prompt read) on two copies of the model, the stock
``nn.Linear`` and :mod:`nest_core.small_batches`, alternating, and prints the medians in ms
and the largest logit difference. Run: ``python -m benchmarks.bench_forward [--threads 2]
[--dtype bfloat16]`` (in bfloat16 both copies take the plain product: weight-first is float32
only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nest_core import load_model

    torch.set_num_threads(args.threads)
    lms = {"stock": load_model(shared=False, weight_first=False, dtype=args.dtype),
           "weight-first": load_model(shared=False, weight_first=True, dtype=args.dtype)}
    sizes = [1, 2, 4, 8, 16, 32, 64, 74]
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in lms}
    prompt = list(range(1000, 1100))  # a 100-token context before the timed tokens
    for _ in range(args.reps):
        for name, lm in lms.items():
            cache = lm.new_cache()
            lm.forward(prompt, cache, -2, last_only=True)
            for n in sizes:
                t0 = time.perf_counter()
                lm.forward(list(range(2000, 2000 + n)), cache, -2, last_only=n == 74)
                times[name][n].append(time.perf_counter() - t0)
                cache.crop(-n)
    ids = list(range(2000, 2016))
    stock, fast = (lm.forward(ids, lm.new_cache(), -2).logits for lm in lms.values())
    diff = float((stock - fast).abs().max())
    print(f"ms per forward after a 100-token prompt ({args.dtype}, {args.threads} threads, "
          f"median of {args.reps}); 74 = a prompt read")
    print("tokens      " + "".join(f"{n:>8}" for n in sizes))
    for name in lms:
        print(f"{name:<12}" + "".join(f"{statistics.median(times[name][n]) * 1e3:8.0f}"
                                      for n in sizes))
    print(f"largest logit difference (16 tokens): {diff:.2e}")


if __name__ == "__main__":
    main()
