"""Accuracy kept by a latency budget on the digits CNN, before any fine-tuning (issue 17's digits row).

    .venv/bin/python bench/bench_digits_latency.py [--budgets 0.5 0.7] [--batches 1 64] [--threads 2]

The 5-conv digits CNN of bench/_digits.py (trained once, cached in bench/_cache/), decomposed with
`decompose(model, budget=B, budget_on='latency', method=M, data=<512 training images>, input_shape=(batch, 1, 32, 32))`
for M in tucker and auto. Reported per row: the validation accuracy (360 images) and its drop in points, the
measured share of the dense latency (the call's own end-to-end check, and a re-timing here, interleaved with the
dense model), and the decomposition time. Writes bench/results/digits_latency.json.
"""
import argparse, json, sys, time, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--budgets', type=float, nargs='+', default=[0.5, 0.7])
p.add_argument('--batches', type=int, nargs='+', default=[1, 64])
p.add_argument('--methods', nargs='+', default=['tucker', 'auto'])
p.add_argument('--threads', type=int, default=2)
p.add_argument('--knee-tols', type=float, nargs='+', default=None,
               help='run each cell with budget.KNEE_TOL set to each of these (0: keep the fastest plan found, the rule '
                    'before the knee; default: the library\'s own only)')
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'digits_latency.json'))
ARGS = p.parse_args()

import torch
torch.set_num_threads(ARGS.threads)
from _digits import digits_tensors, trained_cnn
from fasterai.decompose.all import *
from fasterai.demo import model_macs
from fasterai.decompose.latency import model_ms
from fasterai.decompose import budget as B

xt, yt, xv, yv = digits_tensors()
model = trained_cnn(xt, yt)

@torch.no_grad()
def acc(m): return (m.eval()(xv).argmax(1) == yv).float().mean().item()

base, rows = acc(model), []
print(f'dense accuracy {base:.4f}')
for bs in ARGS.batches:
    x = torch.randn(bs, 1, 32, 32)
    for b in ARGS.budgets:
        for meth, knee in [(m, k) for m in ARGS.methods for k in (ARGS.knee_tols or [B.KNEE_TOL])]:
            B.KNEE_TOL = knee
            d, t = Budget_Decomposer(), time.time()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                out = d.decompose(model, budget=b, budget_on='latency', method=meth, data=[xt[:512]], n_batches=1,
                                  input_shape=tuple(x.shape), verbose=False)
            secs = time.time() - t
            dense_ms, ms = model_ms([model, out], x, min_time=0.5)
            r = dict(batch=bs, budget=b, method=meth, knee_tol=knee, fastest_share_in_call=d.latency.get('fastest_share'),
                     mac_ratio=model_macs(model, tuple(x.shape)) / model_macs(out, tuple(x.shape)), accuracy=acc(out), drop_points=100 * (base - acc(out)),
                     measured_share_in_call=d.latency['measured_share'], measured_share=ms / dense_ms, dense_ms=dense_ms,
                     ms=ms, calibration=d.calibration, decompose_s=secs,
                     ranks={n: str(r) for n, r in zip(d.report.name, d.report.ranks) if r == r},
                     warnings=[str(x.message)[:200] for x in w if 'latency' in str(x.message)])
            rows.append(r)
            print(f"batch {bs:3d} budget {b:.2f} {meth:6s} knee {knee:.2f}: MACs ÷{r['mac_ratio']:.2f} accuracy {r['accuracy']:.4f} (drop {r['drop_points']:.2f} points); "
                  f"latency {100 * r['measured_share_in_call']:.0f}% in the call, {100 * r['measured_share']:.0f}% re-timed "
                  f"({dense_ms:.2f} → {ms:.2f} ms); {secs:.0f} s", flush=True)
Path(ARGS.out).write_text(json.dumps(dict(env=_env.env_info(), args=vars(ARGS), dense_accuracy=base, rows=rows), indent=1))
