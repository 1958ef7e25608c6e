"""Google Cloud Storage backend of `Store`: objects under gs://bucket/prefix.

Writes are single-object uploads, which GCS makes atomic. With $STORAGE_EMULATOR_HOST set
("127.0.0.1:9023" or "http://127.0.0.1:9023"), the store talks to that emulator with
anonymous credentials instead of Google Cloud.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sax.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SaxError,
    UnavailableError,
)

if TYPE_CHECKING:
    from google.cloud import storage

logger = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "sax-emulator"


def parse_gs_url(url: str) -> tuple[str, str]:
    """Splits "gs://bucket/some/prefix" into ("bucket", "some/prefix")."""
    if not url.startswith("gs://"):
        raise InvalidArgumentError(f"{url!r} is not a gs:// URL; use gs://bucket/prefix")
    bucket, _, prefix = url[len("gs://") :].partition("/")
    if not bucket:
        raise InvalidArgumentError(f"{url!r} names no bucket; use gs://bucket/prefix")
    return bucket, "/".join(p for p in prefix.split("/") if p)


class GcsStore:
    """A `Store` on gs://bucket/prefix.

    timeout: seconds for one HTTP request; retry_timeout: seconds to keep retrying transient
    failures (connection errors, 429, 5xx) before raising UnavailableError.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retry_timeout: float = 60.0) -> None:
        self._bucket_name, self._prefix = parse_gs_url(url)
        self._timeout = timeout
        self._retry_timeout = retry_timeout
        self._lock = threading.Lock()
        self._client: storage.Client | None = None
        self._bucket_obj: storage.Bucket | None = None
        self._retry: Any = None
        self._bucket_seen = False

    @property
    def url(self) -> str:
        return f"gs://{self._bucket_name}/{self._prefix}".rstrip("/")

    # --- helpers -----------------------------------------------------------------------

    def _bucket(self) -> storage.Bucket:
        """The bucket handle, creating the client on first use."""
        with self._lock:
            if self._bucket_obj is None:
                with self._errors("connect to"):
                    from google.cloud import storage
                    from google.cloud.storage.retry import DEFAULT_RETRY

                    self._client = _make_client(storage)
                    self._retry = DEFAULT_RETRY.with_timeout(self._retry_timeout)
                    self._bucket_obj = self._client.bucket(self._bucket_name)
            return self._bucket_obj

    def _key(self, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidArgumentError(f"path {path!r} has '.' or '..' segments; use plain names")
        return "/".join([self._prefix, *parts]) if self._prefix else "/".join(parts)

    def _obj_url(self, key: str) -> str:
        return f"gs://{self._bucket_name}/{key}"

    def _kwargs(self) -> dict[str, Any]:
        return {"timeout": self._timeout, "retry": self._retry}

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Maps google-cloud-storage, google-auth and transport errors to SaxErrors."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc
        from requests import exceptions as req_exc

        target = self._obj_url(key) if key is not None else self.url
        try:
            yield
        except SaxError:
            raise
        except gexc.NotFound as e:
            raise self._missing_bucket() from e
        except (gexc.Unauthorized, gexc.Forbidden, auth_exc.GoogleAuthError) as e:
            raise UnavailableError(
                f"cannot {action} {target}: access refused or no credentials ({e}); check "
                "GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`, "
                "and that the account may read and write the bucket"
            ) from e
        except gexc.BadRequest as e:
            raise InvalidArgumentError(f"cannot {action} {target}: {e}") from e
        except (gexc.GoogleAPIError, req_exc.RequestException, OSError) as e:
            emulator = os.environ.get(EMULATOR_ENV)
            server = f"the storage emulator at {emulator}" if emulator else "GCS"
            raise UnavailableError(
                f"cannot {action} {target}: {e}; check the network and that {server} is "
                "reachable, then retry"
            ) from e

    def _missing_bucket(self) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"bucket {self._bucket_name} does not exist; create it (gcloud storage buckets "
            f"create gs://{self._bucket_name}) or fix the sax_root {self.url}"
        )

    def _check_bucket(self) -> None:
        """After a 404 on an object: raises FAILED_PRECONDITION if the bucket itself is missing.

        Uses an object listing (needs only storage.objects.list); remembers a bucket once seen.
        """
        if self._bucket_seen:
            return
        bucket = self._bucket()
        with self._errors("list", self._prefix):  # maps a 404 to _missing_bucket()
            list(bucket.list_blobs(max_results=1, **self._kwargs()))
        self._bucket_seen = True

    # --- Store -------------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        from google.api_core import exceptions as gexc

        key = self._key(path)
        bucket = self._bucket()
        with self._errors("read", key):
            try:
                data = bucket.blob(key).download_as_bytes(**self._kwargs())
            except gexc.NotFound:
                data = None
        if data is None:
            self._check_bucket()
            return None
        self._bucket_seen = True
        return data

    def write(self, path: str, data: bytes) -> None:
        key = self._key(path)
        bucket = self._bucket()
        with self._errors("write", key):
            bucket.blob(key).upload_from_string(
                data, content_type="application/octet-stream", **self._kwargs()
            )
        self._bucket_seen = True

    def delete(self, path: str) -> None:
        from google.api_core import exceptions as gexc

        key = self._key(path)
        bucket = self._bucket()
        with self._errors("delete", key):
            try:
                bucket.blob(key).delete(**self._kwargs())
                self._bucket_seen = True
            except gexc.NotFound:
                self._check_bucket()

    def exists(self, path: str) -> bool:
        key = self._key(path)
        bucket = self._bucket()
        with self._errors("look up", key):
            found = bucket.blob(key).exists(**self._kwargs())
        if not found:
            self._check_bucket()
        return bool(found)

    def list_dir(self, path: str) -> list[str]:
        key = self._key(path)
        prefix = f"{key}/" if key else ""
        bucket = self._bucket()
        with self._errors("list", key):
            pages = bucket.list_blobs(prefix=prefix, delimiter="/", **self._kwargs())
            names = {blob.name[len(prefix) :] for blob in pages}
            names.update(p[len(prefix) :].rstrip("/") for p in pages.prefixes)
        self._bucket_seen = True
        return sorted(n for n in names if n and not n.startswith("."))

    def compare_and_swap(self, path: str, expected: bytes | None, data: bytes) -> bool:
        """Writes data only if the object's bytes are `expected` (None: it must not exist).

        Returns whether it wrote. Uses GCS generation preconditions, so it is atomic against
        any concurrent writer. (The storage emulator ignores preconditions.)
        """
        from google.api_core import exceptions as gexc

        key = self._key(path)
        bucket = self._bucket()
        with self._errors("update", key):
            blob = bucket.get_blob(key, **self._kwargs())
            if blob is None:
                self._check_bucket()
                if expected is not None:
                    return False
                generation = 0
            else:
                if expected is None:
                    return False
                generation = blob.generation
                try:
                    current = blob.download_as_bytes(
                        if_generation_match=generation, **self._kwargs()
                    )
                except (gexc.PreconditionFailed, gexc.NotFound):
                    return False  # replaced or deleted since get_blob
                if current != expected:
                    return False
            try:
                bucket.blob(key).upload_from_string(
                    data,
                    content_type="application/octet-stream",
                    if_generation_match=generation,
                    **self._kwargs(),
                )
            except gexc.PreconditionFailed:
                return False
        self._bucket_seen = True
        return True


def _make_client(module: Any) -> storage.Client:
    """A client for Google Cloud, or for the emulator at $STORAGE_EMULATOR_HOST if set."""
    host = os.environ.get(EMULATOR_ENV, "")
    if not host:
        return module.Client()
    from google.auth.credentials import AnonymousCredentials

    endpoint = host if "://" in host else f"http://{host}"
    logger.info("using the storage emulator at %s", endpoint)
    return module.Client(
        project=EMULATOR_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
