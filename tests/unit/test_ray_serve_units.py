"""nest_core.app.ray_serve without a Ray cluster: argument checks, the missing-install error,
the replica header, the port check, SIGTERM as Ctrl-C. The real replicas behind Ray's proxy:
tests/integration/test_ray_serve.py."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from nest_core.app import ray_serve
from nest_core.app.cli import main
from nest_core.app.ray_serve import (
    RAY_SERVE_INSTALL,
    REPLICA_HEADER,
    RayServeOptions,
    ReplicaHeader,
    ReplicaSpec,
    import_serve,
    running_replicas,
)


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"replicas": -1},
                                    {"cpus_per_replica": 0}, {"address": " "}])
def test_options_refuse_what_cannot_run(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"at least 1|names no cluster"):
        RayServeOptions(**kwargs)  # type: ignore[arg-type]


def test_options_default_to_two_local_replicas() -> None:
    assert RayServeOptions() == RayServeOptions(replicas=2, address=None, cpus_per_replica=1)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_replicas_must_be_positive(value: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--store", str(tmp_path), "--ray", "--replicas", value])
    assert exit_.value.code == 2
    assert "is not a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--replicas", "2"], ["--ray-address", "auto"]])
def test_cli_ray_options_need_ray(extra: list[str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--store", str(tmp_path), *extra]) == 1
    assert "apply with --ray; add --ray" in capsys.readouterr().err


def test_missing_ray_serve_names_the_install_line(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"needs Ray Serve .*pip install 'nest-decoding\[ray\]'"):
        import_serve()
    assert main(["serve", "--store", str(tmp_path), "--ray"]) == 1
    err = capsys.readouterr().err
    assert RAY_SERVE_INSTALL in err
    assert "--debug" not in err  # an expected failure: one line, no traceback hint


def test_the_store_is_checked_before_ray_starts(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray.serve")
    assert main(["serve", "--store", str(tmp_path / "nothing"), "--ray"]) == 1
    assert "nest: error:" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()


def test_a_busy_port_fails_before_ray_starts() -> None:
    pytest.importorskip("ray.serve")
    import ray

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = ReplicaSpec(store=".", k=8, mode="default")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
            ray_serve.run_on_ray(spec, RayServeOptions(), host="127.0.0.1", port=port)
    assert not ray.is_initialized()


def test_every_response_names_its_replica() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/x")
    async def x() -> dict[str, int]:
        return {"ok": 1}

    app.add_middleware(ReplicaHeader, replica="abc123")
    with TestClient(app) as client:  # the lifespan passes through untouched
        r = client.get("/x")
        missing = client.get("/nowhere")
    assert (r.status_code, r.json(), r.headers[REPLICA_HEADER]) == (200, {"ok": 1}, "abc123")
    assert r.headers["content-type"] == "application/json"
    assert missing.status_code == 404
    assert missing.headers[REPLICA_HEADER] == "abc123"


def test_the_store_path_is_made_absolute_for_the_replicas(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.chdir(tmp_path)
    spec = ray_serve._absolute(ReplicaSpec(store="store", k=8, mode="default"))
    assert spec.store == str(tmp_path.resolve() / "store")


def test_running_replicas_counts_this_apps_running_ones() -> None:
    def status(apps: dict[str, object]) -> SimpleNamespace:
        return SimpleNamespace(status=lambda: SimpleNamespace(applications=apps))

    app = SimpleNamespace(deployments={
        "NestReplica": SimpleNamespace(replica_states={"RUNNING": 2, "STARTING": 1})})
    assert running_replicas(status({"nest": app})) == 2
    assert running_replicas(status({})) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_acts_as_ctrl_c_inside_the_block_only() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with ray_serve._SigtermAsInterrupt(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    with ray_serve._SigtermAsInterrupt(ignore=True):
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is before
