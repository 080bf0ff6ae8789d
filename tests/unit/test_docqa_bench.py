"""The document-QA benchmark (iso-codes) on hand-made tables: passages, questions, the split,
the word-boundary recall and cited-correct (copied and matched spans). No corpus, no model."""

from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.isocodes import build_passages, build_questions, guessable
from benchmarks.report import docqa_table, summarise
from benchmarks.systems import RunRecord, citations
from benchmarks.tasks import (
    Item,
    cited_correct,
    docqa_items,
    exact_answer_recall,
    select,
    split_of,
)
from nest_core.types import DecodeStats, NestResult, Passage, Span

TABLES: dict[str, list[dict[str, str]]] = {
    "3166-1": [
        {"alpha_2": "BF", "alpha_3": "BFA", "name": "Burkina Faso", "numeric": "854"},
        {"alpha_2": "FR", "alpha_3": "FRA", "name": "France", "numeric": "250",
         "official_name": "French Republic"},
        {"alpha_2": "DE", "alpha_3": "DEU", "name": "Germany", "numeric": "276"},
        {"alpha_2": "FM", "alpha_3": "FSM", "name": "Micronesia, Federated States of",
         "numeric": "583"},
        {"alpha_2": "AD", "alpha_3": "AND", "name": "Andorra", "numeric": "020"},
    ],
    "3166-2": [
        {"code": "AD-02", "name": "Canillo", "type": "Parish"},
        {"code": "AD-03", "name": "Encamp", "type": "Parish"},
        {"code": "BF-BAL", "name": "Balé", "type": "Province"},
    ],
    "4217": [
        {"alpha_3": "SLE", "name": "Leone", "numeric": "925"},
        {"alpha_3": "SLL", "name": "Leone", "numeric": "694"},
        {"alpha_3": "MMK", "name": "Kyat", "numeric": "104"},
        {"alpha_3": "XTS", "name": "Codes specifically reserved for testing purposes",
         "numeric": "963"},
    ],
    "639-3": [
        {"alpha_3": "aaa", "name": "Ghotuo", "scope": "I", "type": "L"},
        {"alpha_3": "kir", "name": "Kyrgyz", "scope": "I", "type": "L", "alpha_2": "ky"},
        {"alpha_3": "xyz", "name": "Kir", "scope": "I", "type": "L"},
        {"alpha_3": "tkr", "name": "Tsakhur", "scope": "I", "type": "L"},
        {"alpha_3": "and", "name": "Ansus", "scope": "I", "type": "L"},
    ],
    "15924": [{"alpha_4": "Xpeo", "name": "Old Persian", "numeric": "030"}],
}


def _questions() -> dict[str, Any]:
    return {q.key: q for q in build_questions(TABLES)}


def test_passages_are_small_titled_groups_with_stable_ids() -> None:
    passages, where = build_passages(TABLES)
    by_id = {p.id: p for p in passages}
    # 4 countries per passage: five countries make two passages, in file order
    assert where[("3166-1", "BF")] == where[("3166-1", "DE")] == "iso-3166-1-0000"
    assert where[("3166-1", "AD")] == "iso-3166-1-0001"
    first = by_id["iso-3166-1-0000"]
    assert first.title == "ISO 3166-1 country codes"
    assert first.text.split("\n")[0] == (
        "Burkina Faso: alpha-2 code BF, alpha-3 code BFA, numeric code 854.")
    assert "France (official name: French Republic): alpha-2 code FR" in first.text
    assert "Federated States of Micronesia: alpha-2 code FM" in first.text
    # subdivisions are grouped per country, titled by the country's name
    assert where[("3166-2", "AD-02")] == where[("3166-2", "AD-03")] == "iso-3166-2-AD-0000"
    assert where[("3166-2", "BF-BAL")] == "iso-3166-2-BF-0000"
    assert by_id["iso-3166-2-AD-0000"].title == "ISO 3166-2 subdivision codes of Andorra"
    assert by_id["iso-3166-2-AD-0000"].text == "Canillo (parish): AD-02.\nEncamp (parish): AD-03."
    assert "Kyrgyz: code kir, ISO 639-1 code ky (individual language, living)." in (
        by_id[where[("639-3", "kir")]].text)
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert [p.id for p in build_passages(TABLES)[0]] == [p.id for p in passages]


def test_questions_have_one_gold_passage_and_an_unambiguous_answer() -> None:
    qs = _questions()
    _, where = build_passages(TABLES)
    q = qs["docqa:country-numeric:BF"]
    assert q.question == "What is the ISO 3166-1 numeric code of Burkina Faso?"
    assert (q.answer, q.passage_id) == ("854", where[("3166-1", "BF")])
    assert qs["docqa:country-alpha3:DE"].answer == "DEU"
    assert qs["docqa:country-numeric:FM"].question.endswith("of Federated States of Micronesia?")
    sub = qs["docqa:subdivision-code:AD-02"]
    assert sub.question == "What is the ISO 3166-2 code of Canillo, a parish of Andorra?"
    assert (sub.answer, sub.passage_id) == ("AD-02", "iso-3166-2-AD-0000")
    assert qs["docqa:currency-numeric:MMK"].question == (
        "What is the ISO 4217 numeric code of the currency Kyat?")
    assert qs["docqa:script-numeric:Xpeo"].answer == "030"
    assert qs["docqa:language-code:aaa"].question == (
        "What is the ISO 639-3 code of the Ghotuo language?")
    dropped = {
        "docqa:country-alpha3:FR",  # FRA: the first letters of France
        "docqa:country-alpha3:AD",  # AND: the first letters of Andorra
        "docqa:currency-numeric:SLE", "docqa:currency-numeric:SLL",  # two currencies "Leone"
        "docqa:currency-numeric:XTS",  # a reserved code, not a currency
        "docqa:language-code:kir",  # "kir" is also the language "Kir" in the same passage
        "docqa:language-code:and",  # a common English word
        "docqa:subdivision-code:BF-BAL",  # BAL: the first letters of Balé
    }
    assert not dropped & set(qs)
    assert "docqa:language-code:tkr" in qs  # not the first letters ("tsa") nor the initials


def test_guessable_codes() -> None:
    assert guessable("FRA", "France")
    assert guessable("US-CA", "California")
    assert guessable("ABC", "Alpha Beta Charlie")
    assert not guessable("DEU", "Germany")
    assert not guessable("AD-02", "Canillo")
    assert not guessable("020", "Andorra")


def test_per_family_cap_takes_a_fixed_hash_order_sample() -> None:
    one = build_questions(TABLES, per_family=1)
    assert len([q for q in one if q.family == "country-numeric"]) == 1
    again = build_questions(TABLES, per_family=1)
    assert [q.key for q in one] == [q.key for q in again]


def test_docqa_split_is_deterministic_by_hash_parity() -> None:
    items = docqa_items(TABLES)
    for it in items:
        parity = int(hashlib.sha1(it.key.encode()).hexdigest()[:12], 16) % 2
        assert split_of(it.key) == ("dev" if parity == 0 else "test")
    dev, test = select(items, "dev", 100), select(items, "test", 100)
    assert {i.key for i in dev}.isdisjoint({i.key for i in test})
    assert len(dev) + len(test) == len(items)
    assert [i.key for i in select(docqa_items(TABLES), "dev", 100)] == [i.key for i in dev]
    bf = next(i for i in items if i.key == "docqa:country-numeric:BF")
    assert bf.prompt == ("What is the ISO 3166-1 numeric code of Burkina Faso? "
                         "Answer in a few words.")
    assert bf.query == "What is the ISO 3166-1 numeric code of Burkina Faso?"
    assert (bf.task, bf.references, bf.gold_passage) == ("docqa", ("854",), "iso-3166-1-0000")


def test_recall_needs_the_whole_code_case_insensitive() -> None:
    assert exact_answer_recall("The numeric code is 854.", ["854"]) == 1.0
    assert exact_answer_recall("It was founded in 1854", ["854"]) == 0.0
    assert exact_answer_recall("854", ["85"]) == 0.0
    assert exact_answer_recall("code 8540", ["854"]) == 0.0
    assert exact_answer_recall("It is bfa", ["BFA"]) == 1.0
    assert exact_answer_recall("AD-021", ["AD-02"]) == 0.0
    assert exact_answer_recall("Canillo is AD-02, a parish", ["AD-02"]) == 1.0
    assert exact_answer_recall("XBFAX", ["BFA"]) == 0.0
    assert exact_answer_recall("anything", [""]) == 0.0


GOLD = Passage(id="iso-3166-1-0000#0", title="ISO 3166-1 country codes",
               text="Burkina Faso: alpha-2 code BF, alpha-3 code BFA, numeric code 854.",
               metadata={"doc_id": "iso-3166-1-0000"})
OTHER = Passage(id="iso-15924-0003#0", title="ISO 15924 script codes",
                text="Some script: code Abcd, numeric code 854.",
                metadata={"doc_id": "iso-15924-0003"})
TEXT = "Burkina Faso has numeric code 854."


def _span(passage: Passage, text: str, piece: str, *, matched: bool = False) -> Span:
    start = text.index(piece)
    src = passage.text.index(piece)
    span = Span(text=piece, out_start=start, out_end=start + len(piece), passage=passage,
                src_start=src, src_end=src + len(piece),
                token_start=0 if matched else 3, token_end=0 if matched else 5)
    fields = {f.name for f in dataclasses.fields(Span)}
    if matched and "kind" in fields:
        return dataclasses.replace(span, kind="matched")  # type: ignore[call-arg]
    return span


def test_cited_correct_needs_the_answer_inside_a_gold_span() -> None:
    gold = "iso-3166-1-0000"
    assert cited_correct(TEXT, [_span(GOLD, TEXT, "numeric code 854")], ["854"], gold) == 1.0
    # the corpus id itself (a store that does not chunk) counts too
    unchunked = dataclasses.replace(GOLD, id=gold, metadata={})
    assert cited_correct(TEXT, [_span(unchunked, TEXT, "854")], ["854"], gold) == 1.0
    # the same string from another passage is not a correct citation
    assert cited_correct(TEXT, [_span(OTHER, TEXT, "numeric code 854")], ["854"], gold) == 0.0
    # a span that holds only part of the answer
    assert cited_correct(TEXT, [_span(GOLD, TEXT, "85")], ["854"], gold) == 0.0
    # a gold span elsewhere in the output, the answer written outside it
    assert cited_correct(TEXT, [_span(GOLD, TEXT, "numeric code")], ["854"], gold) == 0.0
    assert cited_correct(TEXT, [], ["854"], gold) == 0.0
    # the answer inside a gold span but glued to more digits is not the answer
    glued = "The numeric code is 8545."
    src = GOLD.text.index("854")
    span = Span(text="854", out_start=20, out_end=23, passage=GOLD, src_start=src,
                src_end=src + 3, token_start=1, token_end=2)
    assert cited_correct(glued, [span], ["854"], gold) == 0.0


def _result(text: str, spans: list[Span], matches: list[Span]) -> Any:
    result = NestResult(text=text, token_ids=[1, 2, 3, 4, 5], spans=spans, passages=[GOLD, OTHER],
                        stats=DecodeStats(generated_tokens=5), finish_reason="eos")
    if "matches" in {f.name for f in dataclasses.fields(NestResult)}:
        return dataclasses.replace(result, matches=matches)  # type: ignore[call-arg]
    return SimpleNamespace(text=text, spans=spans, matches=matches)


ITEM = Item(task="docqa", key="docqa:country-numeric:BF", prompt="q", query="q",
            references=("854",), entry_index=0, gold_passage="iso-3166-1-0000")


def test_citations_keep_copied_and_matched_apart() -> None:
    copied = _result(TEXT, [_span(GOLD, TEXT, "numeric code 854")], [])
    assert citations(ITEM, copied) == {"cited_copied": 1.0, "cited_matched": 0.0,
                                       "cited_any": 1.0}
    matched = _result(TEXT, [], [_span(GOLD, TEXT, "854", matched=True)])
    assert citations(ITEM, matched) == {"cited_copied": 0.0, "cited_matched": 1.0,
                                        "cited_any": 1.0}
    wrong = _result(TEXT, [_span(OTHER, TEXT, "854")],
                    [_span(OTHER, TEXT, "code 854", matched=True)])
    assert citations(ITEM, wrong) == {"cited_copied": 0.0, "cited_matched": 0.0,
                                      "cited_any": 0.0}
    # a result from before NestResult.matches existed
    old = SimpleNamespace(text=TEXT, spans=[_span(GOLD, TEXT, "854")])
    assert citations(ITEM, old)["cited_matched"] == 0.0
    no_gold = dataclasses.replace(ITEM, gold_passage="")
    assert citations(no_gold, copied) == {"cited_copied": None, "cited_matched": None,
                                          "cited_any": None}


def _record(system: str, key: str, text: str, quality: float, **kw: Any) -> RunRecord:
    return RunRecord(system=system, task="docqa", key=key, text=text, quality=quality,
                     answer_words=len(text.split()), generated_tokens=4, total_seconds=2.0,
                     **kw)


def test_docqa_summary_reports_cited_and_length_against_base() -> None:
    records = [
        _record("base", "k1", "one two three four", 0.0, cited_copied=0.0, cited_matched=0.0,
                cited_any=0.0),
        _record("base", "k2", "one two", 0.0, cited_copied=0.0, cited_matched=0.0,
                cited_any=0.0),
        _record("nest", "k1", "854", 1.0, cited_copied=1.0, cited_matched=0.0, cited_any=1.0),
        _record("nest", "k2", "BFA", 1.0, cited_copied=0.0, cited_matched=1.0, cited_any=1.0),
        _record("rag+lookup", "k1", "854", 1.0),
        _record("rag+lookup", "k2", "x y z", 0.0),
    ]
    rows = {r.system: r for r in summarise(records)}
    nest = rows["nest"]
    assert (nest.cited_copied, nest.cited_matched, nest.cited_any) == (0.5, 0.5, 1.0)
    assert nest.answer_words_vs_base == pytest.approx(2 / 6)
    assert nest.seconds_per_answer == pytest.approx(2.0)
    assert rows["rag+lookup"].cited_any is None
    table = docqa_table(list(rows.values()))
    assert "| Nest | 1.000 | 50% / 50% / 100% |" in table
    assert "| RAG + prompt lookup | 0.500 | n/a / n/a / n/a |" in table


def test_missing_tables_fail_with_the_install_command(tmp_path: Any) -> None:
    from benchmarks.isocodes import require_corpus

    with pytest.raises(FileNotFoundError, match="apt-get install -y iso-codes"):
        require_corpus(tmp_path)


def test_run_exits_with_one_line_naming_the_missing_packages(monkeypatch: Any) -> None:
    from benchmarks import foldoc, isocodes, run

    def missing(what: str) -> Any:
        def check() -> None:
            msg = f"{what} not found (/nowhere); install it with: apt-get install -y {what}"
            raise FileNotFoundError(msg)
        return check

    monkeypatch.setattr(foldoc, "require_corpus", missing("dict-foldoc"))
    monkeypatch.setattr(isocodes, "require_corpus", missing("iso-codes"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--tasks", "docqa", "--no-readme"])
    message = str(exc.value.code)
    assert "\n" not in message
    assert message.endswith("apt-get install -y iso-codes (as root; `make bench` does it)")
    with pytest.raises(SystemExit) as exc:
        run.main([])
    assert "apt-get install -y dict-foldoc iso-codes" in str(exc.value.code)


def test_spans_that_continue_each_other_cite_the_answer_together() -> None:
    gold = "iso-3166-1-0000"
    head, tail = _span(GOLD, TEXT, "85", matched=True), _span(GOLD, TEXT, "4.")
    assert cited_correct(TEXT, [tail, head], ["854"], gold) == 1.0
    # adjacent in the output but not in the source: two separate citations
    moved = dataclasses.replace(tail, src_start=tail.src_start + 1, src_end=tail.src_end + 1)
    assert cited_correct(TEXT, [head, moved], ["854"], gold) == 0.0
