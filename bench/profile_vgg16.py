"""Where vgg16_bn's time goes at batch 1, dense and Tucker-decomposed: torch.profiler per op type.

    .venv/bin/python bench/profile_vgg16.py [--threads 2] [--size 224]

Models (weights=None, eval): dense; Tucker at percent_removed=0.5 on every conv but the RGB stem (min_speedup=None,
the shapes of issue 17's comparison); the same with the cores' weights in channels_last; the same with BatchNorm
folded (BN_Folder). Each is profiled over 20 forward passes after a warm-up; self CPU time per op type is summed
and divided by 20. End-to-end times come from `model_ms` (interleaved, fastest of rounds). The MAC ratio is over the
whole model. Writes bench/results/profile_vgg16.json.
"""
import argparse, copy, json, sys, warnings
from collections import defaultdict
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--size', type=int, default=224)
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'profile_vgg16.json'))
ARGS = p.parse_args()

import torch, torchvision
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(ARGS.threads)
warnings.simplefilter('ignore')
from fasterai.decompose.all import *
from fasterai.decompose.latency import model_ms, channels_last_cores
from fasterai.demo import model_macs

x = torch.randn(1, 3, ARGS.size, ARGS.size)
dense = torchvision.models.vgg16_bn().eval()
tucker = Conv_Decomposer().decompose(dense, method='tucker', percent_removed=0.5, exclude=['features.0'],
                                     min_speedup=None, verbose=False)
cl = channels_last_cores(copy.deepcopy(tucker))
folded = BN_Folder().fold(cl)
dense_folded = BN_Folder().fold(dense)
models = {'dense': dense, 'dense, BN folded': dense_folded, 'tucker 0.5': tucker, 'tucker 0.5, channels_last cores': cl,
          'tucker 0.5, channels_last cores, BN folded': folded}

def by_op(m, n=20):
    with torch.inference_mode():
        for _ in range(3): m(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n): m(x)
    out = defaultdict(float)
    for e in prof.key_averages():
        out[e.key] += e.self_cpu_time_total / 1000 / n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

ms = dict(zip(models, model_ms(list(models.values()), x, min_time=0.5)))
macs = {k: model_macs(m, tuple(x.shape)) for k, m in models.items()}
res = dict(env=_env.env_info(torchvision=torchvision.__version__), args=vars(ARGS), models={})
for k, m in models.items():
    ops = by_op(m)
    res['models'][k] = dict(ms=ms[k], mac_ratio=macs['dense'] / macs[k], speed_ratio=ms['dense'] / ms[k],
                            ops_ms={o: round(v, 3) for o, v in list(ops.items())[:12]})
    print(f"\n{k}: {ms[k]:.2f} ms, MACs ÷{macs['dense'] / macs[k]:.2f}, speed ×{ms['dense'] / ms[k]:.2f} "
          f"(share of the MAC ratio {100 * (ms['dense'] / ms[k]) / (macs['dense'] / macs[k]):.0f}%)")
    for o, v in list(ops.items())[:8]: print(f'    {o:40s} {v:8.3f} ms')
Path(ARGS.out).write_text(json.dumps(res, indent=1))
