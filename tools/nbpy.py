"""Convert between nbdev notebooks and a 'percent' script form for editing.

    python tools/nbpy.py tonb src.py nbs/x.ipynb   # script -> notebook (outputs dropped)
    python tools/nbpy.py topy nbs/x.ipynb src.py   # notebook -> script

Cells are separated by lines `# %%` (code) or `# %% [markdown]` (markdown; each line
prefixed by `# `). The notebook stays the source of truth; the script is a scratch copy.
"""
import json, sys
from pathlib import Path

def _cell(kind, lines):
    while lines and not lines[-1].strip(): lines.pop()
    while lines and not lines[0].strip(): lines.pop(0)
    if kind == 'markdown': lines = [l[2:] if l.startswith('# ') else l.lstrip('#') for l in lines]
    src = [l + '\n' for l in lines]
    if src: src[-1] = src[-1].rstrip('\n')
    c = {'cell_type': kind, 'metadata': {}, 'source': src}
    if kind == 'code': c.update(execution_count=None, outputs=[])
    return c

def tonb(src, dst):
    cells, kind, buf = [], None, []
    for line in Path(src).read_text().splitlines():
        if line.startswith('# %%'):
            if kind is not None and any(l.strip() for l in buf): cells.append(_cell(kind, buf))
            kind, buf = ('markdown' if '[markdown]' in line else 'code'), []
        else: buf.append(line)
    if kind is not None and any(l.strip() for l in buf): cells.append(_cell(kind, buf))
    nb = {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    for i, c in enumerate(nb['cells']): c['id'] = f'c{i:03d}'
    Path(dst).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

def topy(src, dst):
    out = []
    for c in json.loads(Path(src).read_text())['cells']:
        s = ''.join(c['source'])
        if c['cell_type'] == 'markdown':
            out.append('# %% [markdown]\n' + '\n'.join(('# ' + l) if l else '#' for l in s.splitlines()))
        else: out.append('# %%\n' + s)
    Path(dst).write_text('\n\n'.join(out) + '\n')

if __name__ == '__main__':
    cmd, a, b = sys.argv[1:4]
    {'tonb': tonb, 'topy': topy}[cmd](a, b)
