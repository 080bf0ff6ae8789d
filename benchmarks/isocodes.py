"""The document-QA corpus: Debian's ``iso-codes`` tables as text passages, and questions on them.

``iso-codes`` installs JSON code tables under ``/usr/share/iso-codes/json``: countries
(ISO 3166-1: alpha-2, alpha-3, numeric), their subdivisions (ISO 3166-2), currencies (ISO
4217), languages (ISO 639-3) and scripts (ISO 15924). Each entry becomes one plain sentence
("Burkina Faso: alpha-2 code BF, alpha-3 code BFA, numeric code 854."); consecutive entries of
a table (of one country, for subdivisions) are packed into passages of a few entries with a
stable id and a title. Questions ask for one code of one entry, the way a user would ("What is
the ISO 3166-1 numeric code of Burkina Faso?"); each has one short exact answer that a 135M
model cannot know (numeric codes, codes that are not the name's first letters) and exactly one
gold passage, in which the answer string occurs once, on the entry's own line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nest_core import Passage

JSON_DIR = Path("/usr/share/iso-codes/json")
TABLE_FILES: dict[str, str] = {"3166-1": "iso_3166-1.json", "3166-2": "iso_3166-2.json",
                               "4217": "iso_4217.json", "639-3": "iso_639-3.json",
                               "15924": "iso_15924.json"}
INSTALL_HINT = "apt-get update && apt-get install -y iso-codes"
PASSAGE_WORDS = 100  # the store's chunker keeps a document of <= 100 words whole
ENTRIES_PER_PASSAGE: dict[str, int] = {"3166-1": 4, "3166-2": 8, "4217": 6, "639-3": 6,
                                       "15924": 6}
HEADINGS: dict[str, str] = {"3166-1": "ISO 3166-1 country codes",
                            "3166-2": "ISO 3166-2 subdivision codes of {country}",
                            "4217": "ISO 4217 currency codes", "639-3": "ISO 639-3 language codes",
                            "15924": "ISO 15924 script codes"}
# family -> (table, question template, answer field)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "country-numeric": ("3166-1", "What is the ISO 3166-1 numeric code of {name}?", "numeric"),
    "country-alpha3": ("3166-1", "What is the ISO 3166-1 alpha-3 code of {name}?", "alpha_3"),
    "currency-numeric": ("4217", "What is the ISO 4217 numeric code of the currency {name}?",
                         "numeric"),
    "script-numeric": ("15924", "What is the ISO 15924 numeric code of the {name} script?",
                       "numeric"),
    "language-code": ("639-3", "What is the ISO 639-3 code of the {name} language?", "alpha_3"),
    "subdivision-code": ("3166-2", ("What is the ISO 3166-2 code of {name}, a {kind} of "
                                    "{country}?"), "code"),
}
# Three-letter language codes that are also words an answer is likely to contain.
COMMON_WORDS = frozenset((
    "all", "and", "any", "are", "but", "can", "did", "for", "get", "had", "has", "her", "him",
    "his", "how", "iso", "its", "let", "may", "new", "not", "now", "off", "old", "one", "our",
    "out", "own", "see", "she", "the", "too", "two", "use", "was", "way", "who", "why", "yes",
    "you", "lan", "int", "num"))
_SCOPE = {"I": "individual language", "M": "macrolanguage", "S": "special code"}
_TYPE = {"L": "living", "E": "extinct", "A": "ancient", "H": "historical", "C": "constructed",
         "S": "special"}
_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class Record:
    """One table entry as a sentence; ``fields`` fill the question templates and hold the
    codes (answers) by field name."""

    table: str
    key: str  # the entry's own code: unique within its table
    name: str
    line: str
    fields: Mapping[str, str]
    group: str  # entries are packed into passages within one group


@dataclass(frozen=True)
class Question:
    family: str
    key: str  # "docqa:<family>:<entry code>": the split and the sample order hash this
    question: str
    answer: str
    passage_id: str
    name: str


def require_corpus(json_dir: Path = JSON_DIR) -> None:
    """Fail with the exact install command when the iso-codes tables are missing."""
    missing = [str(json_dir / f) for f in TABLE_FILES.values() if not (json_dir / f).is_file()]
    if missing:
        msg = (f"iso-codes tables not found ({', '.join(missing)}); install them with: "
               f"{INSTALL_HINT}")
        raise FileNotFoundError(msg)


@lru_cache(maxsize=1)
def load_tables(json_dir: Path = JSON_DIR) -> dict[str, list[dict[str, str]]]:
    """``{"3166-1": [entry, ...], ...}`` as the JSON files have them (file order)."""
    require_corpus(json_dir)
    out = {}
    for table, name in TABLE_FILES.items():
        data = json.loads((json_dir / name).read_text(encoding="utf-8"))
        out[table] = list(data[table])
    return out


# --- entries -> sentences -----------------------------------------------------------------
def country_name(entry: Mapping[str, str]) -> str:
    """What a user calls the country: the common name, else "Micronesia, Federated States of"
    turned around, else the ISO short name."""
    if entry.get("common_name"):
        return entry["common_name"]
    name = entry["name"]
    m = re.match(r"^(.+), ((?:The )?.+ of(?: the)?)$", name)
    return f"{m.group(2)} {m.group(1)}" if m else name


def records(tables: Mapping[str, Sequence[Mapping[str, str]]]) -> list[Record]:
    """Every entry of every table present in ``tables``, in table then file order."""
    countries = {e["alpha_2"]: country_name(e) for e in tables.get("3166-1", ())}
    out: list[Record] = []
    for e in tables.get("3166-1", ()):
        name = country_name(e)
        official = f" (official name: {e['official_name']})" if e.get("official_name") else ""
        out.append(Record("3166-1", e["alpha_2"], name,
                          f"{name}{official}: alpha-2 code {e['alpha_2']}, alpha-3 code "
                          f"{e['alpha_3']}, numeric code {e['numeric']}.",
                          {"name": name, "alpha_2": e["alpha_2"], "alpha_3": e["alpha_3"],
                           "numeric": e["numeric"]}, "3166-1"))
    for e in tables.get("3166-2", ()):
        cc = e["code"].split("-", 1)[0]
        country = countries.get(cc, cc)
        kind = e["type"].lower()
        out.append(Record("3166-2", e["code"], e["name"], f"{e['name']} ({kind}): {e['code']}.",
                          {"name": e["name"], "kind": kind, "country": country,
                           "code": e["code"]}, f"3166-2:{cc}"))
    for e in tables.get("4217", ()):
        out.append(Record("4217", e["alpha_3"], e["name"],
                          f"{e['name']}: alphabetic code {e['alpha_3']}, numeric code "
                          f"{e['numeric']}.",
                          {"name": e["name"], "alpha_3": e["alpha_3"], "numeric": e["numeric"]},
                          "4217"))
    for e in tables.get("639-3", ()):
        extra = f", ISO 639-1 code {e['alpha_2']}" if e.get("alpha_2") else ""
        kind = ", ".join(x for x in (_SCOPE.get(e.get("scope", "")),
                                     _TYPE.get(e.get("type", ""))) if x)
        out.append(Record("639-3", e["alpha_3"], e["name"],
                          f"{e['name']}: code {e['alpha_3']}{extra}"
                          f"{f' ({kind})' if kind else ''}.",
                          {"name": e["name"], "alpha_3": e["alpha_3"]}, "639-3"))
    for e in tables.get("15924", ()):
        out.append(Record("15924", e["alpha_4"], e["name"],
                          f"{e['name']}: code {e['alpha_4']}, numeric code {e['numeric']}.",
                          {"name": e["name"], "alpha_4": e["alpha_4"], "numeric": e["numeric"]},
                          "15924"))
    return out


# --- sentences -> passages ----------------------------------------------------------------
def _groups(recs: Sequence[Record]) -> Iterator[tuple[str, list[Record]]]:
    """Consecutive records of one group, packed: at most ``ENTRIES_PER_PASSAGE`` entries and
    ``PASSAGE_WORDS`` words per passage."""
    current: list[Record] = []
    words = 0
    for r in [*recs, None]:
        n = len(r.line.split()) if r else 0
        if current and (r is None or r.group != current[0].group
                        or len(current) == ENTRIES_PER_PASSAGE[current[0].table]
                        or words + n > PASSAGE_WORDS):
            yield current[0].group, current
            current, words = [], 0
        if r is not None:
            current.append(r)
            words += n


def passage_id(group: str, k: int) -> str:
    """``iso-3166-1-0012``; subdivisions per country: ``iso-3166-2-AD-0000``."""
    return f"iso-{group.replace(':', '-')}-{k:04d}"


def build_passages(tables: Mapping[str, Sequence[Mapping[str, str]]]
                   ) -> tuple[list[Passage], dict[tuple[str, str], str]]:
    """The passages (one sentence per line) and where each entry went:
    ``{(table, entry key): passage id}``."""
    passages: list[Passage] = []
    where: dict[tuple[str, str], str] = {}
    counters: Counter[str] = Counter()
    for group, recs in _groups(records(tables)):
        pid = passage_id(group, counters[group])
        counters[group] += 1
        table = recs[0].table
        title = HEADINGS[table].format(country=recs[0].fields.get("country", ""))
        passages.append(Passage(id=pid, text="\n".join(r.line for r in recs), title=title,
                                metadata={"source": "iso-codes", "table": table}))
        for r in recs:
            where[(table, r.key)] = pid
    return passages, where


# --- questions ----------------------------------------------------------------------------
def answer_pattern(answer: str) -> re.Pattern[str]:
    """``answer`` as a whole token, case-insensitive: "85" does not match "854" or "x85"."""
    body = r"\s+".join(re.escape(w) for w in answer.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def guessable(code: str, name: str) -> bool:
    """Could a model spell ``code`` from ``name`` alone: the name's first letters, or its
    words' initials? (The country prefix of a subdivision code is ignored.)"""
    letters = _ALNUM.sub("", code.split("-", 1)[-1].lower())
    words = [_ALNUM.sub("", w) for w in name.lower().split()]
    joined = "".join(words)
    initials = "".join(w[:1] for w in words if w)
    return not letters.isdigit() and (joined.startswith(letters) or initials.startswith(letters))


def _rank(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16)


def build_questions(tables: Mapping[str, Sequence[Mapping[str, str]]],
                    per_family: int | None = None) -> list[Question]:
    """Questions with one unambiguous answer and one gold passage; up to ``per_family`` per
    family, taken in order of a salted hash of their key (a fixed pseudo-random sample,
    independent of the split's hash), families in :data:`FAMILIES` order.

    Dropped: entries whose question text is shared with another entry (two currencies named
    "Leone"), answers that occur in the question, anywhere else in the gold passage (title
    included) or are guessable from the name (FRA for France, US-CA for California), language
    codes that are common English words, and reserved currency/script codes.
    """
    recs = records(tables)
    passages, where = build_passages(tables)
    by_id = {p.id: p for p in passages}
    out: list[Question] = []
    for family, (table, template, answer_field) in FAMILIES.items():
        candidates = []
        for r in recs:
            if r.table != table or answer_field not in r.fields:
                continue
            if re.search(r"\b[Cc]odes?\b", r.name):  # "Codes specifically reserved for ..."
                continue
            question = template.format(**r.fields)
            answer = r.fields[answer_field]
            candidates.append((question, answer, r))
        counts = Counter(q for q, _, _ in candidates)
        family_qs = []
        for question, answer, r in candidates:
            passage = by_id[where[(table, r.key)]]
            pat = answer_pattern(answer)
            if (counts[question] > 1 or pat.search(question)
                    or len(pat.findall(f"{passage.title}\n{passage.text}")) != 1
                    or not pat.search(r.line)
                    or guessable(answer, r.name)
                    or (family == "language-code" and answer.lower() in COMMON_WORDS)):
                continue
            family_qs.append(Question(family=family, key=f"docqa:{family}:{r.key}",
                                      question=question, answer=answer, passage_id=passage.id,
                                      name=r.name))
        # a salted hash: sorting by the split's own hash would hand the large families (7,000
        # languages) the smallest ranks, and every sample of the benchmark to them
        family_qs.sort(key=lambda q: _rank(f"sample:{q.key}"))
        out += family_qs if per_family is None else family_qs[:per_family]
    return out


@lru_cache(maxsize=1)
def load_passages() -> tuple[Passage, ...]:
    """All iso-codes passages of the installed tables."""
    return tuple(build_passages(load_tables())[0])
