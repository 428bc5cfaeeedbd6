"""What every benchmark records beside its numbers: versions, machine, threads, load, git state."""
import os, platform, subprocess, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]

def git(*args):
    "Output of a git command in the repository, or None."
    try: return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception: return None

def cpu_name():
    if not Path('/proc/cpuinfo').exists(): return platform.processor()
    return next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())

def env_info(**versions):
    "The environment as a dict; `versions` adds package versions (e.g. `torchvision=torchvision.__version__`)."
    return dict(torch=torch.__version__, **versions, python=platform.python_version(), cpu=cpu_name(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', '(unset)'),
                openblas_threads=os.environ.get('OPENBLAS_NUM_THREADS'), loadavg_start=os.getloadavg(),
                git_head=git('rev-parse', 'HEAD'), git_dirty=bool(git('status', '--porcelain')), time=time.strftime('%Y-%m-%d %H:%M:%S'))
