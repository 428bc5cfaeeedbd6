"""Time and error of CP decompositions: every conv of a torchvision model (random weights, seed 0) at
`method='cp', percent_removed=0.5`.

    .venv/bin/python bench/bench_cp.py [--models vgg16_bn resnet50] [--threads 1] [--timeout 600] [--out bench/results/cp.json --label after]
    .venv/bin/python bench/bench_cp.py --layers features.10 features.27 --models vgg16_bn      # per-layer rows only

Two measurements per model, each in a child process (so a version that does not finish is stopped at `--timeout`):
- `model`: `Conv_Decomposer().decompose(model, method='cp', percent_removed=0.5)`: wall and CPU seconds, mean and
  max relative weight error over the decomposed convs (the decomposer's report);
- `layers` (with `--layers`): per named conv, `factorize_conv(W, 'cp', (R,))` at the decomposer's rank R: seconds,
  relative Frobenius error of the weight, and relative output error of the conv on random inputs (4 images of
  16×16, seeded).
To measure another version's code, export its package and pass the folder:
`git archive main fasterai | tar -x -C /tmp/before && .venv/bin/python bench/bench_cp.py --code /tmp/before`.
Pin it to one core on a shared machine (`taskset -c 1`) and read the CPU seconds: the wall time depends on the load
(recorded as `loadavg_start`/`loadavg_end`)."""
import argparse, json, os, subprocess, sys, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ap = argparse.ArgumentParser()
ap.add_argument('--models', nargs='+', default=['vgg16_bn', 'resnet50'])
ap.add_argument('--layers', nargs='*', default=None, help='conv names to time alone (per-layer rows)')
ap.add_argument('--threads', type=int, default=1)
ap.add_argument('--timeout', type=float, default=600, help='seconds before a child run is stopped')
ap.add_argument('--code', default=None, help='a directory holding another version of the fasterai package')
ap.add_argument('--one', default=None, help=argparse.SUPPRESS)          # child: 'model:<name>' or 'layers:<name>'
ap.add_argument('--label', default=None, help='store the run under this key of --out (other keys are kept)')
ap.add_argument('--out', default=None)
args = ap.parse_args()
if args.code:                      # the editable install's finder would win over sys.path: drop it
    sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
    sys.path.insert(0, args.code)
import torch
import torchvision

def build(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()

def run_model(name):
    from fasterai.decompose.all import Conv_Decomposer
    model = build(name)
    d = Conv_Decomposer()
    t0, c0 = time.perf_counter(), time.process_time()
    d.decompose(model, method='cp', percent_removed=0.5, verbose=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    errs = [float(e) for e in d.report['weight_error'] if e == e]
    return dict(wall_s=round(wall, 2), cpu_s=round(cpu, 2), n_layers=len(errs),
                mean_weight_error=round(sum(errs) / len(errs), 5), max_weight_error=round(max(errs), 5))

def run_layers(name, layers):
    import torch.nn.functional as F
    from fasterai.decompose.factorize import factorize_conv
    from fasterai.decompose.ranks import full_ranks, rank_from_percent
    mods = dict(build(name).named_modules())
    rows = []
    for ln in layers:
        conv = mods[ln]
        W = conv.weight.detach()
        R = rank_from_percent(full_ranks(conv, 'cp')[0], 0.5)
        t0, c0 = time.perf_counter(), time.process_time()
        _, Wh = factorize_conv(W, 'cp', (R,))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        Wd, Wh = W.double(), Wh.double()
        x = torch.randn(4, W.shape[1], 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        y = F.conv2d(x, Wd, **kw)
        rows.append(dict(layer=ln, shape=list(W.shape), rank=R, wall_s=round(wall, 3), cpu_s=round(cpu, 3),
                         weight_error=round(float((Wd - Wh).norm() / Wd.norm()), 6),
                         output_error=round(float((F.conv2d(x, Wh, **kw) - y).norm() / y.norm()), 6)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows

if args.one:
    torch.set_num_threads(args.threads)
    kind, name = args.one.split(':', 1)
    out = run_model(name) if kind == 'model' else run_layers(name, args.layers)
    print('RESULT ' + json.dumps(out)); sys.exit()

from _env import env_info
torch.set_num_threads(args.threads)
base = [sys.executable, __file__, '--threads', str(args.threads)] + (['--code', args.code] if args.code else [])
res = dict(env_info(torchvision=torchvision.__version__), code=args.code or 'this checkout', threads=args.threads,
           timeout_s=args.timeout, models={})
for name in args.models:
    jobs = [('layers', ['--layers', *args.layers])] if args.layers else [('model', [])]
    for kind, extra in jobs:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(base + ['--one', f'{kind}:{name}'] + extra, capture_output=True, text=True, timeout=args.timeout)
            line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
            out = json.loads(line[-1][7:]) if line else dict(error=p.stderr[-2000:])
        except subprocess.TimeoutExpired:
            out = dict(did_not_finish_s=args.timeout)
        res['models'].setdefault(name, {})[kind] = out
        print(name, kind, json.dumps(out), flush=True)
res['loadavg_end'] = os.getloadavg()
if args.out:
    out = Path(args.out)
    if args.label:
        data = json.loads(out.read_text()) if out.exists() else {}
        data[args.label] = res
        res = data
    out.write_text(json.dumps(res, indent=1))
