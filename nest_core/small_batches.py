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

Batching needs the opposite care in bfloat16: oneDNN's one-row product sums some shapes
(SmolLM2's 1536-wide down projection) in another order than its product of two or more
rows, and bfloat16 rounds that into other logits. :class:`PairedRowLinear` computes a lone
row as two, so a request's decoding step rounds the same alone as packed with others'.
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


class PairedRowLinear(torch.nn.Linear):
    """``nn.Linear`` whose CPU bfloat16 forwards of one row compute it as two rows (the
    multi-row kernel, whose rows do not depend on how many there are); everything else is
    ``F.linear``. Same parameters and state dict; about 2 ms on a 45 ms SmolLM2 step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(1, -1).expand(2, -1)  # [2, in]: the same row twice
        return F.linear(rows, self.weight, self.bias)[:1].reshape(*x.shape[:-1], -1)


def use_weight_first(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the weight-first forward for few-row
    inputs on CPU (in place: the modules keep their weights); returns how many changed.
    Subclasses of ``nn.Linear`` (quantised or adapter layers) are left alone."""
    return _retype_linears(model, WeightFirstLinear)


def use_paired_rows(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the paired-row forward (in place), so a
    bfloat16 row rounds the same alone as in a packed product; returns how many changed."""
    return _retype_linears(model, PairedRowLinear)


def _retype_linears(model: Any, cls: type[torch.nn.Linear]) -> int:
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = cls
            changed += 1
    return changed
