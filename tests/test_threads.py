"""The C step's torch thread count: one thread for small tasks or busy cores, the user's setting restored."""
import os

import pytest
import torch

import lcompress as lc
from lcompress import _threads
from lcompress.compressions.base import Compression


class _Probe(Compression):
    """Records the thread count its C step ran with; optionally fails."""

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.seen = []

    def _compress(self, w, mu):
        self.seen.append(torch.get_num_threads())
        if self.fail:
            raise RuntimeError("probe failure")
        self._theta = {"w": w.clone()}
        return w.clone()

    def _decompress(self):
        return self._theta["w"]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_task_runs_on_one_thread_and_restores(two_threads):
    p = _Probe()
    p.compress(torch.randn(1000))
    assert p.seen == [1]
    assert torch.get_num_threads() == 2


def test_threads_restored_after_an_error(two_threads):
    p = _Probe(fail=True)
    with pytest.raises(RuntimeError, match="probe failure"):
        p.compress(torch.randn(1000))
    assert p.seen == [1]
    assert torch.get_num_threads() == 2
    # and the next C step still runs normally
    q = _Probe()
    q.compress(torch.randn(10))
    assert q.seen == [1] and torch.get_num_threads() == 2


def test_large_task_keeps_threads_when_cpus_are_free(two_threads, monkeypatch):
    monkeypatch.setattr(_threads, "free_cpus", lambda: 8)
    p = _Probe()
    p.compress(torch.randn(_threads.SMALL_TASK))
    assert p.seen == [2]
    monkeypatch.setattr(_threads, "free_cpus", lambda: None)  # unknown: the user's setting
    p.compress(torch.randn(_threads.SMALL_TASK))
    assert p.seen == [2, 2]


def test_large_task_on_busy_cores_runs_on_fewer_threads(two_threads, monkeypatch):
    monkeypatch.setattr(_threads, "free_cpus", lambda: 0)
    p = _Probe()
    p.compress(torch.randn(_threads.SMALL_TASK))
    assert p.seen == [1]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(4)
    monkeypatch.setattr(_threads, "free_cpus", lambda: 3)
    p.compress(torch.randn(_threads.SMALL_TASK))
    assert p.seen == [1, 3]
    assert torch.get_num_threads() == 4


def test_parts_of_a_sum_keep_the_outer_choice(two_threads, monkeypatch):
    calls = []
    real = _threads._threads_for

    def counting(numel, current):
        calls.append(numel)
        return real(numel, current)

    monkeypatch.setattr(_threads, "_threads_for", counting)
    a, b = _Probe(), _Probe()
    s = a + b
    s.compress(torch.randn(500))
    assert calls == [500]  # decided once, by the sum
    assert set(a.seen) == {1} and set(b.seen) == {1}
    assert torch.get_num_threads() == 2


def test_one_thread_setting_and_other_devices_left_alone(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p = _Probe()
        p.compress(torch.randn(100))
        assert p.seen == [1] and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        with _threads.c_step_threads(10, device="meta") as n:
            assert n == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_free_cpus_subtracts_this_process(monkeypatch):
    cpus = _threads._cpus()
    reads = {"/proc/loadavg": b"0.50 0.40 0.30 5/321 4242\n"}
    monkeypatch.setattr(_threads, "_read", lambda path: reads[path])
    monkeypatch.setattr(_threads, "_own_running_threads", lambda: 2)
    assert _threads.free_cpus() == max(0, cpus - 3)  # 5 running, 2 of them ours
    reads["/proc/loadavg"] = b"0.50 0.40 0.30 1/321 4242\n"
    assert _threads.free_cpus() == cpus
    reads["/proc/loadavg"] = b"garbage"
    assert _threads.free_cpus() is None


def test_free_cpus_on_this_machine():
    # this thread is running while it reads its own state
    assert _threads._own_running_threads() >= 1
    free = _threads.free_cpus()
    if os.path.exists("/proc/loadavg"):
        assert free is not None and 0 <= free <= _threads._cpus()
    else:
        assert free is None


def test_lc_c_step_restores_threads(two_threads):
    model = torch.nn.Linear(20, 10)
    alg = lc.LC(model, {"weight": lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(kappa=5)})
    alg.c_step(1e-3)
    assert torch.get_num_threads() == 2
