"`calm_threads`: one thread for torch and SciPy's BLAS while the machine is busy, and every count put back after."
import torch
from fasterai.decompose import core


def test_busy_machine_gets_one_thread_and_everything_comes_back(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(core, 'machine_busy', lambda: True)
        with core.calm_threads() as calm:
            assert calm and torch.get_num_threads() == 1
            try:
                from threadpoolctl import threadpool_info
                assert all(i['num_threads'] == 1 for i in threadpool_info() if i['user_api'] == 'blas')
            except ImportError: pass
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(core, 'machine_busy', lambda: False)
        with core.calm_threads() as calm: assert not calm and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
