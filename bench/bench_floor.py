"""How low can a latency budget go? The time of a model whose every decomposable layer is cut to rank 1.

Run from the repository root:
    .venv/bin/python bench/bench_floor.py [--models mobilenet_v2 ...] [--batches 1 8] [--runtimes eager onnxruntime]

A latency budget (`budget_on='latency'`) can only reach a target above what the model costs when every layer it may
cut is as cheap as any of its blocks can make it. This script measures that floor for torchvision models (weights=None,
eval, 3×224×224). Every BatchNorm is folded first (`BN_Folder`, what `fold_bn=True` does), then three models are timed
against the user's dense model, interleaved in one process (`model_ms`, fastest of rounds, repeated until stable):
  - folded: nothing cut, BatchNorms folded;
  - rank 1: every conv the global budget may cut (groups == 1) and every Linear replaced by its channel-SVD block
    (conv k×k → 1 filter → 1×1; Linear → 1 → Linear) at rank 1, `min_speedup=None` (kept even where slower);
  - rank 1 where faster: the same, `min_speedup=1.0, runtime=R`: each block kept only where it times faster than its
    layer alone in runtime R (what the never-slower check does).
In eager mode each of them is also timed with every conv weight in channels_last (the layout a plan may pick).
Rank 1 is the least compute any block type here can have on a layer (Tucker-2 at (1, 1) adds a third conv), so the
smallest of these times is the floor a budget meets: a target below floor × (1 − 10%) is out of reach of low-rank
blocks on that model. `floor_share` = that smallest time / the dense model's time.
Rows go to --out (default bench/results/floor.json) as they come.
"""
from __future__ import annotations
import argparse, copy, json, sys, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

MODELS = ['mobilenet_v2', 'mobilenet_v3_large', 'efficientnet_b0', 'regnet_y_400mf']
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--models', nargs='+', default=MODELS)
p.add_argument('--batches', type=int, nargs='+', default=[1, 8])
p.add_argument('--runtimes', nargs='+', default=['eager', 'onnxruntime'])
p.add_argument('--threads', type=int, default=2)
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'floor.json'))
ARGS = p.parse_args()

import torch, torchvision
from torch import nn
torch.set_num_threads(ARGS.threads)
warnings.simplefilter('ignore')
from fasterai.decompose.all import *
from fasterai.decompose.latency import model_ms, channels_last_convs
from fasterai.misc.bn_folding import BN_Folder

out = Path(ARGS.out)
doc = dict(env=_env.env_info(torchvision=torchvision.__version__), args=vars(ARGS), rows=[])
def save(): out.write_text(json.dumps(doc, indent=1))

def rank1(model, shape, rt=None):
    "Every groups == 1 conv and every Linear at rank 1 (channel SVD); with `rt`, only where faster in `rt`."
    convs = {n: 1 for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    fcs = {n: 1 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kw = dict(min_speedup=1.0, runtime=rt, input_shape=shape) if rt else dict(min_speedup=None, input_shape=shape)
    cut = Conv_Decomposer().decompose(model, method='svd', ranks=convs, verbose=False, **kw)
    return FC_Decomposer().decompose(cut, ranks=fcs, verbose=False, **kw)

for name in ARGS.models:
    dense = getattr(torchvision.models, name)().eval()
    folded = BN_Folder().fold(dense)
    for bs in ARGS.batches:
        shape = (bs, 3, 224, 224)
        x = torch.randn(shape)
        cut = rank1(folded, shape)
        for rt in ARGS.runtimes:
            models = {'folded': folded, 'rank 1': cut, 'rank 1 where faster': rank1(folded, shape, rt)}
            if rt == 'eager':
                models.update({f'{k}, channels_last': channels_last_convs(copy.deepcopy(v)) for k, v in list(models.items())})
            t = model_ms([dense] + list(models.values()), x, rt, min_time=0.5)
            shares = {k: ms / t[0] for k, ms in zip(models, t[1:])}
            best = min(shares, key=shares.get)
            r = dict(model=name, batch=bs, runtime=rt, dense_ms=t[0], shares=shares, floor_share=shares[best], floor=best)
            doc['rows'].append(r); save()
            print(f"{name:18s} b{bs} {rt:11s} dense {t[0]:7.2f} ms  floor {100 * shares[best]:.0f}% ({best})  "
                  + '  '.join(f'{k}: {100 * v:.0f}%' for k, v in shares.items()), flush=True)
save()
