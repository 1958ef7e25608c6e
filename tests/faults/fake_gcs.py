"""An in-memory stand-in for the part of the google-cloud-storage client that `GcsStore` uses,
which, unlike the storage emulator, enforces generation preconditions.

Every write gives the object a new generation; `if_generation_match=N` on a download or upload
raises the real `google.api_core.exceptions.PreconditionFailed` unless the object's generation
is N (0: the object must not exist), and a missing object raises the real `NotFound`. Safe to
use from many threads. Install it with `install(monkeypatch)`, which makes every `GcsStore`
created afterwards talk to one shared fake.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc


@dataclass
class _Object:
    data: bytes
    generation: int


@dataclass
class FakeGcs:
    """The objects of every bucket, keyed by (bucket, name)."""

    buckets: set[str] = field(default_factory=set)
    objects: dict[tuple[str, str], _Object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_generation: int = 1
    # Names of calls made ("upload", "download", ...), for tests that count them.
    calls: list[str] = field(default_factory=list)
    # Seconds each call waits before it runs, like a network round trip, so that calls from
    # racing threads interleave.
    latency_s: float = 0.002

    def wait(self) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)

    def client(self) -> FakeClient:
        return FakeClient(self)


class FakeClient:
    """`storage.Client` surface: bucket()."""

    def __init__(self, gcs: FakeGcs) -> None:
        self._gcs = gcs

    def bucket(self, name: str) -> FakeBucket:
        return FakeBucket(self._gcs, name)


class _Pages:
    """What `list_blobs` returns: iterable blobs and the `prefixes` seen with a delimiter."""

    def __init__(self, blobs: list[FakeBlob], prefixes: set[str]) -> None:
        self._blobs = blobs
        self.prefixes = prefixes

    def __iter__(self) -> Iterator[FakeBlob]:
        return iter(self._blobs)


class FakeBucket:
    """`storage.Bucket` surface: blob(), get_blob(), list_blobs()."""

    def __init__(self, gcs: FakeGcs, name: str) -> None:
        self._gcs = gcs
        self.name = name

    def _check(self) -> None:
        if self.name not in self._gcs.buckets:
            raise gexc.NotFound(f"bucket {self.name} not found")

    def blob(self, name: str) -> FakeBlob:
        return FakeBlob(self._gcs, self, name, generation=None)

    def get_blob(self, name: str, **_: Any) -> FakeBlob | None:
        self._gcs.wait()
        with self._gcs.lock:
            self._check()
            self._gcs.calls.append("get_blob")
            obj = self._gcs.objects.get((self.name, name))
            return None if obj is None else FakeBlob(self._gcs, self, name, obj.generation)

    def list_blobs(
        self, prefix: str = "", delimiter: str | None = None, max_results: int | None = None, **_
    ) -> _Pages:
        self._gcs.wait()
        with self._gcs.lock:
            self._check()
            names = sorted(
                n for b, n in self._gcs.objects if b == self.name and n.startswith(prefix)
            )
        blobs, prefixes = [], set()
        for name in names:
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                blobs.append(FakeBlob(self._gcs, self, name, None))
        if max_results is not None:
            blobs = blobs[:max_results]
        return _Pages(blobs, prefixes)


class FakeBlob:
    """`storage.Blob` surface: download_as_bytes, upload_from_string, delete, exists,
    generation."""

    def __init__(self, gcs: FakeGcs, bucket: FakeBucket, name: str, generation: int | None):
        self._gcs = gcs
        self._bucket = bucket
        self.name = name
        self.generation = generation

    def _key(self) -> tuple[str, str]:
        return (self._bucket.name, self.name)

    def _precondition(self, obj: _Object | None, if_generation_match: int | None) -> None:
        if if_generation_match is None:
            return
        current = obj.generation if obj is not None else 0
        if current != if_generation_match:
            raise gexc.PreconditionFailed(
                f"{self.name}: generation {current} does not match {if_generation_match}"
            )

    def download_as_bytes(self, if_generation_match: int | None = None, **_: Any) -> bytes:
        self._gcs.wait()
        with self._gcs.lock:
            self._bucket._check()
            self._gcs.calls.append("download")
            obj = self._gcs.objects.get(self._key())
            if obj is None:
                raise gexc.NotFound(f"{self.name} not found")
            self._precondition(obj, if_generation_match)
            return obj.data

    def upload_from_string(
        self, data: bytes, content_type: str = "", if_generation_match: int | None = None, **_
    ) -> None:
        self._gcs.wait()
        with self._gcs.lock:
            self._bucket._check()
            self._gcs.calls.append("upload")
            self._precondition(self._gcs.objects.get(self._key()), if_generation_match)
            generation = self._gcs.next_generation
            self._gcs.next_generation += 1
            self._gcs.objects[self._key()] = _Object(bytes(data), generation)
            self.generation = generation

    def delete(self, **_: Any) -> None:
        self._gcs.wait()
        with self._gcs.lock:
            self._bucket._check()
            if self._gcs.objects.pop(self._key(), None) is None:
                raise gexc.NotFound(f"{self.name} not found")

    def exists(self, **_: Any) -> bool:
        self._gcs.wait()
        with self._gcs.lock:
            self._bucket._check()
            return self._key() in self._gcs.objects


def install(monkeypatch: Any, bucket: str = "sax-test") -> FakeGcs:
    """Makes every GcsStore created from now on use a new fake holding `bucket`."""
    from sax.storage import gcs as gcs_module

    fake = FakeGcs(buckets={bucket})
    monkeypatch.setattr(gcs_module, "_make_client", lambda _module: fake.client())
    return fake
