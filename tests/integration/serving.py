"""What the server tests share (not a test file): the two-file handbook store built with
``nest index``, and a burst of simultaneous requests past a server's capacity."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_cli import HANDBOOK, POLICY


def index_handbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FAISS store of the handbook's two files, written by ``nest index``."""
    from nest_core.app.cli import main

    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "history.md").write_text(HANDBOOK, encoding="utf-8")
    (corpus / "policy.txt").write_text(POLICY, encoding="utf-8")
    out = tmp_path_factory.mktemp("stores") / "faiss"
    assert main(["index", str(corpus), "--out", str(out), "-q"]) == 0
    return out


def burst(url: str, body: dict[str, Any], n: int) -> tuple[list[int], list[str]]:
    """``n`` chat requests released at once: every status, and the 200s' answers. A refusal
    must be the capacity one (429 ``queue_full`` with ``Retry-After: 1``)."""
    statuses: list[int] = []
    answers: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def call() -> None:
        start.wait()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 200:
                answers.append(r.json()["choices"][0]["message"]["content"])
            else:
                assert r.json()["error"]["code"] == "queue_full"
                assert r.headers["retry-after"] == "1"

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == n
    return statuses, answers
