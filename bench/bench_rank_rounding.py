"""Do ranks that are multiples of 8, 16 or 32 make blocks faster on this CPU?

Run from the repository root:  .venv/bin/python bench/bench_rank_rounding.py [--threads 2] [--batch 1]

For the 3×3 convs of resnet50 and vgg16_bn at their own input sizes (batch 1 by default), a Tucker-2 block is built at
ranks r = (R, R) for every R from a multiple of 32 down by 1 to the multiple of 32 below (R = 96..64, 64..32, ...
around half of the layer's ranks) and timed with `fasterai.decompose.core.time_ms` (interleaved, fastest of rounds,
until stable). Reported per layer, over the R that are not multiples of q = 8, 16, 32: the median of t(R rounded up to a multiple
of q) / t(R), below 1 when the multiple is faster despite its larger rank (the kernels like it), and the median of
t(R rounded down) / t(R), what rounding down saves (compare with the MACs it removes).
Writes bench/results/rank_rounding.json.
"""
from __future__ import annotations
import argparse, json, statistics, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--batch', type=int, default=1)
p.add_argument('--layers', type=int, default=4, help='3x3 convs per model (spread over the depth)')
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'rank_rounding.json'))
ARGS = p.parse_args()

import torch, torchvision
from torch import nn
torch.set_num_threads(ARGS.threads)
from fasterai.decompose.blocks import tucker_layers
from fasterai.decompose.core import time_ms
from fasterai.decompose.latency import eager_runner

def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else float('nan')

def conv_inputs(model, x):
    "(name, conv, input shape) of every 3×3 conv of `model` on `x`."
    out, hooks = [], []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1:
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: out.append((n, mod, tuple(a[0].shape)))))
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    return out

rows = []
for mname in ['resnet50', 'vgg16_bn']:
    model = getattr(torchvision.models, mname)().eval()
    convs = conv_inputs(model, torch.zeros(ARGS.batch, 3, 224, 224))
    pick = [convs[round(i * (len(convs) - 1) / max(ARGS.layers - 1, 1))] for i in range(ARGS.layers)]
    for name, conv, shape in pick:
        half = min(conv.in_channels, conv.out_channels) // 2
        top = max(32, 32 * round(half / 32))
        ranks = [r for r in range(top, top - 33, -1) if r >= 1]
        x = torch.randn(shape)
        blocks = [tucker_layers(conv, r, r).eval() for r in ranks]
        ms = time_ms([eager_runner(b, x) for b in blocks], min_time=0.2)
        t = dict(zip(ranks, ms))
        up = {q: med(t[q * (r // q + 1)] / t[r] for r in ranks if r % q and q * (r // q + 1) in t) for q in (8, 16, 32)}
        down = {q: med(t[q * (r // q)] / t[r] for r in ranks if r % q and q * (r // q) in t) for q in (8, 16, 32)}
        rows.append(dict(model=mname, layer=name, shape=shape, ranks=ranks, ms=ms, up=up, down=down))
        print(f"{mname} {name} {shape}: R {ranks[-1]}..{ranks[0]}, {min(ms):.3f}..{max(ms):.3f} ms; median t(R rounded up)/t(R) "
              + ', '.join(f'{q}: {v:.3f}' for q, v in up.items()) + '; t(R rounded down)/t(R) '
              + ', '.join(f'{q}: {v:.3f}' for q, v in down.items()))

Path(ARGS.out).write_text(json.dumps(dict(env=_env.env_info(torchvision=torchvision.__version__), args=vars(ARGS), rows=rows), indent=1))
