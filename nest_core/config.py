"""Decoder settings: one frozen, validated dataclass.

Glossary (paper symbol -> field), Li et al. 2024, "Nearest Neighbor Speculative Decoding":

=====  ==========================  =========================================================
 α     ``confidence_offset``       offset of the Relative Retrieval Confidence (Eq. 4)
 τ     ``confidence_scale``        scale (temperature) of the RRC sigmoid (Eq. 4)
 δ(β)  ``span_threshold``          propose a span when λ < δ (Eq. 6)
 γ     ``relaxation``              leniency of relaxed speculative verification (Eq. 7)
 n     ``span_length``             longest span proposed in one step
 r     ``num_neighbors``           tokens retrieved per kNN search
 b     ``num_passages``            passages a passage source returns per query
 μ     (fixed: 1/sqrt(d))          inverse temperature of the kNN softmax (Eq. 2)
 λ     ``knn_lambda``              fixed weight on p_LM in ``knn-lm`` mode (Eq. 3)
=====  ==========================  =========================================================

λ always weighs the **LM**: p_M = λ·p_LM + (1-λ)·p_kNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

Mode = Literal["nest", "knn-lm", "base"]
ConfidenceReference = Literal["farthest", "norm"]
VerifyAgainst = Literal["mixture", "lm"]
MODES: tuple[str, ...] = get_args(Mode)  # NestConfig.mode: the decoder's algorithm


@dataclass(frozen=True)
class NestConfig:
    """Settings of :class:`~nest_core.decoder.NestDecoder`; defaults follow the paper (App. A).

    ``mode`` picks the system on the same decoder: ``"nest"`` (RRC mixture + spans +
    relaxed speculative verification), ``"knn-lm"`` (fixed λ, one token per step) or
    ``"base"`` (plain greedy decoding, passages ignored). ``passages_in_prompt`` adds the top
    passages to the prompt as background context (RA-Nest when combined with ``"nest"``,
    in-context RAG with ``"base"``).
    """

    mode: Mode = "nest"
    confidence_offset: float = 0.3  # α
    confidence_scale: float = 0.1  # τ
    span_threshold: float = 0.5  # δ
    relaxation: float = 5e-2  # γ (paper: 7B 5e-4, 13B 5e-3, 70B 5e-2)
    span_length: int = 64  # n
    initial_span_length: int = 64  # drafts start this long and double while fully accepted
    num_neighbors: int = 1024  # r
    num_passages: int = 40  # b
    lm_temperature: float = 0.7  # official code tempers p_LM before mixing
    knn_lambda: float = 0.7  # λ for knn-lm mode
    key_layer: int = -2  # hidden_states index used for keys and queries
    passages_in_prompt: bool = False
    prompt_passages: int = 3  # passages placed in the prompt when passages_in_prompt
    max_passage_tokens: int = 512  # longer passages are encoded in windows of this size
    # --- beyond the paper (off in NestConfig(); see default_config and the README) ---------
    confidence_reference: ConfidenceReference = "farthest"  # ρ's denominator, see mixture
    span_passages: int | None = None  # spans start only in the top-m retrieved passages
    end_with_lm: bool = False  # the answer ends where the LM alone would end it
    repetition_stop: int = 0  # stop when the last n tokens already occurred (0: off)
    verify_against: VerifyAgainst = "mixture"  # drafts verified against p_M or p_LM
    focus_sentences: int | None = None  # the prompt shows the k sentences best for the question
    # ... ranked by shared words plus this weight x their cosine to the question under the
    # decoder's ``embed`` (0: words alone; nest_core.focus.best_sentences)
    focus_meaning: float = 0.0
    question_drafts: bool = False  # draft the prompt's own words (prompt lookup)
    passage_drafts: bool = False  # spans also start where the output repeats a passage
    repeat_question: bool = False  # the prompt: request, background, request again
    # abstention (nest_core.grounding): say ``abstention`` instead of answering when the
    # question's cosine to the best passage (under the decoder's ``embed``, calibrated for
    # the bundled all-MiniLM-L6-v2) is below this (0: never; no ``embed``: never)
    abstain_below: float = 0.0
    # ... or when a name the question writes (capitalised mid-sentence: "Kubernetes",
    # "Proxmox VE") is in no passage: the documents share the topic, not the thing asked
    # about (nest_core.grounding.missing_names; lexical, needs no ``embed``)
    abstain_unnamed: bool = False
    # ... or when a rare word the question writes (outside a general English vocabulary:
    # "firewalld", "TOTP", "Proxmox") is in no passage (nest_core.grounding.missing_rare_words)
    abstain_rare: bool = False
    # ... or when the answer's new content words are less than this share in the context
    # shown (0: never; the answer is then held back until it is complete)
    support_below: float = 0.0
    # the answer becomes the focus sentence, quoted whole and cited, when the answer's
    # support (as above) is below this (0: never; 1.0: whenever it adds a content word the
    # sentence lacks), except for a yes/no question; held back until complete, as above
    quote_below: float = 0.0
    abstention: str = "The documents do not say."
    # how a prompt that ends with a passage's own words (it asks to continue that passage)
    # is decoded; None: like any other prompt
    continuation: NestConfig | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            msg = f"mode={self.mode!r} is not one of {MODES}"
            raise ValueError(msg)
        _check_range("confidence_scale", self.confidence_scale, low=0.0, low_open=True)
        _check_range("span_threshold", self.span_threshold, low=0.0, high=1.0)
        _check_range("relaxation", self.relaxation, low=0.0, high=1.0, low_open=True)
        _check_range("lm_temperature", self.lm_temperature, low=0.0, low_open=True)
        _check_range("knn_lambda", self.knn_lambda, low=0.0, high=1.0)
        _check_range("abstain_below", self.abstain_below, low=0.0, high=1.0)
        _check_range("support_below", self.support_below, low=0.0, high=1.0)
        _check_range("focus_meaning", self.focus_meaning, low=0.0)
        _check_range("quote_below", self.quote_below, low=0.0, high=1.0)
        for flag in ("abstain_unnamed", "abstain_rare"):
            if not isinstance(getattr(self, flag), bool):
                msg = f"{flag}={getattr(self, flag)!r} must be True or False"
                raise ValueError(msg)
        if not isinstance(self.abstention, str) or not self.abstention.strip():
            msg = f"abstention={self.abstention!r} must be a non-empty sentence"
            raise ValueError(msg)
        for name in ("span_length", "initial_span_length", "num_neighbors", "num_passages",
                     "max_passage_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name}={value!r} must be a positive integer"
                raise ValueError(msg)
        if self.initial_span_length > self.span_length:
            msg = (f"initial_span_length={self.initial_span_length} exceeds span_length="
                   f"{self.span_length}; lower initial_span_length or raise span_length")
            raise ValueError(msg)
        if not isinstance(self.key_layer, int) or self.key_layer == 0:
            msg = f"key_layer={self.key_layer!r} must be a non-zero hidden_states index (e.g. -2)"
            raise ValueError(msg)
        if self.confidence_reference not in ("farthest", "norm"):
            msg = (f"confidence_reference={self.confidence_reference!r} is not 'farthest' "
                   f"(the paper's Eq. 4) or 'norm'")
            raise ValueError(msg)
        if self.verify_against not in ("mixture", "lm"):
            msg = f"verify_against={self.verify_against!r} is not 'mixture' or 'lm'"
            raise ValueError(msg)
        for name in ("span_passages", "focus_sentences"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                msg = f"{name}={value!r} must be None or a positive integer"
                raise ValueError(msg)
        if isinstance(self.repetition_stop, bool) or not isinstance(self.repetition_stop, int) \
                or self.repetition_stop < 0:
            msg = f"repetition_stop={self.repetition_stop!r} must be 0 (off) or a positive int"
            raise ValueError(msg)
        if self.continuation is not None:
            c = self.continuation
            if not isinstance(c, NestConfig) or c.continuation is not None:
                msg = "continuation must be a NestConfig without a continuation of its own"
                raise ValueError(msg)
            if (c.key_layer, c.max_passage_tokens) != (self.key_layer, self.max_passage_tokens):
                msg = ("continuation must use the same key_layer and max_passage_tokens (the "
                       "passage keys are shared)")
                raise ValueError(msg)
        if self.max_passage_tokens < 8:
            msg = f"max_passage_tokens={self.max_passage_tokens} is too small; use at least 8"
            raise ValueError(msg)

    @property
    def uses_retrieval(self) -> bool:
        return self.mode != "base"

    def with_overrides(self, **changes: Any) -> NestConfig:
        """A copy with ``changes`` applied (validated); unknown names raise ``TypeError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            msg = f"unknown NestConfig field(s) {unknown}; valid fields: {sorted(known)}"
            raise TypeError(msg)
        return replace(self, **changes)


# Defaults calibrated for a model on a dev split; any other model gets the paper's defaults,
# i.e. ``NestConfig()``. SmolLM2-135M: coordinate-descent sweep on the FOLDOC dev split
# (benchmarks/calibrate.py, benchmarks/results/calibration.json). Its layer -2 keys give
# ρ = 0.16-0.26 already at the first answer token, so with the paper's α = 0.3 every step
# looks confident and Nest copies a passage's opening instead of answering; a stricter α/δ
# and γ fix that (dev quality 0.30 -> 0.48), and 16-token drafts waste less verification.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M-Instruct": {
        "confidence_offset": 0.15,
        "confidence_scale": 0.05,
        "span_threshold": 0.7,
        "relaxation": 0.2,
        "span_length": 16,
        "initial_span_length": 16,
        "num_passages": 10,
    },
}
BUNDLED_MODEL = "SmolLM2-135M-Instruct"
# RA-Nest (passages also in the prompt) verifies more strictly: the paper uses γ = 0.5 for it
# on every task but Pile of Law (App. A), since the LM now knows the passages itself.
RA_NEST_RELAXATION = 0.5


# How every surface answers by default, for any model (beyond the paper; measured on the dev
# splits with benchmarks/compare.py, README "Settings"): the prompt shows the one sentence
# of the retrieved passages that best matches the question (doc-QA dev recall 0.20 -> 0.67:
# a 135M model reading three whole passages answers from the wrong line) and spans start
# in that sentence only; the LM is the judge of every drafted span, so the answer is the
# one the LM gives with that sentence in view, copied (and cited) from it where it agrees
# (γ = 1: a wrong digit the LM finds 4x less likely than its own choice passes γ = 0.5 and
# is copied); the answer's restatement of the question is drafted from the prompt
# (3.8 -> 1.5 s per answer) and its repeat of the focus sentence from the sentence's rows,
# copied and cited (doc-QA dev 60: copied citations 0.18 -> 0.62); it ends where the LM
# would end it; a repeat of 12 tokens ends it too. Spans start in the retriever's top 3
# passages when no sentence matches.
ANSWER_DEFAULTS: dict[str, Any] = {
    "passages_in_prompt": True,
    "focus_sentences": 1,
    "question_drafts": True,
    "passage_drafts": True,
    "span_passages": 3,
    "verify_against": "lm",
    "end_with_lm": True,
    "repetition_stop": 12,
    "relaxation": 1.0,  # Eq. 7 on p_LM: a drafted token within 2x of the LM's own choice
    # the request, the focus sentence, the request again: doc-QA dev 150 recall
    # 0.585 -> 0.633 (subdivision codes 0/24 -> 17/24, country numeric codes 23 -> 14)
    "repeat_question": True,
    # "The documents do not say." where the question's cosine to the best passage (bundled
    # all-MiniLM-L6-v2) is below 0.46: handbook dev, 85% of unanswerable questions and 3.4%
    # of answerable ones; needs the decoder's ``embed``. (`nest calibrate`'s rule picks 0.50
    # on those questions, 92% / 7.9%, but declined the demo handbook's paid-leave question
    # read from whole-document blocks: a threshold depends on passage size; calibrate yours.)
    "abstain_below": 0.46,
    # ... or where a rare word the question writes (outside common English: "firewalld",
    # "Proxmox", "TOTP") is in no retrieved passage: handbook dev unanswerable 85% -> 92%,
    # answerable 2.2% unchanged; iso-codes doc-QA dev 60 recall 0.80 unchanged, two wrong
    # cited answers (gold passage not retrieved) declined instead. (`abstain_unnamed`, the
    # same for capitalised names, ties with it on handbook dev but misses what users type
    # in lower case and counts common words used as names: off; docs/settings.md)
    "abstain_rare": True,
    # the focus sentence, quoted whole and cited, where the model's answer adds a content
    # word it does not hold (yes/no questions aside): handbook dev right 0.337 -> 0.483
    # (lookup 0.58 -> 0.63, paraphrase 0 -> 0.23, list 0.31 -> 0.62, why 0.30 -> 0.60)
    "quote_below": 1.0,
}


def default_config(model_name: str | None = None, **overrides: Any) -> NestConfig:
    """The defaults every surface uses: the numbers calibrated for ``model_name`` (``None`` =
    the bundled model), then :data:`ANSWER_DEFAULTS`, then the answer settings ``nest
    calibrate`` measured for that model on the user's questions
    (:mod:`nest_core.calibration`), then ``overrides``; a prompt that
    continues a passage is decoded by :func:`paper_config` (the paper's copy path: FOLDOC
    dev ROUGE-1 0.50 against 0.22 with the answer settings, which show one sentence and
    end where the LM would). ``NestConfig()`` alone keeps the paper's settings."""
    from nest_core.calibration import calibrated_settings

    name = BUNDLED_MODEL if model_name is None else model_name
    settings = {**ANSWER_DEFAULTS, **calibrated_settings(name), **overrides}
    settings.setdefault("continuation", paper_config(model_name))
    return paper_config(model_name, **settings)


def paper_config(model_name: str | None = None, **overrides: Any) -> NestConfig:
    """The paper's algorithm with the numbers calibrated for ``model_name``: no option
    beyond the paper (the benchmark's "Nest" and, with ``passages_in_prompt``, "RA-Nest")."""
    name = BUNDLED_MODEL if model_name is None else model_name
    settings = {**MODEL_DEFAULTS.get(name, {}), **overrides}
    if settings.get("passages_in_prompt") and "relaxation" not in overrides:
        settings["relaxation"] = RA_NEST_RELAXATION
    return NestConfig().with_overrides(**settings)


def _check_range(name: str, value: float, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        msg = f"{name}={value!r} must be a number"
        raise ValueError(msg)
    if low is not None and (value < low or (low_open and value == low)):
        bound = ">" if low_open else ">="
        msg = f"{name}={value!r} must be {bound} {low}"
        raise ValueError(msg)
    if high is not None and value > high:
        msg = f"{name}={value!r} must be <= {high}"
        raise ValueError(msg)
