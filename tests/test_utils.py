"""segtrain/utils.py."""

import hashlib
import os
import re
import stat
import threading

import pytest

from segtrain import utils


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    path = utils.atomic_write(tmp_path / "a.json", "{}", durable=False)
    with open(tmp_path / "b.json", "w") as f:  # what a plain open() creates under this process's umask
        f.write("{}")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~utils._UMASK
    assert path.read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))


def _reply(body: bytes, gate: threading.Event | None = None):
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:1000])
        h.wfile.flush()
        if gate is not None:
            assert gate.wait(10)
        h.wfile.write(body[1000:])

    return answer


def test_download_overwrites_a_part_file_left_by_a_killed_run(tmp_path, http_server):
    url, routes = http_server
    body = os.urandom(300_000)
    routes["/f.bin"] = _reply(body)
    dest = tmp_path / "w" / "f.bin"
    dest.parent.mkdir()
    dest.with_name("f.bin.part").write_bytes(b"x" * 500_000)  # what a killed download left
    utils.download(f"{url}/f.bin", dest, 5, hashlib.sha256(body).hexdigest()[:8])
    assert dest.read_bytes() == body and os.listdir(dest.parent) == ["f.bin"]


def _chunked_cut(h):
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"10000\r\n" + b"y" * 500)  # a 64 KiB chunk, cut after 500 bytes


def _short(h):
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    h.wfile.write(b"z" * 500)


def _not_http(h):
    h.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")


@pytest.mark.parametrize("answer", [_chunked_cut, _short, _not_http])
def test_download_failures_are_oserrors_naming_the_url_and_leave_no_file(tmp_path, http_server, answer):
    url, routes = http_server
    routes["/f.bin"] = answer
    dest = tmp_path / "f.bin"
    with pytest.raises(OSError, match=re.escape(f"{url}/f.bin")):
        utils.download(f"{url}/f.bin", dest, 5)
    assert os.listdir(tmp_path) == []


def test_a_second_download_of_the_same_file_waits_for_the_first(tmp_path, http_server):
    url, routes = http_server
    body, gate, served = os.urandom(200_000), threading.Event(), []
    first = _reply(body, gate)
    routes["/f.bin"] = lambda h: (served.append(h.path), first(h))
    dest = tmp_path / "f.bin"
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("first", utils.download(f"{url}/f.bin", dest, 5)))
    thread.start()
    while not served:  # the first download holds the part file's lock and has its first bytes
        thread.join(0.01)
    threading.Timer(0.3, gate.set).start()
    assert utils.download(f"{url}/f.bin", dest, 5) == dest  # waits, then takes the first one's file
    thread.join(10)
    assert result["first"] == dest and dest.read_bytes() == body
    assert len(served) == 1 and os.listdir(tmp_path) == ["f.bin"]
