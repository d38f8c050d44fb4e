"""Small helpers shared across segtrain: the one atomic writer, the one downloader, a timeout."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import IO, Any, TypeVar

from segtrain.errors import ConfigError

T = TypeVar("T")


def _whole(v: Any) -> bool:
    return not isinstance(v, bool) and (isinstance(v, Integral) or (isinstance(v, float) and v.is_integer()))


def as_hw(value: Any, key: str) -> tuple[int, int]:
    """A size: an int, ``[s]`` or ``[h, w]`` of positive integers -> ``(h, w)``.

    The one size parser: config keys and API arguments alike; anything else is a ConfigError (also a
    ValueError) naming ``key``."""
    vals = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(_whole(v) for v in vals):
        raise ConfigError(f"{key} must be an int or [h, w], got {value!r}")
    h, w = (int(v) for v in vals)
    if h <= 0 or w <= 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    return h, w


def as_size(value: Any, key: str) -> int | tuple[int, int] | None:
    """A rescale target: None, an int (the short side), or ``[h, w]`` (fit into that box) -> None, int, (h, w)."""
    if value is None:
        return None
    if _whole(value):
        return as_hw(value, key)[0]
    return as_hw(value, key)


def files_digest(paths: list, *extra: Any) -> str:
    """A 32-hex-digit key of ``extra`` and of each file's absolute path, size and modification time (a file
    that changes, moves or disappears changes the key): what the label-check and image-statistics caches use."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:32]


def call_with_timeout(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` in a daemon thread: its result, its exception re-raised here, or ``TimeoutError`` after
    ``timeout`` seconds (the thread is then abandoned).  For network calls whose own timeouts do not cover
    every stage (``urlopen`` does not time out name resolution), so that offline fails in seconds."""
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None] | bytes | str, durable: bool = True) -> Path:
    """Write ``path`` so that a crash at any moment leaves either the old file or the complete new one.

    ``write`` is the content (bytes or text) or a function that writes to the open binary file.  The data
    goes to a temporary file in the same folder, is fsynced (``durable``), and is renamed over ``path``;
    the folder is then fsynced so the rename survives a power cut.  A failure removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private)
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    return path


def _resolve_host(host: str, port: int, timeout: float) -> None:
    """Resolve ``host`` in a daemon thread so that a stuck resolver cannot hang the caller."""
    try:
        call_with_timeout(lambda: socket.getaddrinfo(host, port), timeout)
    except TimeoutError:
        raise OSError(f"resolving {host} timed out after {timeout:.0f} s") from None
    except OSError as e:
        raise OSError(f"cannot resolve {host}: {e}") from None


def _uses_proxy() -> bool:
    return any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"))


def download(url: str, dest: str | Path, timeout: float, sha256_prefix: str | None = None) -> Path:
    """Fetch ``url`` into ``dest`` atomically; every network stage gives up after ``timeout`` seconds.

    Name resolution and the connection run under :func:`call_with_timeout` (``urlopen``'s own timeout does
    not cover them), each read under the socket timeout.  ``sha256_prefix``: the start of the file's
    sha256 (torch.hub's file-name convention), checked before ``dest`` appears.  A percentage is shown on
    a terminal.  Raises ``OSError`` (or ``urllib.error.URLError``, a subclass) with the reason.
    """
    dest = Path(dest)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise OSError(f"not an http(s) URL: {url}")
    if not _uses_proxy():
        _resolve_host(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
    request = urllib.request.Request(url, headers={"User-Agent": "segtrain"})
    response = call_with_timeout(lambda: urllib.request.urlopen(request, timeout=timeout), timeout)
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0)
    show = bool(total) and sys.stdout.isatty()

    def copy(out: IO[bytes]) -> None:
        done, last = 0, -1
        with response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if show and 100 * done // total != last:
                    last = 100 * done // total
                    print(f"\r{dest.name}: {last}% of {total / 2**20:.0f} MiB", end="", flush=True)
        if show:
            print()
        if total and done != total:
            raise OSError(f"download of {url} stopped after {done} of {total} bytes")
        if sha256_prefix and not digest.hexdigest().startswith(sha256_prefix):
            raise OSError(f"the downloaded file's sha256 does not start with {sha256_prefix}")

    return atomic_write(dest, copy)
