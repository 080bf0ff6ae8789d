"""Passage encoding stops at the key layer; decoding forwards still run every layer."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from nest_core.lm import LanguageModel


class LayerCalls:
    """Counts the calls of each decoder layer and of the final norm (forward hooks)."""

    def __init__(self, lm: LanguageModel) -> None:
        body = lm.model.model
        self.modules = [*body.layers, body.norm]
        self.calls = [0] * len(self.modules)
        self._hooks: list[Any] = []

    def __enter__(self) -> LayerCalls:
        for i, m in enumerate(self.modules):
            self._hooks.append(m.register_forward_hook(self._counter(i)))
        return self

    def _counter(self, i: int) -> Any:
        def hook(*_: Any) -> None:
            self.calls[i] += 1
        return hook

    def __exit__(self, *_: Any) -> None:
        for h in self._hooks:
            h.remove()


@pytest.mark.parametrize(("key_layer", "ran"), [(-2, [1, 1, 0, 0]), (1, [1, 0, 0, 0]),
                                                (-1, [1, 1, 1, 1])])
def test_encoding_runs_no_layer_after_the_key_layer(tiny_lm, key_layer, ran):
    # caught: stop=False in encode_hidden (every layer and the norm run)
    ids = torch.tensor([list(range(5, 25))])
    ref = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states[key_layer]
    with LayerCalls(tiny_lm) as seen:
        states = tiny_lm.encode_hidden(ids, torch.ones_like(ids), key_layer)
    assert seen.calls == ran  # 3 decoder layers, then the final norm
    assert torch.equal(states, ref)
    with LayerCalls(tiny_lm) as seen:  # a decoding forward needs the logits: all run
        tiny_lm.forward(ids[0].tolist(), tiny_lm.new_cache(), key_layer)
    assert seen.calls == [1, 1, 1, 1]


def test_a_stopped_encoding_never_stops_another_threads_forward(tiny_lm):
    # caught: the stop raised in every thread's forward (the hook is on a shared module)
    ids = list(range(5, 45))
    want_logits = tiny_lm.forward(ids, tiny_lm.new_cache(), -2).logits
    batch = torch.tensor([ids])
    want_keys = tiny_lm.encode_hidden(batch, torch.ones_like(batch), -2)
    errors: list[BaseException] = []

    def decode() -> None:
        try:
            for _ in range(15):
                out = tiny_lm.forward(ids, tiny_lm.new_cache(), -2)
                assert torch.equal(out.logits, want_logits)
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    def encode() -> None:
        try:
            for _ in range(15):
                keys = tiny_lm.encode_hidden(batch, torch.ones_like(batch), -2)
                assert torch.equal(keys, want_keys)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=f) for f in (decode, encode, decode, encode)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
