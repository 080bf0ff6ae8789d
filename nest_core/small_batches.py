"""A faster CPU kernel for the few-token forwards that verify drafts.

A draft of 2-16 tokens makes every linear layer a matmul of a few rows against the weight.
``F.linear(x, W)`` computes ``x @ W^T``; on CPU its BLAS call packs the whole weight for each
call, so a 4-token forward of SmolLM2-135M costs about twice a 1-token one (2 threads).
``(W @ x^T)^T`` reads the weight as it lies and costs about as much as the 1-token forward
(``python -m benchmarks.bench_forward``). It is the same product; another kernel may round
differently in the last bits (SmolLM2's logits came out bit-identical here, and 0 of 30
doc-QA answers changed). In bfloat16 the plain product is the faster one (oneDNN's bf16
kernels: 2-16 rows 43-58 ms against 57-66 ms, 1 row 44 ms, 2 threads, AVX512-BF16), so only
float32 takes the weight-first one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MAX_ROWS = 32  # from 2 up to this many rows (batch x tokens) take the weight-first product


class WeightFirstLinear(torch.nn.Linear):
    """``nn.Linear`` whose CPU float32 forwards of 2 to :data:`MAX_ROWS` rows compute
    ``(W @ x^T)^T``; everything else is ``F.linear``. Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if not 1 < rows <= MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        out = (self.weight @ x.reshape(rows, features).T).T  # [rows, out]
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().reshape(*x.shape[:-1], out.shape[-1])


def use_weight_first(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the weight-first forward for few-row
    inputs on CPU (in place: the modules keep their weights); returns how many changed.
    Subclasses of ``nn.Linear`` (quantised or adapter layers) are left alone."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = WeightFirstLinear
            changed += 1
    return changed
