"""A stop never splits a section the search holds: the signal is raised when the section ends."""
import os
import signal

import pytest

from evolve.signals import SignalGuard, Stopped, held


@pytest.fixture
def guard():
    g = SignalGuard(log=lambda m: None)
    g.install()
    yield g
    g.restore()


def test_a_signal_outside_a_held_section_stops_at_once(guard):
    with pytest.raises(Stopped) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):     # the handler runs between bytecodes, well before this ends
            pass
        pytest.fail("the signal was not raised")
    assert e.value.exit_code == 143


def test_a_signal_inside_a_held_section_waits_for_its_end(guard):
    done = []
    with pytest.raises(Stopped) as e:
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            for step in range(1000):
                done.append(step)
    assert len(done) == 1000            # the whole section ran
    assert e.value.exit_code == 130
    assert guard.pending is None and guard.count == 1


def test_nested_sections_raise_when_the_outermost_ends(guard):
    order = []
    with pytest.raises(Stopped):
        with held():
            with held():
                os.kill(os.getpid(), signal.SIGTERM)
                order.append("inner")
            order.append("outer")
    assert order == ["inner", "outer"]


def test_held_without_a_guard_is_a_plain_section():
    with held():
        value = 1
    assert value == 1
