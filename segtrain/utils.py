"""Small helpers shared across segtrain: the one atomic writer, the one downloader, a timeout."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
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

from segtrain.errors import ConfigError, cause_chain

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock on the part file
    fcntl = None

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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = next((c for c in cause_chain(e, 4) if isinstance(c, OSError) and c.errno is not None), None)
        if cause is None:
            raise
        if cause is e:  # a failed write (disk full) names no file: this one
            e.filename = e.filename or str(path)
            raise
        # the writer failed on the OSError and then raised its own error (torch.save: "unexpected pos"): the
        # OSError, naming the file, is what callers handle and what the user can fix
        raise OSError(cause.errno, cause.strerror, str(path)) from e
    if durable:
        _fsync_dir(path.parent)
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


def _claim(part: Path, dest: Path) -> int | None:
    """A file descriptor on ``part``, emptied and locked (flock) for this process; None when another process,
    whose lock this one waited for, has meanwhile completed ``dest``.  A lock dies with its process, so a
    part file left by a killed download is simply taken over."""
    while True:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"{part}: another process is downloading it; waiting", flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                here, ours = os.stat(part), os.fstat(fd)
                mine = (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)
            except FileNotFoundError:
                mine = False
            if mine:  # still the file at that name (not renamed to dest or removed by the one that held it)
                os.ftruncate(fd, 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if dest.is_file():
            return None


def download(url: str, dest: str | Path, timeout: float, sha256_prefix: str | None = None) -> Path:
    """Fetch ``url`` into ``dest``; every network stage gives up after ``timeout`` seconds.

    Name resolution and the connection run under :func:`call_with_timeout` (``urlopen``'s own timeout does
    not cover them), each read under the socket timeout.  ``sha256_prefix``: the start of the file's
    sha256 (torch.hub's file-name convention), checked before ``dest`` appears.  The data goes to
    ``dest.part`` (one fixed name, so a retry after a kill overwrites it rather than adding another large
    file), which is renamed to ``dest`` when complete and removed on any failure, Ctrl-C included; it is
    locked while written, so a second process fetching the same ``dest`` waits and then uses the first
    one's file.  A percentage is shown on a terminal.  Raises ``OSError`` (``urllib.error.URLError`` is
    one) with the reason; a broken or non-HTTP reply is an ``OSError`` naming ``url``.
    """
    dest = Path(dest)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise OSError(f"not an http(s) URL: {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fd = _claim(part, dest)
    if fd is None:
        return dest
    with os.fdopen(fd, "wb") as out:  # closing it releases the lock: so only after the rename or the removal
        try:
            try:
                _fetch(url, parsed, out, timeout, sha256_prefix, dest.name)
            except http.client.HTTPException as e:  # IncompleteRead, BadStatusLine ...: not OSErrors
                detail = " ".join(str(e).split())[:80]
                raise OSError(f"broken reply from {url}: {type(e).__name__}{f' {detail}' if detail else ''}") from e
            out.flush()
            os.fsync(out.fileno())
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    _fsync_dir(dest.parent)
    return dest


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _fetch(url: str, parsed, out: IO[bytes], timeout: float, sha256_prefix: str | None, name: str) -> None:
    """Copy ``url``'s body into ``out``, checking its length and ``sha256_prefix``."""
    if not _uses_proxy():
        _resolve_host(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
    request = urllib.request.Request(url, headers={"User-Agent": "segtrain"})
    response = call_with_timeout(lambda: urllib.request.urlopen(request, timeout=timeout), timeout)
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0)
    show = bool(total) and sys.stdout.isatty()
    done, last = 0, -1
    with response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if show and 100 * done // total != last:
                last = 100 * done // total
                print(f"\r{name}: {last}% of {total / 2**20:.0f} MiB", end="", flush=True)
    if show:
        print()
    if total and done != total:
        raise OSError(f"download of {url} stopped after {done} of {total} bytes")
    if sha256_prefix and not digest.hexdigest().startswith(sha256_prefix):
        raise OSError(f"the downloaded file's sha256 does not start with {sha256_prefix}")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (NaN and inf become null)."""

    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    atomic_write(path, json.dumps(clean(obj), indent=2) + "\n")
