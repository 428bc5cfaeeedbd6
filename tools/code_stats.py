"""Measures of how `fasterai/` reads, for comparing two versions of the package.

    PYTHONPATH=. .venv/bin/python tools/code_stats.py [--json]

- import graph: for each module, the fasterai modules it imports (anywhere in the file, also inside functions);
- longest functions: statement nodes (`ast.stmt`) inside each function, counted recursively through `if`/`for`/
  `with`/`try` bodies but not into nested `def`/`class` bodies (a nested def counts as one statement, and its
  own body is measured as a function of its own); top 5;
- long lines: lines over 100 and over 120 characters (`_modidx.py` excluded), count and share of all lines;
- keywords of each entry point: the parameters `inspect.signature` shows (self, *args and **kwargs left out), and
  whether it also takes `**kwargs`;
- hook/restore sequences: functions that both save the `training` flags of modules and register forward hooks
  themselves (the `hooked` context manager that does it for everyone is listed apart).
"""
import ast, inspect, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'fasterai'

def modules():
    "Module name (`decompose.conv`) → path, for every source file of the package but `_modidx.py`."
    return {'.'.join(p.relative_to(PKG).with_suffix('').parts): p for p in sorted(PKG.rglob('*.py'))
            if p.name not in ('_modidx.py', '__init__.py')}

def _resolve(mod, node):
    "The package module an `ImportFrom` node names, relative to module `mod`, or None outside the package."
    if node.level:
        base = mod.split('.')[:-node.level]
        name = '.'.join(base + ([node.module] if node.module else []))
    elif node.module and node.module.startswith('fasterai.'): name = node.module[len('fasterai.'):]
    else: return None
    return name

def import_graph(mods):
    "Module → sorted list of the package modules it imports."
    graph = {}
    for mod, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = _resolve(mod, node)
                if name in mods: deps.add(name)
                elif name is not None:                       # `from . import x`
                    deps |= {f'{name}.{a.name}' if name else a.name for a in node.names} & set(mods)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len('fasterai.'):] for a in node.names if a.name[len('fasterai.'):] in mods}
        graph[mod] = sorted(deps - {mod})
    return graph

def private_imports(mods):
    "(module, imported private name, from module) for each `_name` imported from another package module."
    out = []
    for mod, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(mod, node) in mods:
                out += [(mod, a.name, _resolve(mod, node)) for a in node.names if a.name.startswith('_')]
    return out

def _count(body):
    "Statements in `body`, not counting inside nested function or class bodies."
    n = 0
    for s in body:
        n += 1
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        for field in ('body', 'orelse', 'finalbody'): n += _count(getattr(s, field, []) or [])
        for h in getattr(s, 'handlers', []) or []: n += _count(h.body)
        for c in getattr(s, 'cases', []) or []: n += _count(c.body)
    return n

def function_sizes(mods):
    "[(statements, 'module:qualname', lines)] for every function, largest first."
    out = []
    def walk(node, mod, prefix):
        for s in ast.iter_child_nodes(node):
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((_count(s.body), f'{mod}:{prefix}{s.name}', s.end_lineno - s.lineno + 1))
                walk(s, mod, f'{prefix}{s.name}.')
            elif isinstance(s, ast.ClassDef): walk(s, mod, f'{prefix}{s.name}.')
            else: walk(s, mod, prefix)
    for mod, p in mods.items(): walk(ast.parse(p.read_text()), mod, '')
    return sorted(out, reverse=True)

def long_lines(mods):
    "Total lines, lines over 100 and over 120 characters, and the longest line's length."
    lines = [l for p in mods.values() for l in p.read_text().splitlines()]
    return dict(lines=len(lines), over_100=sum(len(l) > 100 for l in lines), over_120=sum(len(l) > 120 for l in lines),
                longest=max(map(len, lines)))

def _entry_points():
    "Name → callable for each public entry point (looked up where it lives in this version)."
    sys.path.insert(0, str(ROOT))
    import importlib
    from fasterai.decompose.all import Conv_Decomposer, FC_Decomposer, DecomposeCallback, BN_Folder, load_decomposed
    from fasterai.decompose.all import decompose as budget_decompose
    from fastai.learner import Learner
    importlib.import_module('fasterai.decompose.learner')
    return {'Conv_Decomposer.decompose': Conv_Decomposer.decompose, 'FC_Decomposer.decompose': FC_Decomposer.decompose,
            'budget.decompose': budget_decompose, 'Learner.decompose': Learner.decompose,
            'DecomposeCallback': DecomposeCallback.__init__, 'BN_Folder.fold': BN_Folder.fold,
            'load_decomposed': load_decomposed}

def keywords():
    "Entry point → (named parameters shown, takes **kwargs)."
    out = {}
    for name, f in _entry_points().items():
        ps = inspect.signature(f).parameters.values()
        named = [p.name for p in ps if p.name != 'self' and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        out[name] = (len(named), any(p.kind is p.VAR_KEYWORD for p in ps))
    return out

_SAVE = re.compile(r'\.training\s+for\b')
_HOOK = re.compile(r'register_forward(_pre)?_hook\(')

def hook_sequences(mods):
    "'module:function' for each function that saves training flags and registers forward hooks by hand."
    out = []
    for mod, p in mods.items():
        src = p.read_text()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
            body = ast.get_source_segment(src, node)
            if _SAVE.search(body) and _HOOK.search(body): out.append(f'{mod}:{node.name}')
    return out

def main(as_json=False):
    mods = modules()
    res = dict(import_graph=import_graph(mods), private_imports=private_imports(mods),
               functions=function_sizes(mods)[:5], long_lines=long_lines(mods), keywords=keywords(),
               hook_sequences=hook_sequences(mods))
    if as_json: return print(json.dumps(res, indent=1))
    print('import graph (module: fasterai modules it imports)')
    for m, d in res['import_graph'].items(): print(f'  {m}: {", ".join(d) or "-"}')
    print(f"private names imported across modules: {len(res['private_imports'])}")
    for m, n, f in res['private_imports']: print(f'  {m} imports {n} from {f}')
    print('longest functions (statements, lines)')
    for n, name, lines in res['functions']: print(f'  {n:4d} {lines:4d}  {name}')
    ll = res['long_lines']
    print(f"lines: {ll['lines']}; over 100: {ll['over_100']} ({ll['over_100'] / ll['lines']:.1%}); "
          f"over 120: {ll['over_120']} ({ll['over_120'] / ll['lines']:.1%}); longest {ll['longest']}")
    print('keywords per entry point')
    for k, (n, var) in res['keywords'].items(): print(f'  {k}: {n}{" + **kwargs" if var else ""}')
    hs = res['hook_sequences']
    print(f'hand-written save-modes/hook/restore sequences: {len(hs)}: {", ".join(hs)}')

if __name__ == '__main__': main('--json' in sys.argv)
