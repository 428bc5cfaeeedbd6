"""Peak memory and time of a data-aware decomposition of a big Linear: vgg16_bn's `classifier.0` (25,088 inputs, a
5.0 GB float64 input moment).

    .venv/bin/python bench/bench_memory.py [--threads 2] [--out bench/results/memory.json]

Runs `FC_Decomposer().decompose(vgg16_bn(), percent_removed=0.5, data=<4 batches of 8 random 224x224 images>)` once
(torchvision, no weights) and records the process's peak RSS (`resource.getrusage`, which includes the model and
the Python/torch baseline), the wall and CPU time, and per layer the predicted and the measured output error (they
must agree: the prediction is exact). To measure another version's code, export its package and pass the folder:
`git archive <commit> fasterai | tar -x -C /tmp/before && .venv/bin/python bench/bench_memory.py --code /tmp/before`
(the result names the `fasterai` it ran).
Run it alone: it holds over 5 GB (11 GB before the in-place moment updates)."""
import argparse, json, os, resource, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
ap = argparse.ArgumentParser()
ap.add_argument('--threads', type=int, default=2)
ap.add_argument('--batches', type=int, default=4); ap.add_argument('--bs', type=int, default=8)
ap.add_argument('--code', default=None, help='a directory holding another version of the fasterai package')
ap.add_argument('--out', default=None)
args = ap.parse_args()
if args.code:                      # the editable install's finder would win over sys.path: drop it
    sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
    sys.path.insert(0, args.code)
import torch
import torchvision
import fasterai
from fasterai.decompose.all import FC_Decomposer
from _env import env_info

torch.set_num_threads(args.threads)

def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2     # ru_maxrss is in KiB

torch.manual_seed(0)
model = torchvision.models.vgg16_bn().eval()
g = torch.Generator().manual_seed(0)
data = [torch.randn(args.bs, 3, 224, 224, generator=g) for _ in range(args.batches)]
base = rss_gb()
t0, c0 = time.perf_counter(), time.process_time()
d = FC_Decomposer()
d.decompose(model, percent_removed=0.5, data=data, verbose=False)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
rep = d.report
rows = [dict(name=r.name, ranks=str(r.ranks), seconds=round(float(r.seconds), 2),
             predicted_error=float(r.predicted_error), output_error=float(r.output_error)) for r in rep.itertuples()]
res = dict(env_info(torchvision=torchvision.__version__), fasterai_path=str(Path(fasterai.__file__).parent),
           threads=args.threads, batches=args.batches, bs=args.bs, rss_before_gb=round(base, 2),
           peak_rss_gb=round(rss_gb(), 2), wall_s=round(wall, 1), cpu_s=round(cpu, 1), layers=rows)
print(json.dumps(res, indent=1))
if args.out: Path(args.out).write_text(json.dumps(res, indent=1))
