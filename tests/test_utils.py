"""segtrain/utils.py."""

import stat

from segtrain import utils


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    path = utils.atomic_write(tmp_path / "a.json", "{}", durable=False)
    with open(tmp_path / "b.json", "w") as f:  # what a plain open() creates under this process's umask
        f.write("{}")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~utils._UMASK
    assert path.read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))
