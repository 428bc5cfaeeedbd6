"""Decomposition time on a busy machine: resnet18 Tucker, idle and with other processes filling every core.

    .venv/bin/python bench/bench_busy.py [--repeats 5] [--threads 2]

`Conv_Decomposer().decompose(resnet18(weights=None), method='tucker', percent_removed=0.5)` (weights only, no
timing: the cost of the factorizations themselves), timed `--repeats` times on the idle machine, then again while
`os.cpu_count()` other processes each keep one core busy (pure Python loops; a training job's DataLoader workers
and step, say). Reported: the median wall time of each, and their ratio (issue 17: at most 3×). The
decomposers work on one thread while the machine is busy (`core.calm_threads`): the busy run is also made with that
turned off (`FASTERAI_BUSY_OFF=1` in a child process) to show what it saves; and independent layers are factored side
by side, one thread each (`core.PARALLEL_LAYERS`): idle and busy runs are also made one layer after the other
(`FASTERAI_SEQUENTIAL=1`) to show what that saves. Writes bench/results/busy.json.
"""
import argparse, json, multiprocessing as mp, os, statistics, subprocess, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--repeats', type=int, default=5)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'busy.json'))
p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
ARGS = p.parse_args()

def spin(stop):
    "One thread kept busy (pure Python: no BLAS pool whose thread count could differ between machines)."
    x = 1.0
    while not stop.is_set():
        for _ in range(10000): x = (x * 1.000001) % 7.0

def decompose_times(n):
    import torch, torchvision, warnings
    torch.set_num_threads(ARGS.threads)
    warnings.simplefilter('ignore')
    from fasterai.decompose import core
    from fasterai.decompose.all import Conv_Decomposer
    if os.environ.get('FASTERAI_BUSY_OFF'): core.machine_busy = lambda: False      # the behaviour before calm_threads
    if os.environ.get('FASTERAI_SEQUENTIAL'): core.PARALLEL_LAYERS = False           # one layer after the other
    m = torchvision.models.resnet18().eval()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        Conv_Decomposer().decompose(m, method='tucker', percent_removed=0.5, min_speedup=None, verbose=False)
        out.append(time.perf_counter() - t)
    return out

if ARGS.child:
    print(json.dumps(decompose_times(ARGS.repeats))); sys.exit()

def child(env=None):
    r = subprocess.run([sys.executable, __file__, '--child', '--repeats', str(ARGS.repeats), '--threads', str(ARGS.threads)],
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])

import _env
res = dict(env=_env.env_info(), args=vars(ARGS))
res['idle_s'] = child()
res['idle_sequential_s'] = child({'FASTERAI_SEQUENTIAL': '1'})
stop = mp.Event()
procs = [mp.Process(target=spin, args=(stop,)) for _ in range(os.cpu_count() or 2)]
for q in procs: q.start()
try:
    time.sleep(1)
    res['busy_s'] = child()
    res['busy_sequential_s'] = child({'FASTERAI_SEQUENTIAL': '1'})
    res['busy_without_calm_threads_s'] = child({'FASTERAI_BUSY_OFF': '1', 'FASTERAI_SEQUENTIAL': '1'})
finally:
    stop.set()
    for q in procs: q.join()
keys = ('idle_s', 'idle_sequential_s', 'busy_s', 'busy_sequential_s', 'busy_without_calm_threads_s')
med = {k: statistics.median(res[k]) for k in keys}
res['median_s'], res['busy_over_idle'] = med, med['busy_s'] / med['idle_s']
res['busy_over_idle_sequential'] = med['busy_sequential_s'] / med['idle_sequential_s']
print(f"resnet18 tucker decompose: idle {med['idle_s']:.2f} s, busy {med['busy_s']:.2f} s ({res['busy_over_idle']:.1f}×); "
      f"one layer after the other: idle {med['idle_sequential_s']:.2f} s, busy {med['busy_sequential_s']:.2f} s "
      f"({res['busy_over_idle_sequential']:.1f}×); busy, sequential, without calm_threads "
      f"{med['busy_without_calm_threads_s']:.2f} s")
Path(ARGS.out).write_text(json.dumps(res, indent=1))
