"""stop_on_signals: the first signal asks the run to stop after its step, a second interrupts; handlers are put
back afterwards, and a run outside the main thread (the web app's worker) leaves signals alone."""

import os
import signal
import threading

import pytest

from conjure.train.control import TrainControl, stop_on_signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_a_second_interrupts(signum, capsys):
    control = TrainControl()
    before = signal.getsignal(signum)
    with stop_on_signals(control):
        os.kill(os.getpid(), signum)
        assert control.stop_reason == signal.Signals(signum).name
        assert "press Ctrl-C again" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before


def test_handlers_are_put_back_when_the_run_fails():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), stop_on_signals(TrainControl()):
        raise RuntimeError("the run failed")
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_signals_are_left_alone():
    seen = []

    def worker():
        with stop_on_signals(TrainControl()):
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]
