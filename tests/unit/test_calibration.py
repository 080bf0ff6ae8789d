"""nest calibrate: per-model answer settings measured on the user's questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PASSAGES

from nest_core import NestDecoder
from nest_core.calibration import (
    CalibrationQuestion,
    calibrate,
    calibrated_settings,
    choose_abstention,
    choose_threshold,
    declined,
    load_questions,
    save_settings,
)
from nest_core.config import ANSWER_DEFAULTS, default_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_threshold_declines_the_unanswerable_within_the_answerable_cap():
    # caught: the cap ignored (threshold above answerable ones), or <= instead of <
    answerable = [0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.44, 0.3]  # 10: 1 may fall
    assert choose_threshold(answerable, [0.2, 0.35]) == pytest.approx(0.35, abs=1e-5)
    # 0.5 cannot go (it would decline 3 answerable): decline 0.2 and 0.4, no higher
    t = choose_threshold(answerable, [0.2, 0.4, 0.5])
    assert t == pytest.approx(0.4, abs=1e-5)
    assert sum(a < t for a in answerable) == 1
    assert choose_threshold(answerable, [0.44 - 1e-7]) == 0.44  # never past the cap's ceiling
    assert choose_threshold(answerable, []) == 0.0  # nothing to decline: never abstain
    assert choose_threshold(answerable, [0.6]) == 0.0  # none can go within the cap


NAMED, RARE, NONE = (frozenset({"abstain_unnamed"}), frozenset({"abstain_rare"}),
                     frozenset())


def test_missing_names_go_on_only_where_they_decline_more_within_the_cap():
    # caught: names on whatever they cost; the cap not shared between names and threshold;
    # names on where they add nothing; the threshold chosen over the named questions too
    answerable = [(0.9, NONE), (0.8, NONE), (0.7, NONE), (0.65, NONE), (0.6, NONE),
                  (0.55, NONE), (0.5, NONE), (0.45, NONE), (0.44, NONE), (0.3, NONE)]
    # the threshold alone declines 0.2 and 0.35 (at most 1 of 10 answerable below it);
    # a named 0.7 one only with the names
    unanswerable = [(0.2, NONE), (0.35, NONE), (0.7, NAMED)]
    on = choose_abstention(answerable, unanswerable)
    assert on["abstain_unnamed"] is True
    assert on["abstain_rare"] is False  # no rare word missing: nothing to add
    assert on["abstain_below"] == pytest.approx(0.35, abs=1e-5)
    # one answerable question named too: it uses the cap, so the threshold must keep 0.3
    named_answerable = [*answerable[:-2], (0.95, NAMED), (0.3, NONE)]
    both = choose_abstention(named_answerable, [*unanswerable, (0.75, NAMED)])
    assert both["abstain_unnamed"] is True
    assert both["abstain_below"] == pytest.approx(0.2, abs=1e-5)  # 0.35 would take 0.3
    # the names add nothing: off, the threshold alone
    alone = choose_abstention(answerable, [(0.2, NAMED), (0.35, NONE)])
    assert alone == {"abstain_below": pytest.approx(0.35, abs=1e-5), "abstain_unnamed": False,
                     "abstain_rare": False}
    # the names cost more answerable questions than the cap: off, however many they catch
    costly = [(s, NAMED if i < 2 else NONE) for i, (s, _) in enumerate(answerable)]
    many = [*unanswerable, (0.75, NAMED), (0.8, NAMED)]
    assert choose_abstention(costly, many)["abstain_unnamed"] is False


def test_each_lexical_rule_goes_on_alone_or_with_the_other_where_it_declines_more():
    # caught: one rule's declines credited to the other; both on where one does as well
    # (ties keep the smaller set); the rules' answerable declines not charged to the cap
    answerable = [(0.9 - 0.05 * i, NONE) for i in range(10)]  # 10: 1 may be declined
    rare_only = choose_abstention(answerable, [(0.2, NONE), (0.7, RARE), (0.8, RARE)])
    assert (rare_only["abstain_rare"], rare_only["abstain_unnamed"]) == (True, False)
    together = choose_abstention(answerable, [(0.7, RARE), (0.8, NAMED), (0.85, NAMED | RARE)])
    assert (together["abstain_rare"], together["abstain_unnamed"]) == (True, True)
    # both rules fire on the same questions: one is enough (the first in LEXICAL_RULES)
    same = choose_abstention(answerable, [(0.7, NAMED | RARE)])
    assert (same["abstain_unnamed"], same["abstain_rare"]) == (True, False)
    # a rule declining two answerable questions spends more than the cap of one
    costly = [(s, RARE if i < 2 else NONE) for i, (s, _) in enumerate(answerable)]
    assert choose_abstention(costly, [(0.7, RARE), (0.8, RARE)])["abstain_rare"] is False
    # the one a rule declines of the answerable is the one the threshold could have taken
    cheap = [*answerable[:-1], (0.2, RARE)]
    rule = choose_abstention(cheap, [(0.7, RARE), (0.1, NONE)])
    assert rule["abstain_rare"] is True
    assert declined(cheap, rule) == 1
    assert declined([(0.1, NONE), (0.7, RARE)], rule) == 2


def test_questions_file_is_checked(tmp_path: Path):
    good = tmp_path / "q.json"
    good.write_text(json.dumps([{"question": "Who founded it?", "answers": ["Marta"]},
                                {"question": "What is the price?", "answers": []}]))
    qs = load_questions(good)
    assert [q.answerable for q in qs] == [True, False]
    assert qs[0].is_right("It was  MARTA Quillfeather.")
    bad = tmp_path / "bad.json"
    for body in ("{}", "[]", '[{"question": ""}]', '[{"question": "x", "answers": [1]}]'):
        bad.write_text(body)
        with pytest.raises(ValueError, match=r"bad\.json"):
            load_questions(bad)


def test_settings_are_recorded_per_model_and_applied_by_default_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # caught: default_config ignoring the file, or another model's settings applied
    path = tmp_path / "settings.json"
    monkeypatch.setenv("NEST_ANSWER_SETTINGS", str(path))
    assert calibrated_settings("m") == {}
    cal = calibrate(lambda q, ps, o: None, lambda q: [], lambda q, ps: 0.0, [])  # type: ignore
    cal.settings.update(focus_sentences=3, abstain_below=0.3, abstain_unnamed=True)
    assert save_settings("m", cal) == path
    assert calibrated_settings("m") == {"focus_sentences": 3, "abstain_below": 0.3,
                                        "abstain_unnamed": True}
    config = default_config("m")
    assert (config.focus_sentences, config.abstain_below, config.abstain_unnamed) == (
        3, 0.3, True)
    assert default_config("m", focus_sentences=1).focus_sentences == 1  # overrides win
    other = default_config("other")
    assert other.focus_sentences == ANSWER_DEFAULTS["focus_sentences"]
    monkeypatch.setenv("NEST_ANSWER_SETTINGS", "")  # off
    assert default_config("m").focus_sentences == ANSWER_DEFAULTS["focus_sentences"]
    path.write_text("{not json")
    monkeypatch.setenv("NEST_ANSWER_SETTINGS", str(path))
    with pytest.raises(ValueError, match=r"settings\.json"):
        default_config("m")


def test_calibrate_measures_each_focus_with_the_real_decoder(tiny_lm):
    # the tiny random model answers the same whatever it is shown only by chance: the
    # right rates are what the decoder gives, and ties keep the smaller focus
    seen: list[tuple[str, object]] = []

    def answer(question, passages, overrides):
        seen.append((question, overrides["focus_sentences"]))
        config = default_config(tiny_lm.name, **overrides)
        return NestDecoder(tiny_lm, config).generate(question, passages, max_new_tokens=6)

    first = answer("Who founded the Zephyr Widget Company?", PASSAGES,
                   {"focus_sentences": 1, "abstain_below": 0.0}).text.split()
    seen.clear()
    questions = [CalibrationQuestion("Who founded the Zephyr Widget Company?",
                                     (first[0],) if first else ("\x00",)),
                 CalibrationQuestion("What does the company charge?", ())]
    relevance = {"Who founded the Zephyr Widget Company?": 0.8,
                 "What does the company charge?": 0.2}
    cal = calibrate(answer, lambda q: PASSAGES, lambda q, ps: relevance[q], questions)
    assert seen == [(questions[0].question, f) for f in (1, 2, 3, None)]  # answerable only
    assert cal.right_by_focus["1"] == (1.0 if first else 0.0)
    assert cal.settings["focus_sentences"] == 1  # best or tied: the smallest
    assert cal.settings["abstain_below"] == pytest.approx(0.2, abs=1e-5)
    assert cal.settings["abstain_unnamed"] is False  # no name missing: nothing to add
    assert cal.settings["abstain_rare"] is False
    assert (cal.abstain_unanswerable, cal.abstain_answerable) == (1.0, 0.0)
