"""Answer settings calibrated on the user's own questions, per model (beyond the paper).

The shipped answer settings (:data:`nest_core.config.ANSWER_DEFAULTS`) were measured with the
bundled 135M model on the handbook benchmark: one focus sentence in the prompt, abstention
below a MiniLM cosine of 0.46. A bigger model reads more than one sentence well, and another
corpus puts its unanswerable questions at another distance. ``nest calibrate QUESTIONS.json
--store DIR`` measures, on the user's questions over their own store, which focus size
answers most questions right and which abstention threshold declines the unanswerable ones
while declining at most :data:`MAX_ABSTAIN_ANSWERABLE` of the answerable ones, with and
without each lexical rule (``abstain_unnamed``: a name the question writes that no passage
holds; ``abstain_rare``: a rare word so), each turned on only where it declines more
unanswerable questions within that cap; it writes
them to the settings file (:func:`settings_path`) under the model's name, and
:func:`~nest_core.config.default_config` applies them for that model on every surface.

The question file is a JSON list of ``{"question": str, "answers": [str, ...]}``: an answer
is right when it holds one of ``answers`` (case and spacing aside); ``"answers": []`` marks a
question the documents do not answer.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nest_core.grounding import LEXICAL_RULES
from nest_core.types import NestResult, Passage

SETTINGS_ENV = "NEST_ANSWER_SETTINGS"  # the settings file; "" turns calibrated settings off
CALIBRATED = ("focus_sentences", "abstain_below", *LEXICAL_RULES)  # what a calibration may set
FOCUS_GRID: tuple[int | None, ...] = (1, 2, 3, None)  # None: the top passages whole
MAX_ABSTAIN_ANSWERABLE = 0.1  # the share of answerable questions abstention may decline


def settings_path() -> Path | None:
    """``$NEST_ANSWER_SETTINGS``, else ``<cache dir>/answer_settings.json``; ``None`` when
    the variable is set to ""."""
    env = os.environ.get(SETTINGS_ENV)
    if env is not None:
        return Path(env).expanduser() if env else None
    from nest_core.models import cache_dir

    return cache_dir() / "answer_settings.json"


def calibrated_settings(model_name: str) -> dict[str, Any]:
    """The calibrated settings of ``model_name`` ({} when it has none). A file that cannot
    be read is an error that names it: silently falling back would hide a calibration."""
    path = settings_path()
    if path is None or not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"cannot read the answer settings {path} ({e}); fix or delete it"
        raise ValueError(msg) from e
    settings = table.get(model_name, {}).get("settings", {}) if isinstance(table, dict) else {}
    return {k: v for k, v in settings.items() if k in CALIBRATED}


def save_settings(model_name: str, calibration: Calibration) -> Path:
    """Record ``calibration`` for ``model_name`` in the settings file (other models kept)."""
    path = settings_path()
    if path is None:
        msg = f"${SETTINGS_ENV} is empty: calibrated settings are off; set it to a file path"
        raise ValueError(msg)
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    table[model_name] = {"settings": calibration.settings, "evidence": calibration.evidence}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class CalibrationQuestion:
    question: str
    answers: tuple[str, ...]  # empty: the documents do not answer it

    @property
    def answerable(self) -> bool:
        return bool(self.answers)

    def is_right(self, text: str) -> bool:
        flat = " ".join(text.lower().split())
        return any(" ".join(a.lower().split()) in flat for a in self.answers)


def load_questions(path: str | os.PathLike[str]) -> list[CalibrationQuestion]:
    """The question file (module docstring); a clear error for anything else."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"cannot read the question file {path}: {e}"
        raise ValueError(msg) from e
    if not isinstance(raw, list) or not raw:
        msg = f"{path} must hold a non-empty JSON list of {{\"question\", \"answers\"}}"
        raise ValueError(msg)
    out = []
    for i, item in enumerate(raw):
        q = item.get("question") if isinstance(item, dict) else None
        answers = item.get("answers", []) if isinstance(item, dict) else None
        if not isinstance(q, str) or not q.strip() or not isinstance(answers, list) \
                or not all(isinstance(a, str) and a.strip() for a in answers):
            msg = (f"{path}[{i}] must be {{\"question\": \"...\", \"answers\": [\"...\"]}} "
                   f"(answers [] for a question the documents do not answer)")
            raise ValueError(msg)
        out.append(CalibrationQuestion(q, tuple(answers)))
    return out


@dataclass
class Calibration:
    """What was measured and what it chose."""

    settings: dict[str, Any]
    right_by_focus: dict[str, float]  # focus size ("1", "3", "whole") -> right rate
    abstain_unanswerable: float | None  # at the chosen threshold; None without such questions
    abstain_answerable: float | None
    evidence: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = ["| focus | right (answerable) |", "|---|---:|"]
        rows += [f"| {k} | {v:.3f} |" for k, v in self.right_by_focus.items()]
        if self.abstain_unanswerable is not None:
            rules = ", ".join(f"{r}={self.settings.get(r, False)}" for r in LEXICAL_RULES)
            rows += ["", (f"abstain_below={self.settings.get('abstain_below', 0.0):.3f}, "
                          f"{rules}: "
                          f"abstains on {self.abstain_unanswerable:.0%} of unanswerable and "
                          f"{self.abstain_answerable:.0%} of answerable questions")]
        return "\n".join(rows)


def choose_threshold(answerable: Sequence[float], unanswerable: Sequence[float],
                     cap: float = MAX_ABSTAIN_ANSWERABLE) -> float:
    """The abstention threshold on relevance (abstention is ``relevance < threshold``): the
    lowest that declines as many unanswerable questions as any threshold declining at most
    ``cap`` of the answerable ones can; 0.0 (never) when none can be declined so."""
    return _threshold(answerable, unanswerable, int(cap * len(answerable)))


def _threshold(answerable: Sequence[float], unanswerable: Sequence[float], allowed: int
               ) -> float:
    """:func:`choose_threshold` with ``allowed`` answerable questions that may fall below."""
    if not unanswerable or not answerable or allowed < 0:
        return 0.0
    ranked = sorted(answerable)
    ceiling = ranked[allowed]  # declining below this declines at most `allowed` of them
    reachable = [u for u in unanswerable if u < ceiling]
    return min(ceiling, max(reachable) + 1e-6) if reachable else 0.0


def choose_abstention(answerable: Sequence[tuple[float, frozenset[str]]],
                      unanswerable: Sequence[tuple[float, frozenset[str]]],
                      cap: float = MAX_ABSTAIN_ANSWERABLE) -> dict[str, Any]:
    """``abstain_below`` and the :data:`~nest_core.grounding.LEXICAL_RULES` from each
    question's ``(relevance, the lexical rules that would decline it)``: for the threshold
    alone and for every set of rules, the rules' declines plus the threshold chosen on the
    questions they leave, within one cap of answerable questions declined; the set that
    declines the most unanswerable questions wins, then the one that declines fewer
    answerable ones, then the smaller (a rule goes on only where it declines more)."""
    allowed = int(cap * len(answerable))
    best: tuple[tuple[int, int], dict[str, Any]] | None = None
    for size in range(len(LEXICAL_RULES) + 1):
        for rules in map(frozenset, itertools.combinations(LEXICAL_RULES, size)):
            kept = [s for s, fired in answerable if not fired & rules]
            spent = len(answerable) - len(kept)
            if spent > allowed:
                continue
            threshold = _threshold(kept, [s for s, fired in unanswerable if not fired & rules],
                                   allowed - spent)
            settings = {"abstain_below": threshold, **{r: r in rules for r in LEXICAL_RULES}}
            score = (declined(unanswerable, settings), -declined(answerable, settings))
            if best is None or score > best[0]:
                best = score, settings
    assert best is not None  # the threshold alone never spends more than the cap
    return best[1]


def declined(questions: Sequence[tuple[float, frozenset[str]]], settings: Mapping[str, Any]
             ) -> int:
    """How many of ``questions`` ``(relevance, the lexical rules that fire)`` the
    ``settings`` (``abstain_below`` and the rules on) decline."""
    on = {r for r in LEXICAL_RULES if settings.get(r)}
    return sum(s < settings["abstain_below"] or bool(fired & on) for s, fired in questions)


def lexical_rules(question: str, passages: Sequence[Passage]) -> frozenset[str]:
    """The :data:`~nest_core.grounding.LEXICAL_RULES` that would decline ``question`` over
    ``passages``."""
    return frozenset(r for r, missing in LEXICAL_RULES.items() if missing(question, passages))


def calibrate(answer: Callable[[str, list[Passage], dict[str, Any]], NestResult],
              retrieve: Callable[[str], list[Passage]],
              relevance: Callable[[str, list[Passage]], float],
              questions: Sequence[CalibrationQuestion],
              focus_grid: Sequence[int | None] = FOCUS_GRID) -> Calibration:
    """Measure each focus size on the answerable ``questions`` (abstention off), then the
    abstention (:func:`choose_abstention`) on all of them. ``answer(question, passages,
    overrides)`` decodes with ``default_config(**overrides)``; ties keep the earlier
    (smaller, faster) focus."""
    found = {q.question: retrieve(q.question) for q in questions}
    answerable = [q for q in questions if q.answerable]
    right: dict[str, float] = {}
    best: int | None = focus_grid[0]
    for focus in focus_grid:
        hits = [q.is_right(answer(q.question, found[q.question],
                                  {"focus_sentences": focus, "abstain_below": 0.0,
                                   **dict.fromkeys(LEXICAL_RULES, False)}).text)
                for q in answerable]
        right["whole" if focus is None else str(focus)] = \
            sum(hits) / len(hits) if hits else 0.0
    if right:
        best_label = max(right, key=lambda k: right[k])  # first of equals: the smaller one
        best = None if best_label == "whole" else int(best_label)
    scores = {q.question: relevance(q.question, found[q.question]) for q in questions}
    yes = [scores[q.question] for q in answerable]
    no = [scores[q.question] for q in questions if not q.answerable]
    settings: dict[str, Any] = {"focus_sentences": best}
    un = ans = None
    if no:
        judged = {q.question: (scores[q.question], lexical_rules(q.question, found[q.question]))
                  for q in questions}
        can = [judged[q.question] for q in answerable]
        cannot = [judged[q.question] for q in questions if not q.answerable]
        settings.update(choose_abstention(can, cannot))
        un = declined(cannot, settings) / len(cannot)
        ans = declined(can, settings) / len(can) if can else 0.0
    evidence = {"questions": len(questions), "answerable": len(answerable),
                "right_by_focus": right,
                "relevance_answerable_median": statistics.median(yes) if yes else None,
                "relevance_unanswerable_median": statistics.median(no) if no else None}
    return Calibration(settings, right, un, ans, evidence)


__all__ = ["Calibration", "CalibrationQuestion", "calibrate", "calibrated_settings",
           "choose_abstention", "choose_threshold", "declined", "lexical_rules", "load_questions",
           "save_settings", "settings_path"]
