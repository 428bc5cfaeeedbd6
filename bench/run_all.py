"""Run every benchmark in turn (`make bench`); each writes its JSON to bench/results/ and prints its own tables.

    .venv/bin/python bench/run_all.py [--only speed latency digits minilm nuclear]
Benchmarks time things: run them on an otherwise idle machine (see bench/README.md)."""
import argparse, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {'speed': ['bench_speed.py'], 'latency': ['bench_latency.py'], 'digits': ['bench_digits.py'],
           'minilm': ['bench_minilm.py'], 'nuclear': ['bench_nuclear.py']}

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='*', choices=list(BENCHES), default=list(BENCHES))
    args = p.parse_args()
    failed = []
    for name in args.only:
        cmd = [sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]]
        print(f'\n=== {name}: {" ".join(cmd)}', flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent, env={**__import__('os').environ, 'PYTHONPATH': str(HERE.parent)})
        print(f'=== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s', flush=True)
        if rc: failed.append(name)
    if failed: sys.exit(f'failed: {", ".join(failed)}')

if __name__ == '__main__': main()
