"""Old against new decoder in one process: ``default_config()`` of the core at a git revision
and of the working tree, interleaved per item (the order alternates), on one loaded model.

The old core is unpacked from ``git archive`` into a temporary folder as the package
``nest_old`` (its imports rewritten), so both run side by side on the same model weights,
passages and warm span datastore. Prints overhead per step (kNN + other seconds per LM
forward, summed over the answers), median seconds per answer and to first text, and how
many answers differ in token ids (a lossless change must show 0). ``--keep`` copies modules
of the working tree into the old core (e.g. ``focus``, when another change to it would
otherwise make the answers differ). Run, e.g.:
``python -m benchmarks.bench_ab --old 0786df8 --task docqa --items 30 --keep focus``.
``--new-config '{"abstain_rare": false}'`` sets options of the new default (one added since
the old revision, say), so that both decode the same answers and only their speed differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent


def unpack_old(rev: str, keep: list[str], folder: Path) -> None:
    """``nest_core`` at ``rev`` as ``folder/nest_old``, with ``keep`` modules from now."""
    archive = subprocess.run(["git", "archive", rev, "nest_core"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    old = folder / "nest_old"
    (folder / "nest_core").rename(old)
    for name in keep:
        (old / f"{name}.py").write_text((ROOT / "nest_core" / f"{name}.py").read_text())
    for path in old.rglob("*.py"):
        path.write_text(re.sub(r"\bnest_core\b", "nest_old", path.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision of the old core")
    ap.add_argument("--task", choices=("docqa", "completion"), default="docqa")
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", nargs="*", default=[], help="modules taken from the work tree")
    ap.add_argument("--new-config", default="{}",
                    help="JSON of NestConfig fields set on the new default_config()")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(tempfile.mkdtemp(prefix="nest-ab-"))
    unpack_old(args.old, args.keep, folder)
    sys.path.insert(0, str(folder))
    import nest_old.config
    import nest_old.decoder
    import nest_old.lm
    import nest_old.stores.datastore
    import nest_old.types
    import torch

    from benchmarks.run import CORPUS_OF, FULL, build_items, corpus_passages, open_search
    from nest_core import NestDecoder, load_model
    from nest_core.config import default_config
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

    torch.set_num_threads(args.threads)
    plan = FULL.__class__(**{**vars(FULL), "tasks": (args.task,), "split": "dev",
                             f"{args.task}_items": args.items})
    items = build_items(plan)
    search = open_search(corpus_passages(CORPUS_OF[args.task]), CORPUS_OF[args.task])["faiss"]
    lm = load_model()
    old_lm = nest_old.lm.LanguageModel(lm.model, lm.tokenizer, lm.name)
    spans = cache_dir() / "bench" / "spans"
    decoders: dict[str, Any] = {
        "old": nest_old.decoder.NestDecoder(old_lm, nest_old.config.default_config(lm.name),
                                            key_cache=nest_old.stores.datastore.SpanDatastore(spans)),
        "new": NestDecoder(lm, dataclasses.replace(default_config(lm.name),
                                                   **json.loads(args.new_config)),
                           key_cache=SpanDatastore(spans))}
    for dec in decoders.values():
        dec.generate("Hello", max_new_tokens=2)  # one-off set-up, untimed
    rows: dict[str, list[Any]] = {name: [] for name in decoders}
    differ = 0
    for n, item in enumerate(items):
        found = search.search(item.query, plan.num_passages)
        decoders["new"].prepare(found.passages)  # warm span datastore
        ids = {}
        for name in (["old", "new"] if n % 2 == 0 else ["new", "old"]):
            passages = found.passages if name == "new" else [
                nest_old.types.Passage(id=p.id, text=p.text, title=p.title, score=p.score,
                                       metadata=dict(p.metadata)) for p in found.passages]
            t0 = time.perf_counter()
            res = decoders[name].generate(item.prompt, passages,
                                          max_new_tokens=plan.tokens(args.task))
            rows[name].append((res.stats, time.perf_counter() - t0))
            ids[name] = res.token_ids
        differ += ids["old"] != ids["new"]
    for name, rs in rows.items():
        forwards = sum(st.lm_forwards for st, _ in rs)
        knn = 1000 * sum(st.knn_seconds for st, _ in rs) / forwards
        other = 1000 * sum(st.other_seconds for st, _ in rs) / forwards
        print(f"{name}: overhead {knn + other:.2f} ms/step (kNN {knn:.2f} + other {other:.2f}), "
              f"{forwards / len(rs):.1f} forwards/answer, median s/answer "
              f"{statistics.median(s for _, s in rs):.3f}, to first text "
              f"{statistics.median(st.first_token_seconds for st, _ in rs):.3f} (search "
              f"excluded)")
    print(f"answers with different token ids: {differ} of {len(items)}")


if __name__ == "__main__":
    main()
