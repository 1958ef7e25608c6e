"""The `Store` contract over both backends (a local folder and the GCS emulator)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from sax.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from sax.storage import Store, open_store
from sax.storage.gcs import GcsStore, parse_gs_url
from sax.storage.local import LocalStore

if TYPE_CHECKING:
    from conftest import GcsEmulator


@pytest.fixture
def store(sax_root: str) -> Store:
    return open_store(sax_root)


def test_open_store_picks_backend(sax_root: str) -> None:
    store = open_store(sax_root)
    assert isinstance(store, GcsStore if sax_root.startswith("gs://") else LocalStore)
    assert store.url == sax_root


def test_read_missing_is_none(store: Store) -> None:
    assert store.read("nope") is None
    assert store.read("no/such/dir/file") is None
    assert not store.exists("nope")


def test_write_read_overwrite(store: Store) -> None:
    store.write("a/b/c.proto", b"one")
    assert store.read("a/b/c.proto") == b"one"
    assert store.exists("a/b/c.proto")
    store.write("a/b/c.proto", b"two, longer")
    assert store.read("a/b/c.proto") == b"two, longer"
    store.write("a/b/c.proto", b"")
    assert store.read("a/b/c.proto") == b""
    assert store.exists("a/b/c.proto")


def test_binary_data_round_trips(store: Store) -> None:
    data = bytes(range(256)) * 1000 + b"\x00\r\n\xff"
    store.write("bin", data)
    assert store.read("bin") == data


def test_leading_and_trailing_slashes_are_ignored(store: Store) -> None:
    store.write("/x/y/", b"1")
    assert store.read("x/y") == b"1"
    assert store.list_dir("/x/") == ["y"]


def test_delete(store: Store) -> None:
    store.delete("missing")  # no error
    store.write("d/f", b"x")
    store.delete("d/f")
    assert store.read("d/f") is None
    assert not store.exists("d/f")
    store.delete("d/f")


def test_exists_is_false_for_folders(store: Store) -> None:
    store.write("folder/file", b"x")
    assert store.exists("folder/file")
    assert not store.exists("folder")


def test_list_dir_nested_sorted(store: Store) -> None:
    for path in ["sax/b/config.proto", "sax/a/state.proto", "sax/a/x/deep", "sax/c", "top"]:
        store.write(path, b"x")
    assert store.list_dir("sax") == ["a", "b", "c"]
    assert store.list_dir("sax/a") == ["state.proto", "x"]
    assert store.list_dir("sax/a/x") == ["deep"]
    assert store.list_dir("") == ["sax", "top"]
    assert store.list_dir("missing") == []
    assert store.list_dir("sa") == []  # a name prefix is not a folder


def test_list_dir_is_sorted_for_many_names(store: Store) -> None:
    names = [f"m{i}" for i in (3, 10, 1, 22, 2)]
    for n in names:
        store.write(f"many/{n}", b"")
    assert store.list_dir("many") == sorted(names)


def test_path_escaping_refused(store: Store) -> None:
    with pytest.raises(InvalidArgumentError):
        store.write("../outside", b"x")
    with pytest.raises(InvalidArgumentError):
        store.read("a/../../outside")


def test_compare_and_swap(store: Store) -> None:
    assert store.compare_and_swap("lease", None, b"v1")
    assert store.read("lease") == b"v1"
    assert not store.compare_and_swap("lease", None, b"other")  # exists already
    assert not store.compare_and_swap("lease", b"stale", b"other")
    assert store.read("lease") == b"v1"
    assert store.compare_and_swap("lease", b"v1", b"v2")
    assert store.read("lease") == b"v2"
    store.delete("lease")
    assert not store.compare_and_swap("lease", b"v2", b"v3")  # gone
    assert store.read("lease") is None
    assert store.list_dir("") == []  # no lock or temp files show


def test_local_compare_and_swap_is_atomic(tmp_path: pathlib.Path) -> None:
    # Only locally: the storage emulator does not enforce GCS generation preconditions.
    store = LocalStore(tmp_path)
    store.write("counter", b"0")
    threads, per_thread = 4, 25

    def bump() -> None:
        done = 0
        while done < per_thread:
            current = store.read("counter")
            assert current is not None
            if store.compare_and_swap("counter", current, str(int(current) + 1).encode()):
                done += 1

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert store.read("counter") == str(threads * per_thread).encode()


def test_local_write_is_atomic_for_readers(tmp_path: pathlib.Path) -> None:
    store = LocalStore(tmp_path)
    versions = [bytes([i]) * (4 << 20) for i in range(3)]  # 4 MiB each
    store.write("big", versions[0])
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            store.write("big", versions[writes % len(versions)])
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    reads, bad = 0, 0
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline or writes < 5:
            data = store.read("big")
            reads += 1
            if data not in versions:
                bad += 1
    finally:
        stop.set()
        thread.join()
    assert bad == 0, f"{bad} of {reads} reads saw a partial file"
    assert reads > 5 and writes >= 5
    assert store.list_dir("") == ["big"]  # no temp files left behind


def test_local_url_is_resolved(tmp_path: pathlib.Path) -> None:
    assert LocalStore(os.path.join(tmp_path, "a", "..")).url == str(tmp_path)


def test_parse_gs_url() -> None:
    assert parse_gs_url("gs://b/p/q/") == ("b", "p/q")
    assert parse_gs_url("gs://b") == ("b", "")
    with pytest.raises(InvalidArgumentError):
        parse_gs_url("gs:///p")
    assert GcsStore("gs://b//p/").url == "gs://b/p"
    assert GcsStore("gs://b").url == "gs://b"


def test_gcs_store_at_bucket_root(
    gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{gcs_emulator.host}")  # scheme ok too
    name = f"root-{os.getpid()}-{time.monotonic_ns()}"
    store = GcsStore(f"gs://{gcs_emulator.bucket}")
    store.write(f"{name}/f", b"1")
    assert store.read(f"{name}/f") == b"1"
    assert name in store.list_dir("")
    prefixed = GcsStore(gcs_emulator.root(name))
    assert prefixed.list_dir("") == ["f"]


def test_gcs_missing_bucket(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    store = GcsStore("gs://no-such-bucket/p")
    for call in (
        lambda: store.read("x"),
        lambda: store.write("x", b"1"),
        lambda: store.exists("x"),
        lambda: store.list_dir(""),
        lambda: store.delete("x"),
        lambda: store.compare_and_swap("x", None, b"1"),
    ):
        with pytest.raises(FailedPreconditionError, match="bucket no-such-bucket does not exist"):
            call()


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A local port that is bound but never listens: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_gcs_unreachable_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with _refusing_port() as port:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
        store = GcsStore("gs://bkt/root", timeout=1.0, retry_timeout=0.3)
        with pytest.raises(UnavailableError, match="gs://bkt/root/sax/x"):
            store.read("sax/x")
        with pytest.raises(UnavailableError, match="gs://bkt/root"):
            store.list_dir("")
