"""The ``nest`` command: index files, ask questions with attribution, run the demo.

Everything a user sees goes to stdout (answers, JSON); progress and errors go to stderr, so
``nest ask ... --json | jq`` works. Expected failures (no store, no files, no passages, a
missing extra) end with one ``nest: error: ...`` line that names the fix and exit code 1;
a traceback appears only with ``--debug``. Heavy imports (torch, transformers, chromadb)
happen inside the commands, so ``nest --help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nest_core.app.common import (
    DEFAULT_K,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PRESET,
    DTYPE,
    PRESET_HELP,
    PRESETS,
    STORE_KINDS,
    answer,
    build_store,
    detect_store,
    load_quietly,
    note,
    open_service,
    open_source,
    precompute_existing,
)
from nest_core.app.files import (
    MAX_K,
    CliError,
    check_writable,
    collect_files,
    color_option,
    dtype_option,
    new_tokens,
    passage_count,
    positive,
    read_documents,
    split_title,
    store_options,
)
from nest_core.app.render import render_comparison, render_html, render_terminal, use_color
from nest_core.app.safe_text import json_text, printable

logger = logging.getLogger(__name__)

__all__ = ["CliError", "build_parser", "collect_files", "main", "read_documents",
           "split_title"]


# --- commands --------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    if args.from_store:
        return index_existing(args)
    if not args.paths or not args.out:
        msg = ("name the files to index and the store to write: nest index PATH... --out DIR "
               "(or precompute an existing store: nest index --from-store DIR)")
        raise CliError(msg)
    if args.collection and args.store != "chroma":
        msg = f"--collection {args.collection} applies to --store chroma"
        raise CliError(msg)
    from nest_core.stores.roots import assign_ids, remove_if_only_roots

    out = Path(args.out).expanduser()
    folders = [Path(p).expanduser() for p in args.paths if Path(p).expanduser().is_dir()]
    found, existed = collect_files(args.paths), out.exists()
    # ids relative to the folders the store records: two folders named notes never collide
    files, prefixes = assign_ids(out, found, folders)
    try:
        return _index_files(args, files, prefixes)
    except BaseException:
        if not existed:
            remove_if_only_roots(out)
        raise


def _index_files(args: argparse.Namespace, files: list[tuple[Path, str]],
                 prefixes: list[str]) -> int:
    embed = None
    if args.embedding:
        from nest_core.stores.embeddings import load_embedding

        embed = load_embedding(args.embedding)
    ray = ray_options(args)
    note(f"indexing {len(files)} file(s) into a {args.store} store at {args.out}")
    report = build_store(files, args.out, args.store, precompute=not args.no_precompute,
                         progress=not args.quiet, embed=embed, collection=args.collection,
                         complete_prefixes=prefixes, ray=ray)
    note(f"done: {report.passages} passages from {report.documents} file(s) "
          f"({report.written} new, {report.unchanged} unchanged, {report.removed} removed); "
          f"ask with: nest ask \"your question\" --store {args.out}")
    return 0


def index_existing(args: argparse.Namespace) -> int:
    """``nest index --from-store DIR``: the span datastore of a store nest did not write."""
    if args.paths or args.out:
        msg = "--from-store DIR reads the store at DIR: give no PATH or --out with it"
        raise CliError(msg)
    if args.no_precompute:
        msg = "--from-store only precomputes the span datastore; drop --no-precompute"
        raise CliError(msg)
    passages, rows, where = precompute_existing(
        args.from_store, collection=args.collection, progress=not args.quiet,
        allow_dangerous_deserialization=args.allow_dangerous_deserialization,
        ray=ray_options(args))
    note(f"done: {passages} passages encoded ({rows} key rows) into the span datastore at "
          f"{where}; ask with: nest ask \"your question\" --store {args.from_store}")
    return 0


def ray_options(args: argparse.Namespace) -> Any:
    """``--ray [--ray-workers N] [--ray-address ADDR]`` as RayOptions (``None`` without
    ``--ray``); Ray is imported here, so a missing install fails before any model loads."""
    if not args.ray:
        if args.ray_workers is not None or args.ray_address is not None:
            msg = "--ray-workers and --ray-address apply with --ray; add --ray"
            raise CliError(msg)
        return None
    if args.no_precompute:
        msg = "--ray encodes the span datastore, which --no-precompute skips; drop one"
        raise CliError(msg)
    from nest_core.stores.ray_index import RayOptions, import_ray

    import_ray()
    return RayOptions(workers=args.ray_workers or 2, address=args.ray_address)


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        msg = "the question is empty; pass it in quotes: nest ask \"...\" --store DIR"
        raise CliError(msg)
    detect_store(args.store, args.collection)  # fail before loading anything heavy
    if args.html:
        check_writable(Path(args.html).expanduser())
    result, base = answer(args.question, args.store, k=args.k,
                          max_new_tokens=args.max_new_tokens, compare=args.compare,
                          mode=args.mode, collection=args.collection, embedding=args.embedding,
                          allow_dangerous_deserialization=args.allow_dangerous_deserialization)
    if args.html:
        page = render_html(result, question=args.question, baseline=base)
        Path(args.html).expanduser().write_text(page, encoding="utf-8")
        note(f"wrote {args.html}")
    if args.json:
        doc: dict[str, Any] = {"question": args.question, "mode": args.mode,
                               "nest": result.to_dict()}
        if base is not None:
            doc["base"] = base.to_dict()
        print(json_text(doc, indent=2))
        return 0
    color = _color(args.color)
    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    if base is not None:
        print(render_comparison(base, result, color=color, width=width))
    else:
        print(render_terminal(result, color=color, width=width))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nest_core.app.serve import ServeLimits, run

    concurrent = args.max_concurrent or (BATCHED_CONCURRENT if args.batching else 2)
    limits = ServeLimits(max_concurrent=concurrent, max_queue=args.max_queue,
                         max_tokens=args.max_tokens_limit)
    if args.ray or args.replicas is not None or args.ray_address is not None:
        return serve_on_ray(args, limits)
    service = _service(args)
    note(f"serving {args.store} at http://{args.host}:{args.port}/v1 (model "
         f"{' or '.join(repr(m) for m in service.model_ids)}; {limits.max_concurrent} "
         f"answering, {limits.max_queue} queued); Ctrl-C stops")
    run(service, host=args.host, port=args.port, limits=limits,
        api_key=args.api_key or os.environ.get("NEST_API_KEY") or None,
        allowed=args.allowed_host)
    return 0


def serve_on_ray(args: argparse.Namespace, limits: Any) -> int:
    """``nest serve --ray [--replicas N] [--ray-address ADDR]``: the same app as N Ray Serve
    replicas behind Ray's proxy (:mod:`~nest_core.app.ray_serve`)."""
    if not args.ray:
        msg = "--replicas and --ray-address apply with --ray; add --ray"
        raise CliError(msg)
    from nest_core.app.guard import LOOPBACK_NAMES, allowed_hosts
    from nest_core.app.ray_serve import RayServeOptions, ReplicaSpec, import_serve, run_on_ray

    import_serve()  # a missing install fails before anything starts
    detect_store(args.store, args.collection)
    opts = RayServeOptions(replicas=args.replicas or 2, address=args.ray_address)
    api_key = args.api_key or os.environ.get("NEST_API_KEY") or None
    if args.host not in LOOPBACK_NAMES and not api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this port can "
                       "query your documents", args.host)
    spec = ReplicaSpec(store=args.store, k=args.k, mode=args.mode, collection=args.collection,
                       embedding=args.embedding,
                       allow_dangerous_deserialization=args.allow_dangerous_deserialization,
                       dtype=args.dtype, limits=limits, api_key=api_key, batching=args.batching,
                       hosts=allowed_hosts(args.host, args.allowed_host))
    note(f"starting {opts.replicas} Ray Serve replica(s) over {args.store} "
         f"({'a local Ray cluster' if opts.address is None else opts.address}) ...")

    def ready(running: int) -> None:
        note(f"serving {args.store} at http://{args.host}:{args.port}/v1 on Ray Serve: "
             f"{running} replica(s) running, each {limits.max_concurrent} answering, "
             f"{limits.max_queue} queued; Ctrl-C stops")

    run_on_ray(spec, opts, host=args.host, port=args.port, on_ready=ready)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from nest_core.app.mcp_server import run

    run(_service(args))
    return 0


def _service(args: argparse.Namespace) -> Any:
    return open_service(args.store, k=args.k, mode=args.mode, collection=args.collection,
                        embedding=args.embedding,
                        allow_dangerous_deserialization=args.allow_dangerous_deserialization,
                        batching=getattr(args, "batching", False))


def cmd_demo(args: argparse.Namespace) -> int:
    from nest_core.app.demo import run_demo

    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    return run_demo(store_kind=args.store, max_new_tokens=args.max_new_tokens, mode=args.mode,
                    color=_color(args.color), width=width, rebuild=args.rebuild)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the answer settings on the user's questions over their store and record them
    for the model (:mod:`nest_core.calibration`)."""
    from nest_core import NestDecoder
    from nest_core.calibration import calibrate, load_questions, save_settings
    from nest_core.config import default_config
    from nest_core.grounding import relevance
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.embeddings import default_embedding_function
    from nest_core.stores.sources.open import span_datastore_dir

    try:
        questions = load_questions(Path(args.questions).expanduser())
    except ValueError as e:
        raise CliError(str(e)) from e
    detect_store(args.store, args.collection)
    source = open_source(args.store, collection=args.collection, embedding=args.embedding,
                         allow_dangerous_deserialization=args.allow_dangerous_deserialization)
    lm = load_quietly()
    embed = default_embedding_function()
    key_cache = SpanDatastore(span_datastore_dir(args.store))
    note(f"calibrating {lm.name} on {len(questions)} question(s) ...")

    def answer(question: str, passages: list[Any], overrides: dict[str, Any]) -> Any:
        decoder = NestDecoder(lm, default_config(lm.name, **overrides), key_cache=key_cache,
                              embed=embed)
        return decoder.generate(question, passages, max_new_tokens=args.max_new_tokens)

    found = calibrate(answer, lambda q: source.retrieve(q, args.k),
                      lambda q, ps: relevance(q, ps, embed), questions)
    print(found.table())
    if args.dry_run:
        return 0
    path = save_settings(lm.name, found)
    note(f"wrote {found.settings} for {lm.name} to {path}: every surface now uses them "
         f"with this model (set NEST_ANSWER_SETTINGS='' to turn them off)")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from nest_core.app.demo import demo_dir
    from nest_core.stores.datastore import clear_cache, default_datastore_dir

    if args.store:
        detect_store(args.store)
        removed = clear_cache(args.store)
        note(f"removed {removed} span file(s) from {args.store}")
        return 0
    removed = clear_cache()
    note(f"removed {removed} span file(s) from {default_datastore_dir()}")
    if demo_dir().exists():
        shutil.rmtree(demo_dir())
        note(f"removed the demo store {demo_dir()}")
    return 0


MAX_PORT = 65535
BATCHED_CONCURRENT = 8  # `nest serve` answers decoding at once, their forwards batched


# --- plumbing --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nest", description="Nearest Neighbor Speculative Decoding: answers that copy "
        "from your documents and say where each copied span came from.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("index", help="chunk, embed and store text/markdown files")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders to index")
    p.add_argument("--store", choices=STORE_KINDS, default="faiss", help="vector store kind")
    p.add_argument("--out", metavar="DIR", help="where to write the store")
    p.add_argument("--from-store", metavar="DIR",
                   help="instead of indexing files, precompute the span datastore of an "
                   "existing store (LangChain/LlamaIndex-written ones too)")
    p.add_argument("--no-precompute", action="store_true",
                   help="skip the span datastore (the first questions will be slower)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ray", action="store_true",
                   help="encode the span datastore on Ray workers (same files; needs "
                   "`pip install \"ray[data]\"`): a local cluster unless --ray-address")
    p.add_argument("--ray-workers", type=positive, metavar="N",
                   help="Ray workers, each holding the model on one CPU (default 2)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="an existing Ray cluster: auto (this machine ran `ray start`) or "
                   "ray://HEAD:10001")
    store_options(p)
    dtype_option(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("ask", help="answer a question from a store, with attribution")
    p.add_argument("question")
    p.add_argument("--store", required=True, metavar="DIR",
                   help="a store from `nest index`, LangChain or LlamaIndex")
    store_options(p)
    p.add_argument("--compare", action="store_true", help="also show the plain model's answer")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (copied `spans`, matched `matches`)")
    p.add_argument("--html", metavar="FILE", help="write a page linking spans to passages")
    p.add_argument("--k", type=passage_count, default=DEFAULT_K,
                   help=f"passages to retrieve (1-{MAX_K})")
    p.add_argument("--max-new-tokens", type=new_tokens, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--mode", choices=PRESETS, default=DEFAULT_PRESET, help=PRESET_HELP)
    color_option(p)
    dtype_option(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a store")
    _service_options(p)
    p.add_argument("--host", default="127.0.0.1", help="interface (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (1-65535)")
    p.add_argument("--max-concurrent", type=positive, default=None,
                   help="answers decoded at once (default 2; 8 with --batching)")
    p.add_argument("--batching", action="store_true",
                   help="run the concurrent answers' forwards together, in shared model calls "
                   "(pays with --dtype bfloat16 on a CPU with AVX512-BF16, or with long "
                   "answers: the paper's --mode nest; see docs/scaling.md)")
    p.add_argument("--max-queue", type=non_negative, default=8,
                   help="requests waiting beyond those; more get 429")
    p.add_argument("--max-tokens-limit", type=new_tokens, default=512,
                   help="most tokens a request may ask for")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or set NEST_API_KEY)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests sent to this Host name (repeatable; besides "
                   "--host, the loopback names and IP addresses; '*': any, behind a gateway "
                   "that checks it). Others get 400: DNS rebinding protection")
    p.add_argument("--ray", action="store_true",
                   help="serve N replicas of this app on Ray Serve behind Ray's proxy (needs "
                   "`pip install 'nest-decoding[ray]'`): a local cluster unless --ray-address")
    p.add_argument("--replicas", type=positive, metavar="N",
                   help="Ray Serve replicas, each loading the model once on one CPU "
                   "(default 2)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="an existing Ray cluster: auto (this machine ran `ray start`) or "
                   "ray://HEAD:10001; every node must see --store at the same path")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mcp", help="an MCP server (stdio) with the tools ask and search")
    _service_options(p)
    p.set_defaults(func=cmd_mcp)

    p = sub.add_parser("demo", help="plain model vs Nest on a sample company handbook")
    p.add_argument("--store", choices=STORE_KINDS, default="faiss")
    p.add_argument("--max-new-tokens", type=new_tokens, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--mode", choices=PRESETS, default=DEFAULT_PRESET, help=PRESET_HELP)
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo store")
    color_option(p)
    dtype_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="measure the answer settings on your own questions")
    p.add_argument("questions", metavar="QUESTIONS.json",
                   help='a JSON list of {"question": "...", "answers": ["..."]} '
                        '(answers [] for a question the documents do not answer)')
    p.add_argument("--store", required=True, metavar="DIR",
                   help="a store from `nest index`, LangChain or LlamaIndex")
    store_options(p)
    p.add_argument("--k", type=passage_count, default=DEFAULT_K,
                   help=f"passages to retrieve (1-{MAX_K})")
    p.add_argument("--max-new-tokens", type=new_tokens, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--dry-run", action="store_true", help="print the table, record nothing")
    dtype_option(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("cache", help="manage cached span datastores")
    cache = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    c = cache.add_parser("clear", help="delete cached span datastores (rebuilt on demand)")
    c.add_argument("--store", metavar="DIR", help="clear the datastore inside this store only")
    c.set_defaults(func=cmd_cache_clear)
    return parser


def _service_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="DIR",
                   help="a store from `nest index`, LangChain or LlamaIndex")
    store_options(p)
    p.add_argument("--k", type=passage_count, default=DEFAULT_K,
                   help=f"passages to retrieve per question (1-{MAX_K})")
    p.add_argument("--mode", choices=PRESETS, default=DEFAULT_PRESET, help=PRESET_HELP)
    dtype_option(p)


def port_number(text: str) -> int:
    """``--port``: a TCP port a server can listen on and announce (0, "any free port",
    would announce a port nobody can find)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_PORT:
        msg = f"{text!r} is not a TCP port; use 1-{MAX_PORT}"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"{text!r} is not a whole number >= 0"
        raise argparse.ArgumentTypeError(msg)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    DTYPE["dtype"] = getattr(args, "dtype", None)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("nest: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        hint = "" if _expected(err) else " (run with --debug for the traceback)"
        print(printable(f"nest: error: {err}{hint}"), file=sys.stderr)
        return 1


def _expected(err: Exception) -> bool:
    from nest_core.stores.embeddings import EmbeddingDimensionError, EmbeddingMismatchError
    from nest_core.stores.sources.base import EmptyStoreError, UnsafeStoreError

    return isinstance(err, (CliError, EmptyStoreError, FileNotFoundError, ImportError,
                            ConnectionError, FileExistsError, EmbeddingDimensionError,
                            EmbeddingMismatchError, UnsafeStoreError))


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="nest: %(levelname)s: %(message)s")
    if not debug:
        for noisy in ("transformers", "sentence_transformers", "chromadb", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _color(choice: str) -> bool:
    return {"always": True, "never": False}.get(choice, use_color(sys.stdout))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
