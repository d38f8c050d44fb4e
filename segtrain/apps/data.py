"""``segtrain-data``: download, verify, extract and convert data sets into the layouts segtrain reads, and the
data card of any data set.

* ``segtrain-data voc --root DIR``: PASCAL VOC 2012 trainval (``DIR/VOCdevkit/VOC2012``).
* ``segtrain-data sbd --root DIR``: SBD (``benchmark.tgz``) converted to
  ``VOC2012/SegmentationClassAug/*.png`` + ``ImageSets/Segmentation/aug.txt`` for ``data=voc_aug``
  (like mmseg's ``tools/dataset_converters/voc_aug.py``); needs VOC in ``DIR`` first.
* ``segtrain-data cityscapes --root DIR``: ``*_gtFine_labelTrainIds.png`` next to every
  ``*_gtFine_labelIds.png`` (no download: Cityscapes needs a login).
* ``segtrain-data inspect data=NAME data.root=DIR [overrides]``: the data set's fingerprint and training plan
  in a few lines, and ``data_card.png``.  The overrides compose the same config as ``segtrain``.

The work is :mod:`segtrain.data.prepare` (downloads, safe extraction, conversions) and
:mod:`segtrain.data.fingerprint` / :mod:`segtrain.data.plan` / :mod:`segtrain.data.card`.  Every failure is one
line on stderr, ``segtrain-data: error: ...``, with a non-zero exit (progress goes to stdout);
``SEGTRAIN_DATA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segtrain.config import config_dir, register_configs
from segtrain.config.explicit import explicit_keys
from segtrain.console import error_line, first_line, out_of_memory, protect_std_streams
from segtrain.data.prepare import (
    PROG,
    VOC_URL,
    cmd_cityscapes,
    cmd_sbd,
    cmd_voc,
    output_error,
)
from segtrain.errors import ConfigError, DataError, ResourceError, SegtrainError
from segtrain.signals import AsInterrupt, Interrupted


def cmd_inspect(args: argparse.Namespace) -> None:
    """The data card: fingerprint, plan and data_card.png (segtrain.data.fingerprint, plan, card)."""
    if args.max_images is not None and args.max_images < 1:
        raise DataError("--max-images must be >= 1")
    inspect(args.overrides, out=args.out, max_images=args.max_images, as_json=args.json)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Download, verify, extract and convert data sets for segtrain.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{voc,sbd,cityscapes,inspect}", parser_class=_Parser)

    def archive_opts(sp, what):
        sp.add_argument("--root", required=True, help="folder that receives the data (data.root for training)")
        sp.add_argument("--archive", metavar="PATH", help=f"use this local {what} instead of downloading")
        sp.add_argument("--md5", metavar="HEX", help="expected md5 of the archive (default: the official one)")
        sp.add_argument("--no-verify", action="store_true", help="skip the md5 check")
        sp.add_argument(
            "--force",
            action="store_true",
            help="extract again even if already done (an archive already in --root is reused: delete it to download anew)",
        )

    v = sub.add_parser("voc", help="PASCAL VOC 2012 trainval -> ROOT/VOCdevkit/VOC2012")
    archive_opts(v, "VOCtrainval_11-May-2012.tar")
    v.add_argument("--url", default=VOC_URL, help=f"download URL (default: {VOC_URL})")
    v.set_defaults(func=cmd_voc)

    s = sub.add_parser("sbd", help="SBD benchmark.tgz -> VOC2012/SegmentationClassAug + aug.txt (data=voc_aug)")
    archive_opts(s, "benchmark.tgz")
    s.add_argument("--workers", type=int, default=0, help="conversion processes (default: min(8, CPUs))")
    s.set_defaults(func=cmd_sbd)

    c = sub.add_parser("cityscapes", help="gtFine labelIds -> labelTrainIds PNGs (no download: needs a login)")
    c.add_argument("--root", required=True, help="folder holding gtFine/ and leftImg8bit/")
    c.add_argument("--workers", type=int, default=0, help="conversion processes (default: min(8, CPUs))")
    c.add_argument("--force", action="store_true", help="rewrite existing labelTrainIds PNGs")
    c.set_defaults(func=cmd_cityscapes)

    i = sub.add_parser(
        "inspect",
        help="the data card: fingerprint, plan and data_card.png (e.g. inspect data=folder data.root=DIR)",
        description="Fingerprint a data set, print the training plan, and write data_card.png. The overrides "
        "compose the same config as segtrain (data=NAME data.root=PATH data.KEY=VALUE ...).",
    )
    i.add_argument("overrides", nargs="*", help="segtrain overrides: data=NAME data.root=PATH [data.KEY=VALUE ...]")
    i.add_argument("--out", default="data_card.png", help="where the card goes (default: ./data_card.png)")
    i.add_argument("--max-images", type=int, default=None, help="images per split read for pixel statistics (256)")
    i.add_argument("--json", action="store_true", help="print the fingerprint and the plan as one JSON object")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    protect_std_streams()  # `segtrain-data ... | head -1`: output stops quietly, the work goes on
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 0) < 0:
        print(f"{PROG}: error: --workers must be >= 0", file=sys.stderr)
        return 2
    with AsInterrupt():  # SIGTERM ends the command as Ctrl-C does: a partial download is removed
        try:
            args.func(args)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(f"{PROG}: error: {what}; rerun the same command to finish", file=sys.stderr)
            return 128 + signum
        except Exception as e:
            if os.environ.get("SEGTRAIN_DATA_DEBUG"):
                raise
            e = _user_error(e)
            msg = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, SegtrainError):
                msg = f"{type(e).__name__}: {msg} (SEGTRAIN_DATA_DEBUG=1 shows the traceback)"
            print(error_line(f"{PROG}: error: ", msg), file=sys.stderr)  # at most 300 characters
            return getattr(e, "exit_code", 1)
    return 0


def _user_error(e: Exception) -> Exception:
    """An error not yet put in words: out of memory (exit 5), a file that cannot be written (exit 4), a file
    where a folder must be (exit 2); else ``e`` itself."""
    if isinstance(e, SegtrainError):
        return e
    if out_of_memory(e):
        return ResourceError(f"out of memory ({first_line(e, 80)}): rerun with fewer --workers, or on a larger machine")
    if isinstance(e, OSError) and e.filename:
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            return DataError(
                f"{e.filename}: {e.strerror} (a file is where a folder must be): move it, or pass another --root"
            )
        return output_error(e, e.filename) or e
    return e


def compose_config(overrides: list[str]) -> DictConfig:
    """The ``segtrain`` config for ``overrides`` (Hydra's compose API: no run dir, no logging set-up)."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as e:  # Hydra / OmegaConf: a misspelled key, an unknown option, a bad value
        raise ConfigError(
            f"{first_line(e, None)} (`segtrain --cfg job` prints every key, `segtrain --help` every option)"
        ) from None


def inspect(
    overrides: list[str], out: str | Path = "data_card.png", max_images: int | None = None, as_json: bool = False
) -> dict:
    """Compose the config, fingerprint the data, plan, print, write the card; returns {fingerprint, plan, card}."""
    # the data sets and their readers load when the data is inspected, not for --help
    from segtrain.data.card import card_samples, write_card
    from segtrain.data.fingerprint import MAX_IMAGES, compute_fingerprint, datasets_for, declared_classes, describe
    from segtrain.data.plan import describe_device, make_plan

    if not any(o.split("=", 1)[0] == "data" for o in overrides):
        raise ConfigError("name the data set: segtrain-data inspect data=NAME data.root=PATH [data.KEY=VALUE ...]")
    cfg = compose_config(overrides)
    d = cfg.data
    train, val = datasets_for(d, cfg.seed)
    fp = compute_fingerprint(
        train,
        val,
        name=str(d.name),
        in_channels=int(d.in_channels),
        ignore_index=int(d.ignore_index),
        max_images=max_images or MAX_IMAGES,
        declared=declared_classes(d) if d.name == "folder" else None,
    )
    device = describe_device(cfg.device, cfg.model, int(d.in_channels), int(d.num_classes))
    plan = make_plan(
        fp, d, cfg.loss, cfg.model, explicit_keys(overrides, [config_dir()]), device, cfg_trainer=cfg.trainer
    )
    root = d.get("root")
    title = f"data card: data={d.name}" + (f" data.root={root}" if root else "")
    path = write_card(fp, plan, card_samples(train if train is not None else val), out, title)
    if as_json:
        print(json.dumps({"fingerprint": fp, "plan": plan.to_dict(), "card": str(path)}))
    else:
        for line in describe(fp) + plan.lines():
            print(line)
        print(f"data card: {path}")
    sys.stdout.flush()
    return {"fingerprint": fp, "plan": plan, "card": path}


if __name__ == "__main__":
    sys.exit(main())
