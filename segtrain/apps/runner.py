"""The runner of every Hydra command (``segtrain``, ``segtrain-eval``, ``-predict``, ``-export``, ``-info``).

``run_hydra_app(task, config_name, prog)`` composes the config (``segtrain [group=option ...] [key=value ...]``,
``-m`` for sweeps, ``--help`` for the groups) and runs ``task(cfg)`` as the job.  User errors (bad values, unknown keys or options, missing files) are printed
as one line of at most 300 characters, ``segtrain: error: ...``, with a non-zero exit and no
traceback; the full message and traceback go to the run dir's log file.  ``HYDRA_FULL_ERROR=1`` or
``trainer.debug_errors=true`` shows the traceback.  Console output that fails (a closed pipe, a full
disk) never stops a run (:mod:`segtrain.console`).

Only Hydra and OmegaConf are imported here: torch and the rest load inside the task functions, so
``--help`` answers at once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path

# Before albumentations is imported anywhere: it would otherwise check PyPI for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import atexit
import shlex
import shutil
import signal
import time

import hydra  # noqa: E402
import yaml
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from segtrain import (  # noqa: E402
    console,
    distributed,
    signals,  # noqa: E402
)
from segtrain.apps import sweep  # noqa: E402
from segtrain.apps.guard import Refused  # noqa: E402
from segtrain.apps.sweep import write_status  # noqa: E402
from segtrain.config import APP_SCHEMAS, config_dir, override, register_configs  # noqa: E402
from segtrain.config.validate import deletion_error, schema_keys, unknown_key  # noqa: E402
from segtrain.console import oom_message  # noqa: E402
from segtrain.errors import Preempted, SegtrainError, cause_chain  # noqa: E402

log = logging.getLogger("segtrain")


def _one_line(exc: BaseException) -> str:
    """Fold an exception (and Hydra/OmegaConf causes) into one informative line."""
    parts = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 3:
        text = str(e).strip()
        if text:
            full_key = re.search(r"full_key:\s*(\S+)", text)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
            msg = "; ".join(lines)
            msg = msg.replace("Available options in", "available options in")
            if full_key and full_key.group(1) not in msg:
                msg += f" (key: {full_key.group(1)})"
            if msg not in parts:
                parts.append(msg)
        e = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
    return ": ".join(parts) if parts else type(exc).__name__


def _user_message(exc: BaseException) -> str:
    """The message of a SegtrainError; one raised in a DataLoader worker arrives wrapped in its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def _hint(msg: str, prog: str = "segtrain") -> str:
    if "not in struct" in msg or "not in '" in msg or "Could not override" in msg:
        return f" (check the key's spelling: `{prog} --cfg job` prints every key)"
    if "no config '" in msg or "Could not load" in msg:
        return f" (`{prog} --help` lists every group and option)"
    return ""


def _missing_config(msg: str) -> str:
    """Hydra's 'Could not find' message, without the search path, options comma-separated."""
    m = re.search(r"Could not find '([^']+)'", msg)
    opts = re.search(r"Available options in '([^']+)':(.*?)(Config search path|$)", msg, re.S)
    if not m:
        return msg
    out = f"no config '{m.group(1)}'"
    if opts:
        names = [o.strip() for o in opts.group(2).split() if o.strip() and o.strip() != ";"]
        out += f"; options in '{opts.group(1)}': {', '.join(names)}"
    return out


def _off_node(msg: str) -> str:
    """``logger.wandb.project=x`` without ``logger=wandb``: OmegaConf cannot set a key below a null node."""
    keys = [a.split("=", 1)[0] for a in sys.argv[1:] if "=" in a and a.startswith("logger.")]
    if not keys:
        return msg
    backend = keys[0].split(".")[1]
    return (
        f"{keys[0]} is a key of the {backend} logger, which is off: add logger={backend} "
        f"(or several: 'logger=[tensorboard,{backend}]')"
    )


class _Failures:
    """Jobs of a sweep that failed (the others go on).

    Each job writes ``status.json`` in its dir; :meth:`report` reads those of the current sweep, so it
    works with launchers that run jobs in other processes (joblib, SLURM).  ``jobs`` (the failures of
    jobs run in this process) is the fallback when the sweep dir is unknown (no SweepSummary callback).
    """

    jobs: list[tuple[str, str]] = []

    @classmethod
    def report(cls, prog: str = "segtrain", summarise: bool = False) -> bool:
        """Print the failed jobs of this sweep (from their status.json) on one line; True if any.
        ``summarise``: also write the sweep summary (a sweep that stopped part-way skips the callback)."""

        current = sweep.current_sweep()
        if summarise and current:
            sweep.summarise(current[0])
        failures = (sweep.failed_jobs(*current) if current else []) or list(cls.jobs)
        if failures:
            msg = f"{len(failures)} job(s) of the sweep failed: " + "; ".join(f"[{n}] {m}" for n, m in failures)
            print(console.error_line(f"{prog}: error: ", msg), file=sys.stderr, flush=True)
        return bool(failures)


OUTPUT_ERRNOS = (  # disk full, quota, file size limit (ulimit -f), read-only, permissions, I/O, name too long
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ENAMETOOLONG,
)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError about a file (disk full, read-only, permissions ...) in ``exc``'s chain, if any."""
    files = (FileExistsError, NotADirectoryError)
    found = (
        e for e in cause_chain(exc) if isinstance(e, OSError) and (e.errno in OUTPUT_ERRNOS or isinstance(e, files))
    )
    return next(found, None)


def _multirun() -> bool:
    """Whether the command line asks for a sweep (``-m``)."""
    return bool({"-m", "--multirun"} & set(sys.argv[1:]))


def _file_error(err: OSError, in_job: bool) -> str:
    """The line for an OSError about a file (:func:`_os_error`): in a job (``in_job``), a file it could not write;
    before one, the run dir Hydra could not create or log into.  It names the path and the system's reason, and
    the fix: free space (a full disk or quota), or another run dir (``hydra.sweep.dir`` for a sweep)."""
    key = "hydra.sweep.dir" if _multirun() else "hydra.run.dir"
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit
    fix = f"free space, or change {key}" if err.errno in full else f"change {key}"
    if in_job:  # the whole path (error_line shortens it only where the line would pass 300 characters)
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {err.strerror or err}; {fix}"
    return f"cannot use {err.filename or 'the run dir'}: {err.strerror or err}; {fix}"


def _classify(exc: BaseException, cfg: DictConfig | None = None, prog: str = "segtrain") -> tuple[str, int]:
    """(message, exit code) for an exception that is not a SegtrainError."""
    memory = console.out_of_memory(exc)  # anywhere in any command: the settings that shrink prog's job
    if memory is not None:
        return oom_message(cfg, None, "", prog, memory), 5
    os_err = _os_error(exc)
    if os_err is not None:
        return _file_error(os_err, in_job=True), 4
    if type(exc).__module__.split(".")[0] == "omegaconf":  # a config value read by the task
        return f"{_one_line(exc)}{_hint(str(exc))}", 2
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        where = console.log_files()
        return (
            f"torch.compile failed ({type(exc).__name__}: {console.first_line(exc, 120, lines=2)}); set "
            f"device.compile=false (the compiler output is in {console.short_path(where[0], 60) if where else 'the log'})",
            2,
        )
    return f"{type(exc).__name__}: {_one_line(exc)} (set HYDRA_FULL_ERROR=1 for the traceback)", 1


def _stop_line(prefix: str, msg: str, err: BaseException) -> str:
    """:func:`console.error_line`, except that the resume command of a stop line (a Preempted error) is never
    shortened: a path cut to ``…/last/parts`` could not be pasted.  The part before it gives way instead."""
    head, sep, command = " ".join(msg.split()).partition("; resume with: ")
    if not isinstance(err, Preempted) or not sep or len(prefix) + len(head + sep + command) <= console.MAX_LINE:
        return console.error_line(prefix, msg, err)
    return console.error_line(prefix, head, err) + sep + command


def _guarded(task, full_errors: bool, prog: str):
    """Wrap a task: user errors become one line; in a sweep a failed job is recorded and the sweep goes on.

    ``task(cfg)`` returns the job's value (what a sweeper optimises) or ``(value, details)``, where the
    ``details`` dict goes into the job's ``status.json`` too."""

    def job(cfg: DictConfig):

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        distributed.launched()  # a SLURM task learns its RANK here (submitit), before status.json is written
        main_rank = distributed.env_rank() == 0
        start = time.perf_counter()

        def status(state: str, error: str | None, result=None, details=None) -> None:
            if main_rank:
                elapsed = time.perf_counter() - start
                write_status(hc.runtime.output_dir, state, error, list(hc.overrides.task), elapsed, result, details)

        def terminated(signum, frame):  # SIGTERM outside the training loop (which handles it): record, then die
            status("aborted", f"{signal.Signals(signum).name} outside the training loop")
            signals.die_of(signum)

        status("running", None)  # replaces an earlier run's record: status.json is always this run's
        with signals.Handling(terminated, [signal.SIGTERM]):
            try:
                result = task(cfg)
                result, details = result if isinstance(result, tuple) else (result, None)
                status("done", None, result, details)
                return result
            except SegtrainError as e:
                err, msg, code = e, _user_message(e), e.exit_code
                kind = "stopped" if isinstance(e, Preempted) else "error"  # resumable, not a failure of the config
            except KeyboardInterrupt:
                status("aborted", "interrupted")
                raise
            except Exception as e:  # a bug or an environment fault: one line, the trace on request
                err, kind = e, "error"
                msg, code = _classify(e, cfg, prog)
        line = _stop_line(f"{prog}: {kind}: ", msg, err)
        status("failed" if kind == "error" else "stopped", line.split(": ", 2)[-1])
        if full_errors or OmegaConf.select(cfg, "trainer.debug_errors", default=False):
            _DEBUG_ERRORS.append(True)  # run_hydra_app re-raises it too
            raise err
        by_signal = getattr(err, "by_signal", False)
        # Drop the error (its traceback holds the trainer): its loader workers, which ignore SIGTERM, must shut
        # down now; kept until exit, multiprocessing's exit handler would wait for them forever.
        err = None  # noqa: F841
        _job_failed(line, code, main_rank, multirun and not by_signal, str(hc.job.num) if multirun else "")
        return None  # not NaN: the optuna sweeper records None as a failed trial (NaN would abort the study)

    job.__name__ = getattr(task, "__name__", "job")
    job.__module__ = getattr(task, "__module__", __name__)
    return job


_DEBUG_ERRORS: list[bool] = []  # set when a job's config asked for tracebacks (trainer.debug_errors)


def _job_failed(line: str, code: int, main_rank: bool, sweep_goes_on: bool, job_num: str) -> None:
    """Say a job's error (rank 0; the other ranks log it), then exit with its code, or, in a sweep that goes
    on, record it.  A signal (Ctrl-C, a scheduler's SIGTERM or SIGUSR2) stops the whole sweep: its summary
    so far is written, and no later job starts."""
    if main_rank:
        print(line, file=sys.stderr, flush=True)
    else:
        log.error("%s", line)
    if not sweep_goes_on:
        if sweep.current_sweep():
            sweep.summarise(sweep.current_sweep()[0])
        raise SystemExit(code)
    log.error("job failed: %s", line)
    _Failures.jobs.append((job_num, line.split(": ", 2)[-1]))


def _groups(config_name: str) -> list[str]:
    """The config groups of a command's primary config (its defaults list, Hydra's own aside)."""

    try:
        defaults = yaml.safe_load((Path(config_dir()) / f"{config_name}.yaml").read_text()).get("defaults", [])
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [k for d in defaults if isinstance(d, dict) for k in d if not k.startswith("override ")]


def _no_group(group: str, msg: str, prog: str, config_name: str) -> str:
    """``segtrain-eval model=fcn``: a group the command does not have (Hydra would advise ``+model=fcn``)."""
    arg = next((a for a in sys.argv[1:] if a.lstrip("+~").split("=", 1)[0] == group), group)
    if prog != "segtrain" and group in ("model", "optimizer", "scheduler", "loss"):
        return f"{prog} takes the {group} from the checkpoint, so it has no {group} option: drop {arg}"
    groups = ", ".join(_groups(config_name)) or "none"
    return f"{prog} has no config group {group} (its groups: {groups}); drop {arg} (`{prog} --help` lists them)"


def _unquoted(multirun: bool) -> str | None:
    """The line for the first argument Hydra cannot read as one value (spaces with '=', ',', '#', quotes,
    non-ASCII letters): its key and the quoting that works."""

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            continue
        quoted = shlex.quote(override(key, value))
        try:
            if not parser.parse_override(arg).is_sweep_override() or multirun:
                continue
            return (
                f"{arg} gives {key.lstrip('+~')} several values (a sweep): add -m to run one job per value, or quote "
                f"it to keep it one value: {quoted}"
            )
        except Exception:  # noqa: BLE001 - any parse error: this is the argument
            pass
        return (
            f"cannot read the value of {key.lstrip('+~')}: with spaces, '=', ',', '#', quotes or non-ASCII letters "
            f"it needs quotes: {quoted} (single quotes for the shell, double for Hydra)"
        )
    return None


def _split_value(key: str) -> str:
    """``hydra.run.dir=runs/my run=1`` unquoted: the shell passes ``run=1`` as an argument of its own."""

    args = sys.argv[1:]
    i = next((i for i, a in enumerate(args) if a.lstrip("+").partition("=")[0] == key), 0)
    if "." in key or i == 0 or "=" not in args[i - 1] or args[i - 1].startswith("-"):
        return ""
    k, _, v = args[i - 1].partition("=")
    if "/" not in v:  # only a path is likely to hold a space
        return ""
    return f"; or, if {args[i]} is part of {k}, quote the whole value: {shlex.quote(override(k, f'{v} {args[i]}'))}"


_KINDS = {"Integer": "an integer", "Float": "a number", "String": "a string", "Boolean": "true or false"}


def _type_error(msg: str) -> str | None:
    """OmegaConf's type errors of an override, naming the key and what it takes."""
    m = re.search(r"Error merging override ([^=\s]+)=(.*?): (.*?) \(key: [^)]*\)$", msg)
    if not m:
        return None
    key, given, why = m.groups()
    conv = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", why)
    if conv:
        value, typ, target = conv.groups()
        fix = ""
        if target == "Integer" and typ == "float" and re.fullmatch(r"[\d.]+(e\+?\d+)?", value.lower()):
            fix = f"; write {key}={int(float(value))}" if float(value).is_integer() else ""
        return f"{key} must be {_KINDS.get(target, target.lower())}, got {given} (read as {typ}){fix}"
    if "is not a valid bool" in why:
        return f"{key} must be true or false, got {given}"
    if "is not a ListConfig, list or tuple" in why:
        return f"{key} must be a list such as [a, b], got {given}"
    if "is not a subclass of" in why or "is not a DictConfig" in why:
        return f"{key} must be a group of keys such as {{a: 1}}, got {given}"
    options = re.search(r"Invalid value '.*', expected one of \[(.*)\]", why)
    if options:
        return f"{key} must be one of {options.group(1)}, got {given}"
    return None


def _override_error(exc: Exception, msg: str, prog: str, config_name: str) -> str | None:
    """Hydra's and OmegaConf's errors about one override, in segtrain's words (None: not one of them).
    Never Hydra's advice to add a key with +KEY=VALUE: the config takes no key of its own (check_keys)."""

    multirun = _multirun()
    if type(exc).__name__ == "OverrideParseException" or (not multirun and "Ambiguous value for argument" in msg):
        return _unquoted(multirun)
    m = re.search(r"Could not override '([^']+)'\.? ?;? ?No match in the defaults list", msg)
    if m:
        return _no_group(m.group(1), msg, prog, config_name)
    m = re.search(r"Could not override '([^']+)'", msg)
    if m and config_name in APP_SCHEMAS:
        full = re.search(r"\(key: ([^)\s]+)\)", msg)  # optimizer={a:1}: the key inside, optimizer.a
        key = full.group(1) if full else m.group(1)
        if key not in schema_keys(APP_SCHEMAS[config_name]):
            return unknown_key(key, APP_SCHEMAS[config_name]) + _split_value(key)
        return re.sub(r";? ?To append to your config use \S+", "", msg)
    m = re.search(r"Could not delete from config\. (?:'([^']+)' does not exist|The value of '([^']+)')", msg)
    deleted = re.search(r"Error merging override ~([^\s=:]+)", msg)  # a typed node refuses the deletion itself
    if m or deleted:
        key = deleted.group(1) if deleted else m.group(1) or m.group(2)
        return deletion_error(next((a for a in sys.argv[1:] if a.startswith(f"~{key}")), f"~{key}"))
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", msg)
    if m:
        return f"{m.group(1)} is set already: give {m.group(1)}=VALUE (a + in front would add a key)"
    if "Additional config directory" in msg:
        return f"{msg}; give --config-dir (-cd) an existing dir of YAML configs, or drop it"
    m = re.search(r"Cannot find primary config '([^']+)'", msg)
    if m:
        return f"no primary config '{m.group(1)}' (--config-name) in the config search path; drop --config-name"
    return _type_error(msg)


def _app_failed(exc: Exception, prog: str, config_name: str = "config") -> int:
    """Print the one line for an error outside the task (composition, run dir); its exit code."""
    better = None
    if not isinstance(exc, SegtrainError) and _os_error(exc) is None:
        better = _override_error(exc, _one_line(exc), prog, config_name)
    if better:
        msg, code = better, 2
    elif isinstance(exc, SegtrainError):
        msg, code = _user_message(exc), exc.exit_code
    elif _os_error(exc) is not None:  # Hydra could not create the run dir or its log file
        msg, code = _file_error(_os_error(exc), in_job=False), 4
    else:
        msg = _one_line(exc)
        if "Could not find" in msg:
            msg = _missing_config(str(exc))
        user_error = type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")
        if "Unexpected type for root: NoneType" in msg:  # a key inside a node that is off (null)
            msg, user_error = _off_node(msg), True
        if not user_error:
            msg = f"{type(exc).__name__}: {msg} (set HYDRA_FULL_ERROR=1 for the traceback)"
        msg, code = msg + _hint(msg, prog), 2 if user_error else 1
    print(console.error_line(f"{prog}: error: ", msg), file=sys.stderr, flush=True)
    return code


def _speed_up_help() -> None:
    """Hydra's ``--help`` lists every config group through a fresh deep copy of the whole config repository
    per group (about 100 copies, seconds on a small CPU); one copy serves them all, with the same result."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl  # Hydra's internals: only to speed up --help

        original = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    except (ImportError, AttributeError):  # another Hydra version: keep its own way
        return
    cache: dict = {}

    def shared(self, config_name, overrides):
        if overrides:
            return original(self, config_name, overrides)
        key = (id(self), config_name)
        if key not in cache:
            cache[key] = original(self, config_name, overrides)
        return cache[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = shared


def run_hydra_app(task, config_name: str = "config", prog: str = "segtrain") -> None:
    """Run ``task`` as a Hydra app with segtrain's error handling; ``prog`` prefixes its error lines."""
    console.protect_std_streams()
    logging.raiseExceptions = False  # a log file on a full disk: records are dropped, not tracebacks printed
    register_configs()
    if any(a in ("--help", "-h", "--hydra-help") for a in sys.argv[1:]):
        _speed_up_help()

    scratch = distributed.scratch_run_dir()
    if scratch:  # torchrun rank > 0: Hydra works in a throw-away dir, rank 0 owns the run dir and the logs
        sys.argv += [
            f"hydra.run.dir={scratch}",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
        atexit.register(shutil.rmtree, scratch, True)
    argv_debug = any(a.replace(" ", "").lower() == "trainer.debug_errors=true" for a in sys.argv)
    full_errors = os.environ.get("HYDRA_FULL_ERROR") == "1" or argv_debug
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print the one-line message
    job = _guarded(task, full_errors, prog)
    app = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(job)
    try:
        app()
    except Refused as e:  # a config mistake, or a run dir that cannot be used: Hydra wrote nothing there
        if full_errors:
            raise e.error from None
        print(console.error_line(f"{prog}: error: ", _user_message(e.error)), file=sys.stderr, flush=True)
        sys.exit(e.error.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # Hydra/OmegaConf composition errors, the run-dir guard
        if full_errors or _DEBUG_ERRORS:
            raise
        _Failures.report(prog, summarise=True)  # a sweep stopped part-way: what its jobs did so far
        sys.exit(_app_failed(e, prog, config_name))
    if _Failures.report(prog):
        sys.exit(1)


def command(task, config_name: str, prog: str):
    """The console-script entry point of a Hydra app: ``main = command(task, "eval", "segtrain-eval")``."""

    def main() -> None:
        run_hydra_app(task, config_name=config_name, prog=prog)

    main.__doc__ = f"``{prog}``"
    return main
