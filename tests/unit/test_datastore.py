"""SpanDatastore: exact round trips, doubt means a miss, atomic writes, LRU eviction, clearing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from nest_core.encoding import EncodedPassage, PassageEncoder
from nest_core.lm import LanguageModel
from nest_core.stores.datastore import (
    DATASTORE_DIRNAME,
    SpanDatastore,
    clear_cache,
    datastore_dir_for,
    decode_entry,
    encode_entry,
)
from nest_core.types import Passage


def _entry(rows: int = 5, dim: int = 8, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> EncodedPassage:
    g = torch.Generator().manual_seed(seed)
    return EncodedPassage(keys=torch.randn(rows, dim, generator=g).to(dtype),
                          values=torch.randint(0, 50_000, (rows,), generator=g),
                          char_spans=torch.randint(-1, 900, (rows, 2), generator=g,
                                                   dtype=torch.int32))


def _assert_same(a: EncodedPassage, b: EncodedPassage) -> None:
    assert a.keys.dtype == b.keys.dtype
    assert torch.equal(a.keys, b.keys)
    assert b.values.dtype == torch.long
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.char_spans, b.char_spans)


class _CountingForwards:
    """Counts real forwards of the LM body (a torch pre-hook, not a mock: passage encoding
    stops at the key layer, so the body never returns and a forward hook would not fire)."""

    def __init__(self, lm: LanguageModel) -> None:
        self.calls = 0
        self._handle = lm.model.base_model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def counting(tiny_lm):
    counter = _CountingForwards(tiny_lm)
    yield counter
    counter.close()


PASSAGES = [
    Passage(id="a", text="The Zephyr Widget Company was founded in 1987.", title="Zephyr"),
    Passage(id="b", text="A compiler translates source code into machine code."),
    Passage(id="c", text="Chroma and FAISS store vectors."),
]


def test_round_trip_converts_keys_to_float16_by_default(tmp_path):
    store = SpanDatastore(tmp_path, memory_bytes=0)
    value = _entry()
    store.put("k", value)
    got = SpanDatastore(tmp_path).get("k")
    assert got is not None
    assert got.keys.dtype == torch.float16
    assert torch.equal(got.keys, value.keys.half())
    assert torch.equal(got.values, value.values)
    assert torch.equal(got.char_spans, value.char_spans)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_keeps_dtype_when_key_dtype_is_none(tmp_path, dtype):
    store = SpanDatastore(tmp_path, key_dtype=None, memory_bytes=0)
    value = _entry(dtype=dtype)
    store.put("k", value)
    got = SpanDatastore(tmp_path, key_dtype=None).get("k")
    assert got is not None
    _assert_same(value, got)


def test_empty_passage_round_trips(tmp_path):
    store = SpanDatastore(tmp_path, memory_bytes=0)
    value = EncodedPassage(keys=torch.zeros(0, 8, dtype=torch.float16),
                           values=torch.zeros(0, dtype=torch.long),
                           char_spans=torch.zeros(0, 2, dtype=torch.int32))
    store.put("empty", value)
    got = store.get("empty")
    assert got is not None
    assert got.keys.shape == (0, 8)
    assert got.num_rows == 0


def test_memory_then_disk_then_miss_are_counted(tmp_path):
    store = SpanDatastore(tmp_path)
    store.put("k", _entry())
    assert store.get("k") is not None
    assert store.get("absent") is None
    fresh = SpanDatastore(tmp_path)
    assert fresh.get("k") is not None
    assert fresh.get("k") is not None
    assert (store.stats.memory_hits, store.stats.misses) == (1, 1)
    assert (fresh.stats.disk_hits, fresh.stats.memory_hits) == (1, 1)
    assert "k" in fresh
    assert len(fresh) == 1


def test_file_of_another_key_is_a_miss(tmp_path):
    store = SpanDatastore(tmp_path, memory_bytes=0)
    store.put("model-A", _entry())
    src, dst = store._file("model-A"), store._file("model-B")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    assert store.get("model-B") is None
    assert store.stats.invalid == 1
    assert store.get("model-A") is not None


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage", "edit_header",
                                    "empty"])
def test_corrupted_file_is_a_miss_and_rebuilt_by_put(tmp_path, damage):
    store = SpanDatastore(tmp_path, memory_bytes=0)
    value = _entry(rows=12)
    store.put("k", value)
    path = store._file("k")
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[-7] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "garbage":
        data = bytearray(b"\x00" * len(data))
    elif damage == "edit_header":
        data = bytearray(bytes(data).replace(b'"rows": 12', b'"rows": 11'))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.get("k") is None
    assert store.stats.invalid == 1
    store.put("k", value)
    got = store.get("k")
    assert got is not None
    _assert_same(EncodedPassage(value.keys.half(), value.values, value.char_spans), got)


def test_decode_entry_rejects_what_encode_entry_did_not_write():
    data = encode_entry("k", _entry(dtype=torch.float16))
    _assert_same(_entry(dtype=torch.float16), decode_entry(data, "k"))
    with pytest.raises(ValueError, match="another cache key"):
        decode_entry(data, "other")
    with pytest.raises(ValueError, match="not a span file"):
        decode_entry(b"PICKLE!!" + data[8:], "k")


def test_eviction_removes_least_recently_used_files(tmp_path):
    one = len(encode_entry("k0", _entry(dtype=torch.float16)))
    store = SpanDatastore(tmp_path, max_disk_bytes=int(one * 3.5), memory_bytes=0)
    for i in range(3):
        store.put(f"k{i}", _entry(seed=i))
        os.utime(store._file(f"k{i}"), (1_000 + i, 1_000 + i))  # k0 oldest
    assert store.get("k0") is not None  # reading k0 makes it the most recent
    store.put("k3", _entry(seed=3))  # 4 files > 3.5: evict down to 90% (3 files) -> k1 goes
    assert store.stats.evicted_files == 1
    assert [f"k{i}" in store for i in range(4)] == [True, False, True, True]
    assert store.disk_usage() <= store.max_disk_bytes


def test_clear_and_clear_cache(tmp_path):
    store = SpanDatastore.for_store(tmp_path)
    assert store.path == tmp_path / DATASTORE_DIRNAME == datastore_dir_for(tmp_path)
    for i in range(3):
        store.put(f"k{i}", _entry(seed=i))
    assert store.clear() == 3
    assert store.get("k0") is None  # memory LRU cleared too
    assert store.disk_usage() == 0
    store.put("k", _entry())
    assert clear_cache(tmp_path) == 1  # a vector-store dir finds its nest_spans inside
    assert len(SpanDatastore(store.path)) == 0
    assert clear_cache(tmp_path / "missing") == 0


def test_clear_cache_default_dir_honours_nest_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NEST_CACHE_DIR", str(tmp_path))
    store = SpanDatastore()
    assert store.path == tmp_path / "spans"
    store.put("k", _entry())
    assert clear_cache() == 1


def test_no_pickle_in_files(tmp_path):
    store = SpanDatastore(tmp_path)
    store.put("k", _entry())
    data = store._file("k").read_bytes()
    assert data.startswith(b"NESTSPAN")
    assert b"\x80\x04\x95" not in data[:64]  # no pickle protocol-4 frame


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="max_disk_bytes"):
        SpanDatastore(tmp_path, max_disk_bytes=0)
    with pytest.raises(ValueError, match="key_dtype"):
        SpanDatastore(tmp_path, key_dtype=torch.int8)


def test_concurrent_readers_and_a_writer_see_whole_values(tmp_path):
    writer = SpanDatastore(tmp_path, memory_bytes=0)
    versions = [_entry(rows=64, dim=64, seed=s, dtype=torch.float16) for s in (1, 2)]
    writer.put("k", versions[0])
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        reader = SpanDatastore(tmp_path, memory_bytes=0)
        try:
            while not stop.is_set():
                got = reader.get("k")
                assert got is not None
                seen.append(next(i for i, v in enumerate(versions)
                                 if torch.equal(v.keys, got.keys)
                                 and torch.equal(v.values, got.values)))
                assert reader.stats.invalid == 0
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(60):
        writer.put("k", versions[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen
    assert not list(Path(writer.path).glob("*/.tmp-*"))


def test_encoder_reads_datastore_instead_of_running_the_lm(tiny_lm, tmp_path, counting):
    first = PassageEncoder(tiny_lm, cache=SpanDatastore(tmp_path)).encode(PASSAGES)
    assert counting.calls == 1  # one padded batch
    store = SpanDatastore(tmp_path)  # a new process would start like this
    again = PassageEncoder(tiny_lm, cache=store).encode(PASSAGES)
    assert counting.calls == 1
    assert store.stats.disk_hits == len(PASSAGES)
    for a, b in zip(first, again, strict=True):
        _assert_same(a, b)


def test_layer_or_window_change_misses_and_rebuilds(tiny_lm, tmp_path, counting):
    store = SpanDatastore(tmp_path)
    PassageEncoder(tiny_lm, key_layer=-2, cache=store).encode(PASSAGES)
    other_layer = PassageEncoder(tiny_lm, key_layer=-1, cache=store).encode(PASSAGES)
    other_window = PassageEncoder(tiny_lm, max_passage_tokens=8, cache=store).encode(PASSAGES)
    assert counting.calls >= 3
    reference = PassageEncoder(tiny_lm, key_layer=-1).encode(PASSAGES)
    for a, b in zip(reference, other_layer, strict=True):
        _assert_same(a, b)
    assert [e.num_rows for e in other_window] == [e.num_rows for e in reference]
    assert len(store) == 3 * len(PASSAGES)


def test_other_model_weights_miss(tiny_lm, tmp_path):
    from conftest import make_tiny_model

    other = LanguageModel(make_tiny_model(len(tiny_lm.tokenizer), seed=1), tiny_lm.tokenizer,
                          name="tiny-llama")  # same name, other weights
    store = SpanDatastore(tmp_path)
    mine = PassageEncoder(tiny_lm, cache=store).encode(PASSAGES[:1])[0]
    theirs = PassageEncoder(other, cache=store).encode(PASSAGES[:1])[0]
    assert store.stats.writes == 2
    assert not torch.equal(mine.keys, theirs.keys)
    expected = PassageEncoder(other).encode(PASSAGES[:1])[0]
    _assert_same(expected, theirs)


def test_a_change_deep_in_the_weights_changes_the_fingerprint(tiny_lm, tmp_path):
    # caught: a fingerprint from a sample of the first tensors (issue 14, case 2: a model
    # with layers 10+ scaled was served the original model's keys)
    import copy

    changed = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        changed.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    other = LanguageModel(changed, tiny_lm.tokenizer, name=tiny_lm.name)
    same = LanguageModel(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, name=tiny_lm.name)
    assert other.fingerprint != tiny_lm.fingerprint
    assert same.fingerprint == tiny_lm.fingerprint
    store = SpanDatastore(tmp_path)
    PassageEncoder(tiny_lm, cache=store).encode(PASSAGES[:1])
    PassageEncoder(other, cache=store).encode(PASSAGES[:1])
    assert store.stats.writes == 2  # the changed model's keys were encoded, not reused


# --- read-only stores (issue 14, case 1) -----------------------------------------------------
def _read_only_os(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """What a read-only mount does to writes under ``root`` (as root, chmod cannot): every
    write-side call there raises the OS's own error; reads are untouched."""
    import tempfile

    real_utime, real_mkstemp = os.utime, tempfile.mkstemp

    def refuse(path: object) -> None:
        if str(path).startswith(str(root)):
            raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(os, "utime", lambda p, *a, **k: refuse(p) or real_utime(p, *a, **k))
    monkeypatch.setattr(tempfile, "mkstemp",
                        lambda *a, **k: refuse(k.get("dir", "")) or real_mkstemp(*a, **k))


def test_a_read_only_store_is_served_and_never_written(tmp_path, monkeypatch, caplog):
    # caught: _touch only ignoring FileNotFoundError; put raising on a read-only directory
    SpanDatastore(tmp_path).put("k", _entry())
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    _read_only_os(monkeypatch, tmp_path)
    store = SpanDatastore(tmp_path)
    _assert_same(SpanDatastore(tmp_path, key_dtype=None).get("k"), store.get("k"))
    with caplog.at_level("WARNING"):
        store.put("new", _entry(seed=1))
        store.put("newer", _entry(seed=2))
    assert store.stats.unwritable == 2
    assert sum("not writable" in r.message for r in caplog.records) == 1  # warned once
    _assert_same(store._convert(_entry(seed=1)), store.get("new"))  # kept in memory
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


# Run in a child process as the current user or, when that is root (which ignores file
# permissions), as nobody: the child drops to it itself, after its imports, because the
# interpreter and the venv may live where nobody cannot read (here: under /root).
_UNPRIVILEGED = 65534  # nobody / nogroup
_CANNOT_DROP = 77  # the child's exit status when it may not drop root (no CAP_SETUID)
_SERVE_READ_ONLY = """
import json, os, sys
import torch
from nest_core import EncodedPassage, SpanDatastore

new = EncodedPassage(keys=torch.ones(3, 4), values=torch.arange(3),
                     char_spans=torch.zeros(3, 2, dtype=torch.int32))
if len(sys.argv) > 2:
    try:
        os.setgroups([])
        os.setgid(int(sys.argv[2]))
        os.setuid(int(sys.argv[2]))
    except PermissionError as err:
        print(err, file=sys.stderr)
        sys.exit(77)
store = SpanDatastore(sys.argv[1])
got = store.get("k")
store.put("new", new)
kept = store.get("new")
print(json.dumps({"uid": os.geteuid(), "got": None if got is None else got.values.tolist(),
                  "kept": None if kept is None else kept.values.tolist(),
                  "unwritable": store.stats.unwritable, "writes": store.stats.writes}))
"""


def test_a_store_without_write_permission_is_served():
    # caught (as an unprivileged user): get failing on the mtime touch of a file it cannot
    # write, put raising PermissionError instead of serving the store and keeping the key
    import json
    import subprocess
    import sys
    import tempfile

    import nest_core

    as_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory() as base:  # not tmp_path: its parents are root's 0700
        root = Path(base) / "store"
        SpanDatastore(root).put("k", _entry())
        files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
        dirs = [root, *[p for p in root.rglob("*") if p.is_dir()]]
        for p in files:
            p.chmod(0o444)
        for d in dirs:
            d.chmod(0o555)
        Path(base).chmod(0o755)  # traversable by the child, writable only by its owner
        try:
            child = subprocess.run(
                [sys.executable, "-c", _SERVE_READ_ONLY, str(root),
                 *([str(_UNPRIVILEGED)] if as_root else [])],
                capture_output=True, text=True, timeout=120, cwd=base, check=False,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                     "PYTHONPATH": str(Path(nest_core.__file__).resolve().parents[1])})
        finally:
            for d in dirs:
                d.chmod(0o755)
        if as_root and child.returncode == _CANNOT_DROP:
            pytest.skip(f"cannot drop to uid {_UNPRIVILEGED}: {child.stderr.strip()}")
        assert child.returncode == 0, child.stderr
        result = json.loads(child.stdout.strip().splitlines()[-1])
        assert result["uid"] == (_UNPRIVILEGED if as_root else os.geteuid())
        assert result["got"] == _entry().values.tolist()  # the store is served
        assert result["kept"] == [0, 1, 2]  # the new key is kept in memory
        assert (result["unwritable"], result["writes"]) == (1, 0)
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == files


def test_span_files_are_readable_as_the_umask_allows(tmp_path):
    # caught: mkstemp's 0600 kept, so a shared store is unreadable to its other users
    store = SpanDatastore(tmp_path)
    store.put("k", _entry())
    (file,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    mask = os.umask(0)
    os.umask(mask)
    assert file.stat().st_mode & 0o777 == 0o666 & ~mask
