"""Speed bought per MAC removed: the default Tucker cut against budget_on='latency', end to end.

Run from the repository root:  .venv/bin/python bench/bench_latency_budget.py [--models resnet18 resnet50 vgg16_bn mobilenet_v2]
                               [--batches 1] [--runtimes eager] [--budget 0.5] [--threads 2]

For each torchvision model (weights=None, eval, 3×224×224) and batch size: (a) `Conv_Decomposer().decompose(model,
method='tucker', percent_removed=0.5)`, the default call; (b) `decompose(model, budget=B, budget_on='latency',
method='tucker', fc=False, input_shape=..., runtime=R)`. Dense and decomposed are timed in one process, interleaved
(`fasterai.decompose.latency.model_ms`: fastest of rounds, repeated until stable), in the runtime R. Reported: the MAC
ratio (dense / decomposed, torch's FLOP counter via `fasterai.demo.model_macs`), the speed ratio (dense ms / decomposed ms) and the share
of the MAC ratio reached (speed ratio / MAC ratio); for (b) also the target and the measured share of dense latency.
Writes bench/results/latency_budget.json.
"""
from __future__ import annotations
import argparse, json, sys, time, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--models', nargs='+', default=['resnet18', 'resnet50', 'vgg16_bn', 'mobilenet_v2'])
p.add_argument('--batches', type=int, nargs='+', default=[1])
p.add_argument('--runtimes', nargs='+', default=['eager'])
p.add_argument('--budget', type=float, default=0.5)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'latency_budget.json'))
ARGS = p.parse_args()

import torch, torchvision
from torch import nn
torch.set_num_threads(ARGS.threads)
warnings.simplefilter('ignore')
from fasterai.decompose.all import *
from fasterai.decompose.latency import model_ms
from fasterai.demo import model_macs

def macs(model, x): return model_macs(model, tuple(x.shape))

rows = []
for name in ARGS.models:
    dense = getattr(torchvision.models, name)().eval()
    for bs in ARGS.batches:
        x = torch.randn(bs, 3, 224, 224)
        for rt in ARGS.runtimes:
            t = time.time()
            a = Conv_Decomposer().decompose(dense, method='tucker', percent_removed=0.5, verbose=False)
            ta = time.time() - t
            d = Budget_Decomposer(); t = time.time()
            b = d.decompose(dense, budget=ARGS.budget, budget_on='latency', method='tucker', fc=False,
                            input_shape=tuple(x.shape), runtime=rt, verbose=False)
            tb = time.time() - t
            ms_d, ms_a, ms_b = model_ms([dense, a, b], x, rt, min_time=0.5)
            md, ma, mb = macs(dense, x), macs(a, x), macs(b, x)
            for cfg, ms, mc, secs in [('(a) tucker 0.5', ms_a, ma, ta), (f'(b) latency budget {ARGS.budget}', ms_b, mb, tb)]:
                r = dict(model=name, batch=bs, runtime=rt, config=cfg, dense_ms=ms_d, ms=ms, mac_ratio=md / mc,
                         speed_ratio=ms_d / ms, share_of_mac_ratio=(ms_d / ms) / (md / mc), decompose_s=secs)
                if cfg.startswith('(b)'): r.update(target_share=ARGS.budget, measured_share_in_call=d.latency['measured_share'],
                                                   measured_share=ms / ms_d)
                rows.append(r)
                print(f"{name:14s} b{bs} {rt:11s} {cfg:24s} MACs ÷{md / mc:.2f}  speed ×{ms_d / ms:.2f}  "
                      f"share {100 * (ms_d / ms) / (md / mc):.0f}%  ({ms_d:.1f} → {ms:.1f} ms; decompose {secs:.0f} s)", flush=True)

Path(ARGS.out).write_text(json.dumps(dict(env=_env.env_info(torchvision=torchvision.__version__), args=vars(ARGS), rows=rows), indent=1))
