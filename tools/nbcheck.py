"""Run a notebook's code cells with every `assert` turned into a recorded check, and print the margins.

    python tools/nbcheck.py nbs/tutorials/bn_fold_finetune.ipynb [out.json]

Used to measure how much room an assertion about a trained or measured outcome has across thread
counts, seeds and CPU kernels (issue 15): each assert is evaluated, its pass/fail recorded, and for a
comparison `a OP b` both sides are recorded too, so the spread over runs can be read off. The
notebook runs to the end even when a check fails. The environment (FASTERAI_TEST_THREADS,
FASTERAI_TEST_SEED, ATEN_CPU_CAPABILITY, ...) is the caller's.
"""
import ast, json, linecache, os, sys, traceback
from pathlib import Path

def _summary(v):
    "A JSON-able summary of a value: numbers as they are, small tensors/series/arrays as lists."
    try:
        import numpy as np, pandas as pd, torch
        if isinstance(v, torch.Tensor): v = v.detach().cpu().numpy()
        if isinstance(v, (pd.Series, pd.DataFrame)): v = v.to_numpy()
        if isinstance(v, np.ndarray):
            return v.tolist() if v.size <= 64 else f'array{v.shape}'
        if isinstance(v, (np.generic,)): return v.item()
    except Exception: pass
    if isinstance(v, (bool, int, float, str)) or v is None: return v
    return repr(v)[:200]

class _Checks(ast.NodeTransformer):
    "assert T, M  ->  _check(lambda: T, 'src', lineno, lambda: (left, right) if T is a comparison)"
    def __init__(self, src, cell): self.src, self.cell = src, cell
    def visit_Assert(self, node):
        text = ast.get_source_segment(self.src, node.test) or ''
        comps = [c for c in _compares(node.test) if len(c.comparators) == 1]
        sides = ast.Constant(None)
        if comps:                                  # every comparison outside a comprehension: both of its sides
            pairs = [ast.Tuple([c.left, c.comparators[0]], ast.Load()) for c in comps]
            sides = _lambda(ast.Tuple(pairs, ast.Load()))
        call = ast.Expr(ast.Call(ast.Name('_check', ast.Load()),
                                 [_lambda(node.test), ast.Constant(text), ast.Constant(self.cell),
                                  ast.Constant(node.lineno), sides], []))
        return ast.copy_location(call, node)

def _lambda(body):
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=body)

def _compares(node):
    "Compare nodes in `node`, not descending into comprehensions or lambdas (their names are local)."
    if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp, ast.Lambda)): return []
    out = [node] if isinstance(node, ast.Compare) else []
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and len(node.args) == 1
            and node.func.attr in ('le', 'lt', 'ge', 'gt')):                        # pandas' a.le(b): a as the left side
        out = [ast.Compare(node.func.value, [ast.LtE()], [node.args[0]])]
    for child in ast.iter_child_nodes(node): out += _compares(child)
    return out

def run(nb_path, out=None):
    nb_path = Path(nb_path).resolve()
    cells = [c for c in json.loads(nb_path.read_text())['cells'] if c['cell_type'] == 'code']
    results = []
    def _check(test, text, cell, line, sides):
        rec = dict(cell=cell, line=line, text=text)
        try: rec['ok'] = bool(test())
        except Exception as e: rec['ok'], rec['error'] = False, f'{type(e).__name__}: {e}'
        if sides is not None:
            try: rec['sides'] = [[_summary(a), _summary(b)] for a, b in sides()]
            except Exception: pass
        if not rec['ok']:                          # a failure: what the names it reads held
            names = sorted({n.id for n in ast.walk(ast.parse(text, mode='eval')) if isinstance(n, ast.Name)} & ns.keys())
            rec['names'] = {n: repr(ns[n])[:1500] for n in names if not callable(ns[n])}
        results.append(rec)
    ns = {'_check': _check, '__name__': '__main__'}
    os.chdir(nb_path.parent)
    for i, c in enumerate(cells):
        src = ''.join(c['source'])
        if any(l.strip().replace(' ', '') in ('#|eval:false', '#|slow') for l in src.splitlines()): continue
        src = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))
        try:
            tree = _Checks(src, i).visit(ast.parse(src))
            ast.fix_missing_locations(tree)
            fname = f'<{nb_path.name}[{i}]>'
            linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)   # so inspect.getsource finds it
            exec(compile(tree, fname, 'exec'), ns)
        except Exception:
            results.append(dict(cell=i, line=0, text='<cell raised>', ok=False, error=traceback.format_exc()[-800:]))
            break
    failed = [r for r in results if not r['ok']]
    print(json.dumps(dict(notebook=str(nb_path), n_checks=len(results), failed=failed), indent=1, default=str))
    if out: Path(out).write_text(json.dumps(results, indent=1, default=str))
    return results

if __name__ == '__main__': run(*sys.argv[1:3])
