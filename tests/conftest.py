"Shared fixtures: every test runs with the thread count `make test-threads` asks for (1 by default)."
import pytest, torch
from fasterai.testing import env_threads


@pytest.fixture(autouse=True, scope='session')
def _test_threads():
    "`FASTERAI_TEST_THREADS` intra-op threads (default 1: tiny tensors run many times faster on one thread of a busy 2-core machine)."
    n = torch.get_num_threads()
    env_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_speed_timing(request):
    """Which blocks `min_speedup='auto'` keeps depends on this machine's timings, and the tests check the math: the
    timing is off (`core.NEVER_SLOWER = False`) except in tests marked `never_slower`, which test that default."""
    from fasterai.decompose import core
    was = core.NEVER_SLOWER
    core.NEVER_SLOWER = request.node.get_closest_marker('never_slower') is not None
    yield
    core.NEVER_SLOWER = was
