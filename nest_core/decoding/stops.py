"""How the output ends: end-of-sequence, repetition and stop strings.

Token stops (:class:`TokenStop`) see the tokens about to be emitted and say how many to
keep; they run in the order :func:`nest_core.decoding.policy.plan` chose, a later one's
reason winning. Stop strings (:class:`StopStrings`) look at the decoded text. The budget
(``max_new_tokens``) and the LM's own end (``end_with_lm``, applied by the judge, whose
choice is then the end token) complete the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nest_core.types import FinishReason


class TokenStop(Protocol):
    reason: FinishReason
    # whether the cut of a draft's first token can depend on the tokens after it (then that
    # token waits for the draft's forward instead of streaming before it)
    looks_ahead: bool

    def keep(self, output: Sequence[int], tokens: Sequence[int]) -> int | None:
        """How many of ``tokens`` may follow ``output`` (``None``: all, and go on)."""
        ...


class EndOfSequence:
    """The model's end-of-answer tokens end the output (they are not part of it)."""

    reason: FinishReason = "eos"
    looks_ahead = False

    def __init__(self, eos: frozenset[int]) -> None:
        self.eos = eos

    def keep(self, output: Sequence[int], tokens: Sequence[int]) -> int | None:
        return next((i for i, t in enumerate(tokens) if t in self.eos), None)


class RepetitionStop:
    """``repetition_stop`` n (beyond the paper): the output ends before it would repeat an
    n-token stretch it already holds.

    Catches the loops of small models (and of copying from duplicated passages) that
    would otherwise repeat the same lines until ``max_new_tokens``.
    """

    reason: FinishReason = "repetition"
    looks_ahead = True

    def __init__(self, n: int) -> None:
        self.n = n

    def keep(self, output: Sequence[int], tokens: Sequence[int]) -> int | None:
        n = self.n
        seq = [*output, *tokens]
        seen: set[tuple[int, ...]] = set()
        for end in range(n, len(seq) + 1):
            gram = tuple(seq[end - n:end])
            if gram in seen and end > len(output):
                return max(0, end - n - len(output))
            seen.add(gram)
        return None


class StopStrings:
    """The caller's stop strings, looked for in the decoded text."""

    reason: FinishReason = "stop"

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]

    def find(self, text: str, sent: int) -> int | None:
        """Where the first stop string starts in ``text`` (searched from just before the
        ``sent`` characters already streamed), or ``None``."""
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` may start a stop string."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held
