"""benchmarks/_one_gpu.py's account of the threads' CPU over the timed steps."""

import sys
import threading
import time

import pytest

from benchmarks._one_gpu import thread_times, thread_use


def test_each_step_is_charged_its_main_thread_and_its_busiest_other_thread():
    main = threading.main_thread().native_id
    before = {main: ("python", 1.0, 0.1, 3), 7: ("pt_autograd_0", 2.0, 0.0, 0), 8: ("ZMQbg/IO/0", 0.5, 0.0, 1)}
    after = {main: ("python", 1.2, 0.14, 5), 7: ("pt_autograd_0", 2.3, 0.02, 2), 8: ("ZMQbg/IO/0", 0.51, 0.0, 1),
             9: ("ps-heartbeat", 0.01, 0.0, 0)}  # a thread started meanwhile counts from zero
    use = thread_use(before, after, steps=10)
    assert use["main cpu ms/step"] == pytest.approx(20.0)
    assert use["main runqueue ms/step"] == pytest.approx(4.0)
    assert use["main preempted/step"] == pytest.approx(0.2)
    assert use["busiest other"] == "pt_autograd_0"
    assert use["other cpu ms/step"] == pytest.approx(30.0)
    assert use["other preempted/step"] == pytest.approx(0.2)
    assert use["process cpu ms/step"] == pytest.approx((0.2 + 0.3 + 0.01 + 0.01) * 1e3 / 10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_thread_that_spins_shows_its_cpu_time():
    before = thread_times()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    use = thread_use(before, thread_times(), steps=1)
    assert use["main cpu ms/step"] > 100  # the clock ticks are 10 ms at the coarsest
