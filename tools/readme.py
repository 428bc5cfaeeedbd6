"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells fenced).

nbdev's own `nbdev-readme` needs Quarto, which this machine does not have; `make test`
regenerates README.md with this script and fails if it changed.
"""
import json
from pathlib import Path

def main(root=Path(__file__).resolve().parent.parent):
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide'): continue
        if c['cell_type'] == 'markdown': parts.append(src)
        else: parts.append('```python\n' + '\n'.join(l for l in src.splitlines() if not l.startswith('#|')) + '\n```')
    (root/'README.md').write_text('\n\n'.join(parts) + '\n')

if __name__ == '__main__': main()
