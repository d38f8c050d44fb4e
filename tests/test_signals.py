"""segtrain.signals: each handler restores the one before it, SIGTERM raised as Ctrl-C, dying of a signal,
and the worker processes' handlers.  (The training loop's StopSignals: tests/test_runtime.py; Interrupts in
the commands: tests/test_export.py, tests/test_predict.py; segtrain-data's SIGTERM: tests/test_prepare.py.)"""

import signal
import subprocess
import sys
import threading

import pytest

from segtrain import signals


def test_as_interrupt_raises_the_signal_as_ctrl_c_and_restores_the_handler_before():
    def before(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt) as caught, signals.AsInterrupt():
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(caught.value, signals.Interrupted) and caught.value.signum == signal.SIGTERM
        assert str(caught.value) == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_ignored_signal_stays_ignored_where_asked():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.Interrupts("prog") as guard:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.SIGINT not in guard.previous
            assert signal.getsignal(signal.SIGTERM) == guard.handle
        with signals.AsInterrupt([signal.SIGINT]):  # segtrain-data's SIGTERM: installed whatever was there
            assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def other():
        with signals.Handling(lambda s, f: None, [signal.SIGTERM]) as scope:
            seen.append(scope.previous)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [{}]


def test_a_handler_records_then_the_process_dies_of_the_signal():
    code = """
import signal, sys, time
from segtrain import signals
def record(signum, frame):
    print("recorded", signal.Signals(signum).name, flush=True)
    signals.die_of(signum)
with signals.Handling(record):
    signal.raise_signal(signal.SIGTERM)
    time.sleep(5)
print("still alive", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "recorded SIGTERM" and proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize(
    "call, expected",
    [
        ("worker_signals()", "SIG_IGN SIG_IGN"),  # a training loader's worker
        ("worker_signals(sigterm=signal.SIG_DFL)", "SIG_DFL SIG_IGN"),  # a prediction loader's
        ("worker_signals(signal.SIG_DFL, None)", "SIG_DFL inherited"),  # a segtrain-data conversion worker's
    ],
)
def test_worker_signals_replace_the_inherited_handlers(call, expected):
    code = f"""
import signal
from segtrain import signals
def inherited(signum, frame):
    pass
signal.signal(signal.SIGINT, inherited)
signal.signal(signal.SIGTERM, inherited)
signals.{call}
name = lambda h: "inherited" if h is inherited else h.name
print(name(signal.getsignal(signal.SIGTERM)), name(signal.getsignal(signal.SIGINT)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == expected, proc.stderr
