"""Shared fixtures: a tiny random Llama with a tiny byte-level BPE tokenizer (unit tests),
and the real bundled SmolLM2 (integration tests, loaded once per session)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nest_core.decoding.policy import Shortcuts
from nest_core.lm import LanguageModel as LanguageModelBase
from nest_core.types import Passage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CORPUS = [
    "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in Ostrava.",
    "Nearest neighbor speculative decoding copies spans of text from retrieved passages.",
    "A compiler translates source code into machine code; an interpreter runs it directly.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Chroma and FAISS store vectors; a retriever returns the passages nearest to a query.",
    "Unicode: café, naïve, 東京, emoji 🙂 and the end.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm():
    """A randomly initialised 3-layer Llama (float32, CPU) with a real BPE tokenizer."""
    from nest_core.lm import LanguageModel

    tok = make_tiny_tokenizer()
    return LanguageModel(make_tiny_model(len(tok)), tok, name="tiny-llama")


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct, float32 (converted once into NEST_CACHE_DIR)."""
    from nest_core.models import load_model

    return load_model()


def free_port() -> int:
    """A loopback TCP port nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(proc: subprocess.Popen[Any], ready: Callable[[], bool], seconds: float,
                       failure: Callable[[], str]) -> None:
    """Poll ``ready`` (a request that raises or says no while the server starts) until it
    says yes; fail the test with ``failure()`` if ``proc`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(failure())
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[Any], seconds: float) -> None:
    """Terminate ``proc``, kill it if it has not exited after ``seconds``, and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """A real ``chroma run`` on a free loopback port, shared by the session: ``(host, port,
    data dir, process)``; stopped (and waited for) at the end. A test that freezes it
    (SIGSTOP) must let it run again (SIGCONT) before it returns."""
    local = Path(sys.executable).parent / "chroma"
    cli = str(local) if local.is_file() else shutil.which("chroma")
    if cli is None:
        pytest.skip("the `chroma` CLI is not installed (it ships with `pip install chromadb`)")
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    log = (path.parent / "chroma-server.log").open("wb")
    proc = subprocess.Popen([cli, "run", "--path", str(path), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)

    def heartbeat() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat",
                                        timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until_serving(proc, heartbeat, 60, lambda: f"chroma run did not start (exit "
                                                        f"{proc.poll()}); see {log.name}")
        yield "127.0.0.1", port, path, proc
    finally:
        stop_process(proc, 20)
        log.close()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny model's matmuls are ~30x slower with 2 threads on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The three passages and the question most unit tests decode (tiny model, exact assertions).
PASSAGES = [
    Passage("zw", "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather.",
            title="Zephyr"),
    Passage("nn", "Nearest neighbor speculative decoding copies spans of text from passages."),
    Passage("fox", "The quick brown fox jumps over the lazy dog."),
]
PROMPT = "Who founded the Zephyr Widget Company?"


class RecordingLM(LanguageModelBase):
    """The real model (not a mock), recording each cached forward: what the cache held
    before it, the ids fed and the logits it gave. No prefix cache: every prompt is fed."""

    def __init__(self, lm: Any) -> None:
        super().__init__(lm.model, lm.tokenizer, name=lm.name, prefix_cache_bytes=0)
        self.calls: list[tuple[int, list[int], torch.Tensor]] = []

    def forward(self, input_ids, cache, key_layer, last_only=False):  # type: ignore[no-untyped-def]
        before = cache.get_seq_length()
        out = super().forward(input_ids, cache, key_layer, last_only=last_only)
        self.calls.append((before, list(input_ids), out.logits))
        return out


def assert_cache_stays_aligned(lm: Any, tol: float = 1e-4) -> tuple[Any, list[int]]:
    """Decode :data:`PROMPT` with drafts that get partly rejected and check that every
    forward's logits are those of a fresh forward of all the ids fed so far (a crop that
    leaves the KV cache out of step with the output fails); returns the result and the ids
    fed."""
    from nest_core import NestConfig, NestDecoder

    recording = RecordingLM(lm)
    cfg = NestConfig(confidence_offset=1.0, relaxation=1.0, span_length=8,
                     initial_span_length=8)
    res = NestDecoder(recording, cfg).generate(PROMPT, PASSAGES, max_new_tokens=40)
    assert res.stats.accepted_draft_tokens < res.stats.drafted_tokens, "need a rejection"
    fed: list[int] = []
    cropped = False
    for before, ids, logits in recording.calls:
        cropped |= before < len(fed)
        fed = fed[:before] + ids
        fresh = lm.forward(fed, lm.new_cache(), -2).logits[-logits.shape[0]:]
        torch.testing.assert_close(logits, fresh, atol=tol, rtol=tol)
    assert cropped, "a partial acceptance must crop the cache"
    return res, fed


def assert_copies_are_their_source(dec: Any, max_new_tokens: int = 40) -> Any:
    """Decode :data:`PROMPT` over :data:`PASSAGES` (with settings that copy) and check every
    copied span: its tokens are the passage's tokens at its rows, its text the output's and
    the passage's at its offsets, and the copied-token count adds up; returns the result."""
    res = dec.generate(PROMPT, PASSAGES, max_new_tokens=max_new_tokens)
    assert res.spans, "the copy-heavy setting must copy something"
    by_id = {p.id: p for p in PASSAGES}
    for span in res.spans:
        encoded = dec.encoder.encode([by_id[span.passage.id]])[0]
        rows = encoded.values[span.source_row: span.source_row + span.num_tokens]
        assert rows.tolist() == res.token_ids[span.token_start:span.token_end]
        assert res.text[span.out_start:span.out_end] == span.text
        assert span.passage.text[span.src_start:span.src_end] == span.text
    assert res.stats.copied_tokens == sum(s.num_tokens for s in res.spans)
    return res


@pytest.fixture(autouse=True)
def no_calibrated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run the shipped defaults, whatever `nest calibrate` recorded on this machine."""
    monkeypatch.setenv("NEST_ANSWER_SETTINGS", "")


@pytest.fixture(autouse=True)
def paper_prompt_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                        ) -> None:
    """Unit tests: the default settings with the paper's prompt layout (instruction,
    background, request) instead of ``repeat_question``. What a *random* model copies
    depends on every prompt token, and the surfaces' unit tests check how copied spans flow
    through them, which needs a prompt the random model copies after. ``repeat_question``
    itself is pinned in tests/unit/test_focus.py; integration tests run the real default
    on SmolLM2. Abstention is off too: the surfaces' unit tests retrieve with mock
    embeddings, so which passages come back is arbitrary; it is pinned in
    tests/unit/test_grounding.py and runs on every surface in the integration tests. So is
    the quote (a random model's answer is never supported: every answer would be one);
    it is pinned in tests/unit/test_citations.py."""
    if "unit" in request.node.path.parts:
        from nest_core.config import ANSWER_DEFAULTS

        monkeypatch.setitem(ANSWER_DEFAULTS, "repeat_question", False)
        monkeypatch.setitem(ANSWER_DEFAULTS, "abstain_below", 0.0)
        monkeypatch.setitem(ANSWER_DEFAULTS, "quote_below", 0.0)


# --- reference decoding paths (tests/unit/test_fast_paths.py, its SmolLM2 twin) ---------
# The decoder's slow path: every fed position searched, λ always from the sorted neighbours,
# and p_LM judged from whole scaled rows (max and argmax of ``logits / T``).
SLOW_SEARCH = Shortcuts(lazy_search=False)
# Every token of a draft waits for the draft's forward (no early first token).
LATE = Shortcuts(early_first_token=False)
