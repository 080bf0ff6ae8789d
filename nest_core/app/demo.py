"""``nest demo``: the plain model and Nest, side by side, on a handbook the model never saw.

The sample corpus (``examples/data/``, the employee handbook of a fictional company) is made
up, so the plain model can only guess; Nest copies the answer from the handbook and cites it.
The store is built once under the cache dir (embedding + span datastore) and reused, so
later runs spend their time on the answers only.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from nest_core.app.render import render_comparison
from nest_core.app.safe_text import printable

logger = logging.getLogger(__name__)

QUESTIONS = (
    "Who founded Halvorsen Orchard Robotics, and when?",
    "Where is the headquarters of Halvorsen Orchard Robotics?",
    "What is the paid leave allowance?",
)
DEMO_K = 8
STORE_VERSION = 2  # bump when indexing changes, so old demo stores are not reused


def corpus_dir() -> Path:
    """``examples/data`` of a source checkout (where ``make demo`` runs)."""
    return Path(__file__).resolve().parents[2] / "examples" / "data"


def demo_dir() -> Path:
    """Where demo stores live: ``<cache_dir>/demo``."""
    from nest_core.models import cache_dir

    return cache_dir() / "demo"


def run_demo(*, store_kind: str = "faiss", max_new_tokens: int = 64, mode: str = "default",
             color: bool = False, width: int = 100, rebuild: bool = False) -> int:
    """Build (or reuse) the demo store, answer :data:`QUESTIONS` with both systems, print
    them side by side with stats, then a summary. Returns the exit code."""
    from nest_core import NestConfig, NestDecoder
    from nest_core.app.common import build_store, load_quietly, nest_config, open_source
    from nest_core.app.files import CliError, collect_files
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.embeddings import default_embedding_function

    data = corpus_dir()
    if not data.is_dir():
        msg = (f"the sample corpus {data} is missing; run `nest demo` from a source checkout "
               f"of nest (make demo), or index your own files with `nest index`")
        raise CliError(msg)
    files = collect_files([str(data)])
    store = demo_dir() / f"{store_kind}-{_fingerprint(files)}"
    if rebuild or not _built(store):
        _say(f"building the demo store from {len(files)} handbook files in {store} "
             f"(once; later runs reuse it) ...")
        build_store(files, store, store_kind, progress=True)
        (store / ".complete").touch()
    source = open_source(store)
    lm = load_quietly()
    nest = NestDecoder(lm, nest_config(mode, lm.name), key_cache=SpanDatastore.for_store(store),
                       embed=default_embedding_function())
    base = NestDecoder(lm, NestConfig(mode="base"))
    rule = "─" * width
    totals: dict[str, list[Any]] = {"base": [], "nest": []}
    # The first forward of a process pays one-off set-up costs; pay them outside the timings
    # so neither system is charged for them.
    base.generate("Hello", max_new_tokens=2)
    print(intro(nest.config, DEMO_K))
    started = time.perf_counter()
    for i, question in enumerate(QUESTIONS, 1):
        passages = source.retrieve(question, DEMO_K)
        plain = base.generate(question, max_new_tokens=max_new_tokens)
        grounded = nest.generate(question, passages, max_new_tokens=max_new_tokens)
        totals["base"].append(plain)
        totals["nest"].append(grounded)
        print(rule)
        print(f"Q{i}. {question}\n")
        print(render_comparison(plain, grounded, color=color, width=width))
        sys.stdout.flush()
    print(rule)
    print(summary(totals["base"], totals["nest"]))
    print(f"\n(demo answers took {time.perf_counter() - started:.0f} s on this machine)")
    print('Your turn: nest index ~/notes --out ~/notes-store && '
          'nest ask "your question" --store ~/notes-store --compare')
    return 0


def intro(config: Any, k: int) -> str:
    """What the two columns are, in two lines, before the first answer."""
    n, f = config.prompt_passages, config.focus_sentences
    if not config.passages_in_prompt:
        how = ""
    elif f:
        how = (f"the {'sentence' if f == 1 else f'{f} sentences'} of them that best "
               f"match{'es' if f == 1 else ''} the question {'is' if f == 1 else 'are'} in "
               f"its prompt; ")
    else:
        how = f"the top {n} {'is' if n == 1 else 'are'} also in its prompt; "
    judge = "the LM" if config.verify_against == "lm" else "the mixture"
    return ("Plain model: SmolLM2-135M-Instruct alone, greedy.\n"
            f"Nest: the same model with {k} handbook passages retrieved; {how}copied spans are "
            f"verified by {judge} in one forward and cited [n].\n")


def summary(base: list[Any], nest: list[Any]) -> str:
    """Totals over all questions: speed of each system and how much of Nest's text is cited."""
    def rate(results: list[Any]) -> tuple[float, float, float]:
        tokens = sum(r.stats.generated_tokens for r in results)
        seconds = sum(r.stats.total_seconds for r in results)
        forwards = sum(r.stats.lm_forwards for r in results)
        return (tokens / seconds if seconds else 0.0, tokens / forwards if forwards else 0.0,
                seconds)

    b_tps, b_tpf, b_sec = rate(base)
    n_tps, n_tpf, n_sec = rate(nest)
    copied = sum(s.num_tokens for r in nest for s in r.spans)
    generated = sum(len(r.token_ids) for r in nest)
    spans = sum(len(r.spans) for r in nest)
    speedup = n_tps / b_tps if b_tps else 0.0
    return "\n".join([
        "Summary over all questions",
        (f"  plain model: {b_tps:5.1f} tokens/s, {b_tpf:.2f} tokens per LM forward, "
        f"{b_sec:.1f} s, nothing attributed"),
        (f"  Nest:        {n_tps:5.1f} tokens/s, {n_tpf:.2f} tokens per LM forward, "
        f"{n_sec:.1f} s, {copied / generated if generated else 0:.0%} of tokens copied "
        f"from the handbook in {spans} span(s)"),
        (f"  speed: Nest runs at {speedup:.1f}x the plain model's tokens/s in this run "
        f"(wall clock, prompt included)"),
    ])


def _built(store: Path) -> bool:
    return (store / ".complete").is_file()


def _fingerprint(files: list[tuple[Path, str]]) -> str:
    """A short hash of the corpus, so an edited handbook gets a fresh store."""
    h = hashlib.sha256(f"v{STORE_VERSION}".encode())
    for path, doc_id in files:
        h.update(doc_id.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _say(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)
