"""``nest serve --ray``: the ``nest serve`` app as N Ray Serve replicas behind Ray's proxy.

Each replica is a Ray actor that opens the store by path, loads the model once and builds
the very app of :func:`nest_core.app.serve.create_app` (routes, citations, the 429/503
admission gate, errors, the Host / Content-Type guard, ``/health``, ``/metrics``); Ray's
HTTP proxy listens on ``--host``/``--port`` and hands each request to a replica. Nothing of
the app is reimplemented here: the replica serves the same ASGI app, and adds one response
header, ``X-Nest-Replica`` (the Ray Serve replica id that answered).

Limits stay per replica: each admits ``max_concurrent`` answers and ``max_queue`` waiting,
and refuses past that with 429 as the plain server does (Ray's own per-replica limit is set
above that, so its router never queues a request the replica would refuse). ``/metrics``
and ``/health`` describe the replica that answered.

Without ``address`` a local Ray cluster is started (no dashboard, CPUs bounded to the
replicas') and shut down again on Ctrl-C or SIGTERM; with one (``auto``,
``HOST:6379``, ``ray://HEAD:10001``) the app joins that cluster and is deleted from it on
exit (every node must see the store at the same path). Ray is optional: a missing install
raises an ImportError that names the pip line.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nest_core.app.serve import ServeLimits

logger = logging.getLogger(__name__)

RAY_SERVE_INSTALL = "pip install 'nest-decoding[ray]'"  # ray[serve] >= 2.47, tested with 2.60.0
APP_NAME = "nest"
REPLICA_HEADER = "x-nest-replica"
# Requests past a replica's own capacity that Ray still routes to it (probes, and the one
# request the replica refuses with 429 rather than Ray queueing it unseen).
ROUTING_HEADROOM = 8
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
               "TOKENIZERS_PARALLELISM", "NEST_CACHE_DIR")


@dataclass(frozen=True)
class RayServeOptions:
    """How many replicas, where. ``address``: ``None`` starts a local cluster of
    ``replicas * cpus_per_replica`` CPUs; else the Ray cluster to join.
    ``cpus_per_replica``: CPUs Ray reserves per replica (its torch threads)."""

    replicas: int = 2
    address: str | None = None
    cpus_per_replica: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.cpus_per_replica < 1:
            msg = (f"replicas={self.replicas} and cpus_per_replica={self.cpus_per_replica} "
                   f"must be at least 1")
            raise ValueError(msg)
        if self.address is not None and not self.address.strip():
            msg = "address='' names no cluster: pass 'auto', 'ray://HOST:10001' or None"
            raise ValueError(msg)


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds its service and app from (pickled to the replicas)."""

    store: str  # absolute: a replica's working directory is not the caller's
    k: int
    mode: str
    collection: str | None = None
    embedding: str | None = None
    allow_dangerous_deserialization: bool = False
    dtype: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key: str | None = None
    hosts: frozenset[str] | None = None
    batching: bool = False


def replica_app(spec: ReplicaSpec, replica: str | None = None) -> Any:
    """What one replica serves: the service (store opened, model loaded once) and the
    ``nest serve`` app over it, whose responses name ``replica`` (default: the Ray Serve
    replica id, or ``host:pid`` outside Ray)."""
    from nest_core.app.common import DTYPE, open_service
    from nest_core.app.serve import create_app

    DTYPE["dtype"] = spec.dtype
    service = open_service(
        spec.store, k=spec.k, mode=spec.mode, collection=spec.collection,
        embedding=spec.embedding,
        allow_dangerous_deserialization=spec.allow_dangerous_deserialization,
        batching=spec.batching)
    app = create_app(service, spec.limits, spec.api_key, hosts=spec.hosts)
    app.add_middleware(ReplicaHeader, replica=replica or _replica_id())
    return app


class NestReplica:
    """The deployment's class: Ray Serve builds each replica's app with :func:`replica_app`
    (:func:`deployment`); the class itself holds nothing."""


class ReplicaHeader:
    """Pure ASGI middleware: every response names the replica that sent it."""

    def __init__(self, app: Any, *, replica: str) -> None:
        self.app, self.value = app, replica.encode("latin-1", "replace")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (REPLICA_HEADER.encode(), self.value)]
            await send(message)

        await self.app(scope, receive, named)


def import_serve() -> Any:
    """``ray.serve``, or an ImportError that names the install line."""
    try:
        from ray import serve
    except ImportError as err:
        msg = (f"nest serve --ray needs Ray Serve ({err.name or err} is missing); install it "
               f"with: {RAY_SERVE_INSTALL}")
        raise ImportError(msg) from err
    return serve


def deployment(spec: ReplicaSpec, opts: RayServeOptions) -> Any:
    """The bound Ray Serve application: ``opts.replicas`` replicas of :class:`NestReplica`."""
    serve = import_serve()
    limits = spec.limits

    def build() -> Any:  # called on each replica as it starts (Ray >= 2.47)
        return replica_app(spec)

    ingress = serve.ingress(build)(NestReplica)
    return serve.deployment(
        ingress, name="NestReplica", num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.cpus_per_replica},
        max_ongoing_requests=limits.max_concurrent + limits.max_queue + ROUTING_HEADROOM,
        max_constructor_retry_count=1, graceful_shutdown_timeout_s=5,
    ).bind()


def run_on_ray(spec: ReplicaSpec, opts: RayServeOptions, *, host: str = "127.0.0.1",
               port: int = 8000, on_ready: Any = None) -> None:
    """Serve ``spec`` on Ray Serve until Ctrl-C or SIGTERM, then take it all down: the app,
    and the local cluster when this call started it. ``on_ready(replicas)`` is called with
    the number of running replicas once every one of them answers."""
    import ray

    serve = import_serve()
    spec = _absolute(spec)
    started = not ray.is_initialized()
    if started and opts.address is None:
        _check_port_free(host, port)
    if started:
        _init(ray, opts)
    if not logger.isEnabledFor(logging.DEBUG):  # "Started Serve", "Connecting to existing..."
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop = _SigtermAsInterrupt()
    try:
        with stop:
            serve.start(http_options={"host": host, "port": port},
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
            serve.run(deployment(spec, opts), name=APP_NAME, route_prefix="/")
            if on_ready is not None:
                on_ready(running_replicas(serve))
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        logger.info("stopping the Ray Serve app")
    finally:
        with _SigtermAsInterrupt(ignore=True):  # a second signal must not cut the cleanup
            _take_down(ray, serve, local=started and opts.address is None, started=started)


def running_replicas(serve: Any) -> int:
    """Replicas of this app that Ray Serve reports as RUNNING."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def _take_down(ray: Any, serve: Any, *, local: bool, started: bool) -> None:
    try:
        if local:
            serve.shutdown()
        else:  # a shared cluster: only this app goes; Serve and its other apps stay
            serve.delete(APP_NAME)
    except Exception:  # the cluster may already be gone
        logger.debug("Ray Serve cleanup failed", exc_info=True)
    if started:
        ray.shutdown()


def _init(ray: Any, opts: RayServeOptions) -> None:
    quiet = {"logging_level": logging.ERROR, "include_dashboard": False}
    if opts.address is None:
        # A new local cluster ("local": never one a `ray start` left running here), bounded
        # to the replicas' CPUs (Ray would take every core); its workers inherit this
        # process's environment (HF_HUB_OFFLINE, NEST_CACHE_DIR).
        ray.init(address="local", num_cpus=opts.replicas * opts.cpus_per_replica, **quiet)
        return
    from nest_core.stores.ray_index import _probe

    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    try:
        _probe(opts.address)
        ray.init(address=opts.address, runtime_env={"env_vars": env} if env else None,
                 logging_level=logging.ERROR)
    except ConnectionError as err:
        msg = (f"cannot reach the Ray cluster at --ray-address {opts.address} ({err}); start "
               f"one with `ray start --head` (then use 'auto'), use ray://HEAD:10001, or drop "
               f"--ray-address for a local cluster")
        raise ConnectionError(msg) from err


def _absolute(spec: ReplicaSpec) -> ReplicaSpec:
    from dataclasses import replace

    return replace(spec, store=str(Path(spec.store).expanduser().resolve()))


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting Ray when the proxy could not listen (Ray would retry it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            msg = f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port"
            raise OSError(msg) from err


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (tests building it in-process)
        return f"{socket.gethostname()}:{os.getpid()}"


class _SigtermAsInterrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the app and
    the cluster are taken down (Ray's own driver handler would exit at once);
    ``ignore=True``: SIGTERM and SIGINT are ignored instead. Restored after."""

    def __init__(self, ignore: bool = False) -> None:
        self.ignore = ignore
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _SigtermAsInterrupt:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        signals = (signal.SIGTERM, signal.SIGINT) if self.ignore else (signal.SIGTERM,)
        for sig in signals:
            self.saved[sig] = signal.getsignal(sig)
            signal.signal(sig, signal.SIG_IGN if self.ignore else _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
