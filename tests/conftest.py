import os

# Worker threads that sleep instead of spinning: the suite starts several processes (distributed tests) on few
# cores, where spinning OpenMP threads slow every parallel torch op 10-60x. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def isolated_cli():
    """For modules that run the CLI in-process: one torch thread, and the "lcompress" logger put back as it was
    after the CLI configured it."""
    import synthetic as S

    with S.one_thread(), S.cli_logging_restored():
        yield


def brute_force_min(candidates, objective):
    """Smallest objective over an iterable of candidates (test helper for independent references)."""
    best = None
    for c in candidates:
        v = objective(c)
        if best is None or v < best:
            best = v
    return best
