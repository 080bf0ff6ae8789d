"""Spans that start where the output repeats a passage (``passage_drafts``): which row the
lookup starts at, and that the decoder copies (and cites) what the LM writes anyway."""

from __future__ import annotations

import torch
from test_focus import ScriptedLM

from nest_core import DecodeStats, NestDecoder, Passage
from nest_core.config import default_config
from nest_core.decoding.drafters import SHORT_DRAFT, PassageLookup
from nest_core.encoding import EncodedPassage
from nest_core.token_index import TokenIndex


def _index(*passages: list[int]) -> TokenIndex:
    def enc(values: list[int]) -> EncodedPassage:
        return EncodedPassage(keys=torch.zeros(len(values), 1), values=torch.tensor(values),
                              char_spans=torch.tensor([[i, i + 1] for i in range(len(values))],
                                                      dtype=torch.int32))

    return TokenIndex([Passage(f"p{i}", "x" * 9) for i in range(len(passages))],
                      [enc(v) for v in passages], vocab_size=10)


def test_the_lookup_starts_where_the_output_repeats_the_passage():
    # caught: the preceding tokens ignored (reading order alone), matched across a passage
    # boundary, masked rows proposed, the allowed rows ignored, full length on a weak match
    index = _index([5, 7, 8, 1, 2, 3, 9], [7, 6], [9, 7, 4])  # rows 0-6, 7-8, 9-11
    everywhere = torch.ones(index.num_rows, dtype=torch.bool)
    look = PassageLookup(index, everywhere, 64)
    assert look.rows([], 7, 9) == [1, 2, 3, 4, 5, 6]  # the answer's start: first 7
    assert look.rows([5], 7, 9) == [1, 2, 3, 4, 5, 6]  # "5 7"
    assert look.rows([9], 7, 9) == [10, 11]  # "9 7" in p2, not p0's 9 before p1's 7
    assert look.rows([3], 7, 9) == [1, 2, 3, 4][:SHORT_DRAFT]  # "7" alone: short
    assert look.rows([5], 7, 2) == [1, 2]
    assert look.rows([], 0, 9) == []
    assert PassageLookup(index, everywhere & (index.passage_of > 0), 64).rows([5], 7, 9) == [7, 8]
    index.mask([10])
    assert look.rows([9], 7, 9) == [1, 2, 3, 4]  # p2's 7 was copied: "7" alone


def test_the_decoder_copies_and_cites_the_passage_words_the_lm_writes(tiny_lm):
    # caught: lookup drafts left uncited (rows NO_SOURCE), verified relaxed instead of
    # exactly, or never consulted when retrieval is not confident
    passage = Passage("ghent", "The Ghent office opened in 2019 and hosts 45 people.")
    prompt = "When did the office in Ghent open?"
    # λ ≈ 1 everywhere: retrieval never starts a span itself
    on = default_config("tiny", confidence_offset=-1.0)
    off = on.with_overrides(passage_drafts=False)
    probe = NestDecoder(tiny_lm, on)
    index = probe._index([passage], DecodeStats())
    assert index is not None
    words = index.values[index.active].tolist()  # the passage's tokens, as the index has them
    at = len(words) // 3
    other = next(t for t in tiny_lm.tokenizer.encode(" banana", add_special_tokens=False)
                 if t != words[at + 3])
    # "It" and three of the passage's tokens, then not its fourth (a close runner-up there:
    # relaxed verification would take the passage's token)
    script = [*tiny_lm.tokenizer.encode("It", add_special_tokens=False), *words[at:at + 3],
              other]
    n = probe.generate(prompt, [passage], max_new_tokens=1).stats.prompt_tokens
    results = {}
    for name, cfg in (("on", on), ("off", off)):
        lm = ScriptedLM(tiny_lm, n, script, {len(script) - 1: words[at + 3]})
        results[name] = NestDecoder(lm, cfg).generate(prompt, [passage],
                                                      max_new_tokens=len(script))
    assert results["on"].token_ids == results["off"].token_ids == script
    copied = [s for s in results["on"].spans if s.kind == "copied" and s.passage.id == "ghent"]
    assert copied
    start = len(script) - 4  # the three passage tokens, after "It"
    assert (start, start + 3) in [(s.token_start, s.token_end) for s in copied]
    assert not [s for s in results["off"].spans if s.kind == "copied"]
