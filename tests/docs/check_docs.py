"""Check speeder's documentation without quarto.

    python tests/docs/check_docs.py [--screenshots OUT_DIR] [--force] [--pages index,03_data]

`nbdev_docs` = `nbdev_proc_nbs` (process the notebooks into `_proc/`) + `quarto render`. Quarto cannot be installed
here, so this script does the first half exactly as nbdev does (same `FilterDefaults` processors, same `nbdev.yml`
and `sidebar.yml` refresh) and replaces the second half with nbconvert (lab template, no execution) into
`_proc/_preview/*.html`. It then checks what a reader of the docs site would trip over:

- processing: every notebook goes through nbdev's processors; nbdev *executes* cells that hold imports (and
  show_doc/export cells) while building docs, so a cell that mixes imports with other code runs at docs time;
- titles: every notebook opens with `# Title` and a `> summary` line (nbdev turns them into the page title and
  description, dropping anything else in that cell), then a paragraph before the first visible code;
- docstrings: every public function/class (in a module's `__all__`) of `speeder` has a docstring; parameters
  without a docments comment are listed as warnings;
- show_doc: the processed notebook holds a rendered `show_doc` for every public function/class its export cells define;
- links: `[..](NN_name.ipynb)` / `[..](name.html)` / files resolve; `sidebar.yml` lists exactly the notebooks present;
- render: nbconvert renders every processed notebook.

Errors make the exit status 1; warnings don't. We do NOT call nbdev's `nbdev_proc_nbs` command itself: when quarto
is missing it runs nbdev's quarto installer (sudo, curl, then `pip install -e .[dev]`)."""
from __future__ import annotations
import argparse, ast, dataclasses, hashlib, html, importlib, inspect, json, os, pkgutil, re, shutil, subprocess
import sys, tempfile, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NBS = ROOT/'nbs'
PROC = ROOT/'_proc'
PREVIEW = PROC/'_preview'
CACHE = PROC/'.check_docs'          # per-notebook processing results (nbdev warnings/errors), keyed by source hash
LIB = 'speeder'
DOC_URL = 'https://speeder.github.io/speeder/'   # doc_host + doc_baseurl from settings.ini (links nbdev writes)

# ----------------------------------------------------------------------------------------------------------------
# Findings

@dataclasses.dataclass
class Finding:
    check: str      # 'process', 'title', 'docstring', 'params', 'show_doc', 'links', 'sidebar', 'render', 'outputs'
    where: str      # notebook file name or module name
    message: str
    error: bool = True

    def __str__(self):
        return f"{'ERROR' if self.error else 'warn '} [{self.check}] {self.where}: {self.message}"

# ----------------------------------------------------------------------------------------------------------------
# Notebooks and cells

_re_directive = re.compile(r'^\s*#\s*\|\s*([\w-]+):?(.*)$')

def read_nb(path):
    return json.loads(Path(path).read_text(encoding='utf-8'))
def src_of(cell):
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else (s or '')

def directives(src):
    "The `#| key: value` lines at the top of a cell, as {key: value}."
    res = {}
    for line in src.splitlines():
        if not line.strip(): continue
        m = _re_directive.match(line)
        if not m: break
        res[m.group(1)] = m.group(2).strip()
    return res

def strip_directives(src):
    lines = src.splitlines()
    i = 0
    while i < len(lines) and (not lines[i].strip() or _re_directive.match(lines[i])):
        i += 1
    return '\n'.join(lines[i:])

def notebooks(nbs=NBS):
    "The notebooks nbdev documents, in sidebar order (index first, then by file name)."
    from nbdev.doclinks import nbglob
    files = sorted(Path(f) for f in nbglob(nbs, func=os.path.join, skip_folder_re=r'(?:^[_.]|^www\$)'))
    return sorted(files, key=lambda p: (p.name != 'index.ipynb', str(p.relative_to(nbs))))

def page_name(nb: Path) -> str:
    "The HTML file quarto writes for a notebook under nbdev (numeric prefix dropped: `03_data.ipynb` -> `data.html`)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(nb)).name

def _cell_index(nb_path, needle):
    "Index of the source cell whose text contains `needle` (to point owners at the cell nbdev complained about)."
    needle = needle.strip()
    if not needle: return None
    for i, c in enumerate(read_nb(nb_path)['cells']):
        s = src_of(c).strip()
        if s and (needle in s or s in needle): return i
    return None

def _first_line(s, n=90):
    s = next((l for l in s.strip().splitlines() if l.strip()), '')
    return s if len(s) <= n else s[:n-3] + '...'

# ----------------------------------------------------------------------------------------------------------------
# Step 1: the nbdev_proc_nbs part

def refresh_site_files(nbs=NBS):
    "What `nbdev_docs` does before processing: rewrite `nbdev.yml` from settings.ini and `sidebar.yml` from the notebooks."
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    side = nbs/'sidebar.yml'
    before = side.read_text() if side.exists() else None
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        refresh_quarto_yml()
        nbdev_sidebar.__wrapped__(path=nbs)
    finally:
        os.chdir(cwd)
    # sidebar.yml may list notebooks being written on other branches (they arrive with a merge); nbdev_sidebar drops
    # them. Keep the committed file when that is its only difference, so checking the docs leaves the checkout clean.
    if before is not None and before != side.read_text():
        old, new = _listed(before), _listed(side.read_text())
        if [x for x in old if (nbs/x).exists()] == new:
            side.write_text(before)

def _proc_one(args):
    "Worker (`--proc-one SRC DST`, own interpreter): process one notebook with nbdev's `FilterDefaults`, as `nbdev_proc_nbs` does; report warnings and errors."
    src, dst = map(Path, args)
    import io, contextlib, traceback
    os.chdir(ROOT)
    res = {'warnings': [], 'error': None}
    t0 = time.time()
    with warnings.catch_warnings(record=True) as ws, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('always')
        try:
            from nbdev.processors import FilterDefaults
            from nbdev import serve_drv
            tmp = dst.with_name(f'.{dst.name}.{os.getpid()}.tmp')
            serve_drv.main((src, tmp, FilterDefaults))
            os.replace(tmp, dst)
        except BaseException as e:
            cause = e.__cause__ or e.__context__
            msg = str(e)
            m = re.search(r' in cell \d+ :\n(.*)$', msg, re.S)   # exec_show_docs: "Error in notebook: T in cell N :\nSRC"
            res['error'] = {'message': msg, 'cell': m.group(1) if m else '',
                            'cause': ''.join(traceback.format_exception_only(type(cause), cause)).strip() if cause else ''}
    for w in ws:
        m = str(w.message)
        if 'Found cells containing imports and other code' in m:
            res['warnings'].append(m.split('---', 1)[1].rsplit('---', 1)[0] if '---' in m else m)
    res['seconds'] = round(time.time() - t0, 2)
    return res

def _key(nb: Path):
    "Cache key of a processed notebook: its source, settings.ini, nbdev's version and the module(s) it exports to."
    import nbdev
    h = hashlib.sha256(nb.read_bytes() + nbdev.__version__.encode())
    mods = {m.replace('.', '/') for m, _ in exported_names(nb)[0].values() if m} | set(_default_exp(nb))
    for f in [ROOT/'settings.ini', *sorted(ROOT/LIB/f'{m}.py' for m in mods)]:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()

def _default_exp(nb):
    return [directives(src_of(c))['default_exp'] for c in read_nb(nb)['cells']
            if c['cell_type'] == 'code' and directives(src_of(c)).get('default_exp')][:1]

def process_notebooks(nbs=NBS, force=False, n_workers=None):
    "Process every notebook into `_proc/` (skipping unchanged ones); copy the quarto project files. Returns {nb: result}."
    from nbdev.doclinks import nbglob
    PROC.mkdir(exist_ok=True)
    CACHE.mkdir(exist_ok=True)
    # the other files nbdev copies into _proc/ (styles.css, *.yml ...), so _proc is a quarto project as nbdev leaves it
    others = [Path(f) for f in nbglob(nbs, func=os.path.join, file_glob='', file_re='') if not f.endswith('.ipynb')]
    for f in others + [nbs/'_quarto.yml']:
        if f.exists() and not any(p.startswith(('.', '_proc', '_docs')) for p in f.relative_to(nbs).parts[:-1]):
            d = PROC/f.relative_to(nbs)
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, d)
    results, todo = {}, []
    for nb in notebooks(nbs):
        key, dst, rec = _key(nb), PROC/nb.relative_to(nbs), CACHE/(nb.name + '.json')
        if not force and rec.exists():
            r = json.loads(rec.read_text())
            if r.get('key') == key and (dst.exists() or r['error']):
                results[nb] = {**r, 'cached': True}
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        todo.append((nb, dst, key, rec))
    if todo:
        # one fresh interpreter per notebook (as nbdev's spawn workers): cells nbdev executes can't leak between notebooks
        n = n_workers or max(1, min(len(todo), os.cpu_count() or 1))
        running, queue = [], list(todo)
        while queue or running:
            while queue and len(running) < n:
                nb, dst, key, rec = queue.pop(0)
                p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '--proc-one', str(nb), str(dst)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                running.append((p, nb, key, rec))
            p, nb, key, rec = running.pop(0)
            so, se = p.communicate()
            try:
                r = json.loads(so.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                r = {'warnings': [], 'error': {'message': f'worker crashed (exit {p.returncode}): {se[-800:]}', 'cause': '', 'cell': ''}}
            r['key'] = key
            results[nb] = r
            if not r['error'] or 'worker crashed' not in r['error']['message']:
                rec.write_text(json.dumps(r))
    return {nb: results[nb] for nb in notebooks(nbs) if nb in results}

def _flag_note(nb, i):
    "nbdev's docs processing ignores tst_flags: say so when the cell it ran is a `#| slow`/`#| gpu` cell."
    if i is None: return ''
    flags = [f for f in ('slow', 'gpu') if f in directives(src_of(read_nb(nb)['cells'][i]))]
    return f", a `#| {flags[0]}` cell: tst_flags do not stop nbdev_docs from running it" if flags else ''

def check_processing(results):
    out = []
    for nb, r in results.items():
        failed = r['error']['cell'].strip() if r['error'] else None
        for w in r['warnings']:
            if failed and w.strip() == failed: continue      # reported as the error below
            i = _cell_index(nb, w)
            out.append(Finding('process', nb.name, f"cell {i} mixes imports with other code, so nbdev runs it while "
                               f"building the docs (`{_first_line(w)}`{_flag_note(nb, i)}); put the imports in a cell of their own", False))
        if r['error']:
            e = r['error']
            i = _cell_index(nb, e['cell']) if e['cell'] else None
            where = f"cell {i} (`{_first_line(e['cell'])}`{_flag_note(nb, i)})" if i is not None else 'processing'
            out.append(Finding('process', nb.name, f"nbdev_proc_nbs fails in {where}: {e['cause'] or e['message']}"
                               + (' (nbdev executes cells that contain imports: keep imports in cells of their own)'
                                  if i is not None else '')))
    return out

# ----------------------------------------------------------------------------------------------------------------
# Step 2: checks on the source notebooks

_re_h1 = re.compile(r'^#\s+(\S.*?)\s*$', re.M)
_re_summary = re.compile(r'^>\s+(\S.*?)\s*$', re.M)

def _visible_code(cell):
    d = directives(src_of(cell))
    hidden = {'hide', 'export', 'exporti', 'default_exp'} & set(d) or d.get('include') == 'false'
    return cell['cell_type'] == 'code' and strip_directives(src_of(cell)).strip() and not hidden

def _has_paragraph(md):
    "Does a markdown cell hold prose: a line of 8+ words that isn't a heading, quote, list item, table row or code?"
    fence = False
    for line in md.splitlines():
        s = line.strip()
        if s.startswith('```'):
            fence = not fence
            continue
        if fence or not s or s[0] in '#>|-*+<$' or re.match(r'^\d+[.)]\s', s): continue
        if len(s.split()) >= 8: return True
    return False

def check_title(nb: Path):
    "The title cell nbdev turns into the page header, then a paragraph before any visible code."
    cells, out = read_nb(nb)['cells'], []
    first = next((c for c in cells if c['cell_type'] == 'markdown'), None)
    code_before = [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and first is not None
                   and i < cells.index(first) and _visible_code(c)]
    if first is None or not _re_h1.search(src_of(first)) or not src_of(first).lstrip().startswith('# '):
        return [Finding('title', nb.name, "the first markdown cell must start with a `# Title` line")]
    s = src_of(first)
    if code_before:
        out.append(Finding('title', nb.name, f'visible code cell(s) {code_before} come before the title'))
    if not _re_summary.search(s):
        out.append(Finding('title', nb.name, "no `> summary` line under the title (nbdev uses it as the page description)"))
    extra = [l for l in s.splitlines() if l.strip() and not _re_h1.match(l) and not _re_summary.match(l)]
    if extra:
        out.append(Finding('title', nb.name, f"the title cell holds more than `# title` and `> summary`; nbdev drops the rest "
                           f"from the page (`{_first_line(extra[0])}`): move it to the next markdown cell"))
    rest = cells[cells.index(first)+1:]
    for c in rest:
        if _visible_code(c):
            out.append(Finding('title', nb.name, 'no introductory paragraph between the title and the first visible code cell'))
            break
        if c['cell_type'] == 'markdown':
            if not _has_paragraph(src_of(c)):
                out.append(Finding('title', nb.name, 'the first markdown cell after the title has no paragraph of prose '
                                   f'(`{_first_line(src_of(c))}`)'))
            break
    else:
        out.append(Finding('title', nb.name, 'nothing follows the title'))
    return out

def check_outputs(nb: Path):
    "Quarto does not execute notebooks for nbdev sites: printed examples and plots appear only if saved in the .ipynb."
    cells = read_nb(nb)['cells']
    vis = [c for c in cells if _visible_code(c)]
    with_out = [c for c in vis if c.get('outputs')]
    if vis and not with_out:
        return [Finding('outputs', nb.name, f'none of its {len(vis)} visible code cells has a saved output, so the docs '
                        'page shows code without results (quarto does not run notebooks here); save the notebook executed', False)]
    return []

_re_mdlink = re.compile(r'(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_re_img = re.compile(r'!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_re_href = re.compile(r'''(?:href|src)\s*=\s*["']([^"']+)["']''')
_re_code = re.compile(r'```.*?```|`[^`\n]+`', re.S)

def check_links(nb: Path, nbs=NBS):
    "Relative links in markdown cells resolve: notebooks by .ipynb or by the .html nbdev gives them, other files on disk."
    pages = {page_name(p): p for p in notebooks(nbs)}
    stems = {p.stem: p for p in notebooks(nbs)}
    out, cells = [], read_nb(nb)['cells']
    for i, c in enumerate(cells):
        if c['cell_type'] != 'markdown': continue
        text = _re_code.sub('', src_of(c))
        targets = [(t, False) for t in _re_mdlink.findall(text)] + [(t, True) for t in _re_img.findall(text)]
        targets += [(t, False) for t in _re_href.findall(text)]
        for t, img in targets:
            url = t.split('#', 1)[0].split('?', 1)[0]
            if not url or re.match(r'^[a-z][a-z0-9+.-]*:', url, re.I) and not url.startswith(DOC_URL): continue
            if url.startswith(DOC_URL):
                url = url[len(DOC_URL):]
            p = (nb.parent/url)
            if url.endswith('.ipynb'):
                if not p.exists():
                    out.append(Finding('links', nb.name, f'cell {i}: link to `{t}`, but there is no {url}'))
            elif url.endswith('.html') and not img:
                if Path(url).name in pages: continue
                stem = Path(url).stem
                hint = (f' (quarto writes {stems[stem].name} as {page_name(stems[stem])}: link to `{stems[stem].name}` instead)'
                        if stem in stems else ' (no notebook renders to that page)')
                out.append(Finding('links', nb.name, f'cell {i}: link to `{t}` does not resolve{hint}'))
            elif not p.exists():
                out.append(Finding('links', nb.name, f'cell {i}: link to `{t}`, but {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} does not exist'))
        # mentions of another notebook by name, not linked: a reader can't click them
        for m in sorted(set(re.findall(r'`(\d\d_\w+?)(?:\.ipynb)?`', src_of(c)))):
            if m in stems and m != nb.stem:
                out.append(Finding('links', nb.name, f'cell {i}: mentions `{m}` without linking it; write [{m}]({m}.ipynb)', False))
    return out

def check_site_config(nbs=NBS):
    "_quarto.yml is what nbdev 2.4 expects: a website that reads nbdev.yml and sidebar.yml, no pre-2.3 nbdev filters."
    import yaml
    f, out = nbs/'_quarto.yml', []
    if not f.exists(): return [Finding('config', '_quarto.yml', 'missing (nbdev writes its default when absent)')]
    q = yaml.safe_load(f.read_text()) or {}
    if (q.get('project') or {}).get('type') != 'website':
        out.append(Finding('config', '_quarto.yml', 'project.type must be website'))
    mf = q.get('metadata-files') or []
    for need in ('nbdev.yml', 'sidebar.yml'):
        if need not in mf:
            out.append(Finding('config', '_quarto.yml', f'metadata-files must list {need}'))
    html_fmt = ((q.get('format') or {}).get('html') or {})
    if 'ipynb-filters' in html_fmt or 'ipynb-filters' in q:
        out.append(Finding('config', '_quarto.yml', 'remove ipynb-filters: nbdev >= 2.3 processes notebooks itself'))
    css = html_fmt.get('css')
    for c in ([css] if isinstance(css, str) else css or []):
        if not (nbs/c).exists():
            out.append(Finding('config', '_quarto.yml', f'css file {c} does not exist'))
    ny = nbs/'nbdev.yml'
    if not ny.exists() or (yaml.safe_load(ny.read_text()) or {}).get('project', {}).get('output-dir') != '_docs':
        out.append(Finding('config', 'nbdev.yml', 'missing or stale (refresh_quarto_yml writes it from settings.ini)'))
    return out

def _listed(text:str)->list:
    "The files a sidebar.yml lists, in order."
    import yaml
    listed = []
    def walk(items):
        for it in items or []:
            if isinstance(it, str):
                listed.append(it)
            elif isinstance(it, dict):
                for k in ('href', 'file'):
                    if k in it:
                        listed.append(it[k])
                walk(it.get('contents'))
    walk(((yaml.safe_load(text) or {}).get('website') or {}).get('sidebar', {}).get('contents'))
    return listed

def check_sidebar(nbs=NBS):
    """sidebar.yml lists every notebook present. An entry whose notebook does not exist is a warning, not an error:
    with `custom_sidebar = False` nbdev_docs rewrites sidebar.yml from the notebooks present (so a stale entry cannot
    break the site), and the sidebar may name notebooks written on other branches before they are merged."""
    f = nbs/'sidebar.yml'
    if not f.exists(): return [Finding('sidebar', 'sidebar.yml', 'missing (nbdev_sidebar writes it)')]
    listed = _listed(f.read_text())
    out = [Finding('sidebar', 'sidebar.yml', f'lists {x}, which does not exist (yet): nbdev_docs drops it from the site', False)
           for x in listed if not (nbs/x).exists()]
    present = [str(p.relative_to(nbs)) for p in notebooks(nbs)]
    out += [Finding('sidebar', 'sidebar.yml', f'does not list {x}') for x in present if x not in listed]
    return out

# ----------------------------------------------------------------------------------------------------------------
# Step 3: docstrings of the package, and show_doc in the processed notebooks

def lib_modules():
    import speeder
    return [f'{LIB}.{m.name}' for m in pkgutil.iter_modules(speeder.__path__) if not m.name.startswith('_')]

def _own_doc(obj):
    "The object's own docstring: not inherited, not the signature dataclasses/namedtuples invent."
    if inspect.isclass(obj):
        d = obj.__dict__.get('__doc__')
        if d and re.fullmatch(re.escape(obj.__name__) + r'\(.*\)', d.strip(), re.S): return None   # auto-generated
        if d == 'An enumeration.': return None
        return d
    return getattr(obj, '__doc__', None)

def public_api(mod):
    "(name, obj) for the functions and classes in `mod.__all__` that `mod` defines."
    res = []
    for nm in getattr(mod, '__all__', []):
        obj = getattr(mod, nm, None)
        obj = inspect.unwrap(obj) if inspect.isfunction(obj) else obj
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, '__module__', None) == mod.__name__:
            res.append((nm, obj))
    return res

def _undocumented_params(obj):
    from fastcore.docments import docments
    if inspect.isclass(obj) and '__init__' not in obj.__dict__: return []    # inherited constructor: not ours to document
    try:
        d = docments(obj, full=True)
    except Exception:
        return []
    return [k for k, v in d.items() if k not in ('self', 'cls', 'return') and v.get('docment') is None
            and getattr(v.get('kind'), 'name', '') not in ('VAR_POSITIONAL', 'VAR_KEYWORD')]

def check_docstrings(modules=None):
    out = []
    for name in modules or lib_modules():
        try:
            mod = importlib.import_module(name)
        except Exception as e:
            out.append(Finding('docstring', name, f'cannot import: {type(e).__name__}: {e}'))
            continue
        missing, params = [], []
        for nm, obj in public_api(mod):
            if not (_own_doc(obj) or '').strip():
                missing.append(nm)
            ps = _undocumented_params(obj)
            if ps:
                params.append(f"{nm}({', '.join(ps)})")
        if missing:
            out.append(Finding('docstring', name, f"public, no docstring: {', '.join(missing)}"))
        if params:
            out.append(Finding('params', name, f"parameters without a docments comment: {'; '.join(params)}", False))
    return out

def _export_cells(nb_cells):
    "Cells nbdev documents: `#| export`/`exports`/`exec_doc`, not hidden (nbdev's `_want_doc`)."
    res = []
    for i, c in enumerate(nb_cells):
        d = directives(src_of(c))
        if c['cell_type'] == 'code' and {'export', 'exports', 'exec_doc'} & set(d) and 'hide' not in d \
           and d.get('include') != 'false':
               res.append((i, c))
    return res

def exported_names(nb: Path):
    "Top-level public defs/classes in the notebook's documented export cells, with the module each goes to."
    cells = read_nb(nb)['cells']
    default = next((directives(src_of(c)).get('default_exp') for c in cells
                    if c['cell_type'] == 'code' and 'default_exp' in directives(src_of(c))), None)
    names, hidden = {}, {}
    for i, c in enumerate(cells):
        d = directives(src_of(c))
        if c['cell_type'] != 'code' or not {'export', 'exports', 'exec_doc'} & set(d): continue
        mod = (d.get('export') or d.get('exports') or default or '').split()[0] if (d.get('export') or d.get('exports') or default) else None
        try:
            tree = ast.parse(strip_directives(src_of(c)))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith('_'):
                target = hidden if ('hide' in d or d.get('include') == 'false') else names
                target[_documented_name(node)] = (mod, i)
    return names, hidden

def _documented_name(node)->str:
    "`Class.method` for a fastcore `@patch` on `Class` (what nbdev's show_doc names it), else the plain name."
    patched = any((isinstance(x, ast.Name) and x.id == 'patch') or
                  (isinstance(x, ast.Call) and isinstance(x.func, ast.Name) and x.func.id == 'patch')
                  for x in getattr(node, 'decorator_list', []))
    args = getattr(node, 'args', None)
    if not patched or not args or not args.args or args.args[0].annotation is None:
        return node.name
    owner = args.args[0].annotation
    owner = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
    return f'{owner}.{node.name}'

def _show_doc_cells(proc_nb):
    res = {}
    for c in proc_nb['cells']:
        if c['cell_type'] != 'code': continue
        m = re.search(r'^show_doc\((.+)\)\s*$', strip_directives(src_of(c)), re.M)
        if m:
            res[m.group(1).strip()] = c
    return res

def check_show_doc(nb: Path, nbs=NBS):
    proc = PROC/nb.relative_to(nbs)
    if not proc.exists(): return []   # processing failed: reported by check_processing
    names, hidden = exported_names(nb)
    shown, out = _show_doc_cells(read_nb(proc)), []
    missing = [n for n in names if n not in shown]
    if missing:
        out.append(Finding('show_doc', nb.name, f"no show_doc cell in _proc for exported {', '.join(missing)}"))
    empty = [n for n, c in shown.items() if not any('text/markdown' in o.get('data', {}) for o in c.get('outputs', []))]
    if empty:
        out.append(Finding('show_doc', nb.name, f"show_doc produced no output for {', '.join(empty)}"))
    if hidden:
        out.append(Finding('show_doc', nb.name, "exported from `#| hide` cells, so absent from the docs: "
                           + ', '.join(f'{n} (cell {i})' for n, (_, i) in hidden.items()), False))
    return out

def check_api_documented(nbs=NBS):
    "Every public function/class of every module gets a show_doc in some notebook."
    where = {}
    for nb in notebooks(nbs):
        names, hidden = exported_names(nb)
        for n, (mod, _) in {**hidden, **names}.items():
            where.setdefault((f'{LIB}.{mod}', n), []).append(nb)
    out = []
    for name in lib_modules():
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        orphans = [nm for nm, _ in public_api(mod) if (name, nm) not in where]
        if orphans:
            out.append(Finding('show_doc', name, f"public, but no notebook export cell defines it (stale .py, or "
                                       f"defined by assignment): {', '.join(orphans)}", False))
    return out

# ----------------------------------------------------------------------------------------------------------------
# Step 4: render _proc/*.ipynb to HTML with nbconvert (a stand-in for quarto; no execution)

_re_qattr = re.compile(r'(\[[^\]]*\]\([^)]*\))\{[^}]*\}')    # pandoc/quarto link attributes: [a](b){target="_blank"}
_re_fence = re.compile(r'^:::+\s*(\{[^}]*\}|[\w.-]+)?\s*$', re.M)

def _fix_md(s, pages):
    "Make quarto-flavoured markdown readable by nbconvert, and make doc links work between local preview pages."
    s = _re_qattr.sub(r'\1', s)
    def fence(m):
        cls = (m.group(1) or '').strip('{} ').replace('.', ' ').strip()
        return f'<div class="{html.escape(cls)}">' if cls else '</div>'
    s = _re_fence.sub(fence, s)
    s = s.replace(DOC_URL, '')
    s = re.sub(r'\]\(([\w./-]+?)\.ipynb(#[^)]*)?\)', lambda m: f']({page_name(Path(m.group(1)))}{m.group(2) or ""})', s)
    return s

def preview_nb(proc_nb, pages):
    "Turn a processed notebook into what quarto would show: frontmatter -> title, directives applied, markdown fixed."
    import nbformat
    nb = nbformat.from_dict(proc_nb)
    fm, cells = {}, []
    for c in nb.cells:
        src = src_of(c)
        if c.cell_type == 'raw' and src.strip().startswith('---') and not fm:
            import yaml
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            continue
        if 'source' not in c or not src.strip(): continue            # hidden by nbdev (source deleted)
        if c.cell_type == 'markdown':
            c.source = _fix_md(src, pages)
            cells.append(c)
            continue
        if c.cell_type != 'code': continue
        d = directives(src)
        if d.get('include') == 'false': continue
        c.source = strip_directives(src)
        if d.get('echo') == 'false':
            c.metadata['transient'] = {'remove_source': True}
        if d.get('output') == 'false':
            c.outputs = []
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}):
                md = o['data']['text/markdown']
                md = ''.join(md) if isinstance(md, list) else md
                o['data']['text/markdown'] = _fix_md(md, pages)
                o['data'].pop('text/plain', None)
        if not c.source.strip() and not c.get('outputs'): continue
        cells.append(c)
    nb.cells = cells
    return nb, fm

def _sidebar_items(nbs=NBS):
    import yaml
    f = nbs/'sidebar.yml'
    items = []
    def walk(xs, depth):
        for it in xs or []:
            if isinstance(it, str):
                items.append(('file', it, depth))
            elif isinstance(it, dict) and 'section' in it:
                items.append(('section', it['section'], depth))
                walk(it.get('contents'), depth+1)
            elif isinstance(it, dict):
                items.append(('file', it.get('href') or it.get('file'), depth))
    if f.exists():
        walk((yaml.safe_load(f.read_text()) or {}).get('website', {}).get('sidebar', {}).get('contents'), 0)
    return items

def _title_of(nb: Path):
    for c in read_nb(nb)['cells']:
        if c['cell_type'] == 'markdown':
            m = _re_h1.search(src_of(c))
            return m.group(1) if m else nb.stem
    return nb.stem

def render(nbs=NBS, results=None):
    "nbconvert every processed notebook into `_proc/_preview/<page>.html` with our preview template. Returns findings."
    from nbconvert import HTMLExporter
    import yaml
    results = results or {}
    PREVIEW.mkdir(parents=True, exist_ok=True)
    for f in PREVIEW.glob('*.html'):
        f.unlink()          # pages of renamed/removed notebooks must not linger
    site = yaml.safe_load((nbs/'nbdev.yml').read_text())['website'] if (nbs/'nbdev.yml').exists() else {}
    pages = {page_name(p): p for p in notebooks(nbs)}
    nav = []
    for kind, x, depth in _sidebar_items(nbs):
        if kind == 'section':
            nav.append({'section': x, 'depth': depth})
            continue
        p = nbs/x
        if not p.exists(): continue          # not written yet (another branch): nbdev_docs leaves it out of the site
        nav.append({'href': page_name(p), 'title': _title_of(p), 'depth': depth, 'missing': False})
    css = (HERE/'preview.css').read_text() + '\n' + ((nbs/'styles.css').read_text() if (nbs/'styles.css').exists() else '')
    ex = HTMLExporter(template_name='preview', extra_template_basedirs=[str(HERE/'templates')])
    ex.exclude_input_prompt = ex.exclude_output_prompt = True
    out = []
    for nb in notebooks(nbs):
        proc = PROC/nb.relative_to(nbs)
        if not proc.exists() or results.get(nb, {}).get('error'): continue
        try:
            pnb, fm = preview_nb(read_nb(proc), pages)
            toc = [(len(m.group(1)), re.sub(r'[`*]', '', m.group(2)).strip()) for c in pnb.cells if c.cell_type == 'markdown'
                   for m in re.finditer(r'^(##+)\s+(.+)$', c.source, re.M)]
            resources = {'metadata': {'name': fm.get('title', nb.stem)},
                         'speeder': {'title': _inline_md(fm.get('title', nb.stem)), 'description': _inline_md(fm.get('description', '')),
                                     'site_title': site.get('title', LIB), 'nav': nav, 'page': page_name(nb),
                                     'css': css, 'toc': [(lvl, t, _slug(t)) for lvl, t in toc if lvl <= 3]}}
            body, _ = ex.from_notebook_node(pnb, resources=resources)
            (PREVIEW/page_name(nb)).write_text(body, encoding='utf-8')
        except Exception as e:
            out.append(Finding('render', nb.name, f'nbconvert failed: {type(e).__name__}: {e}'))
    return out

def _inline_md(s):
    "Title and description are markdown for quarto (backticks, emphasis): render them inline."
    from nbconvert.filters import markdown2html
    h = markdown2html(str(s)).strip() if s else ''
    return h[3:-4] if h.startswith('<p>') and h.endswith('</p>') else h

def _slug(t):
    "The id nbconvert's markdown renderer gives a heading (spaces -> '-')."
    return re.sub(r'\s+', '-', html.unescape(t).strip())

# ----------------------------------------------------------------------------------------------------------------
# Step 5 (optional): screenshots with headless Chromium

def find_chromium():
    return next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(b)), None)

def screenshot(html_file: Path, png: Path, size=(1280, 2000), timeout=120):
    exe = find_chromium()
    if exe is None: raise FileNotFoundError('no chromium binary on PATH (Debian: apt-get install -y chromium)')
    with tempfile.TemporaryDirectory() as prof:
        cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars',
               f'--user-data-dir={prof}', f'--screenshot={png}', f'--window-size={size[0]},{size[1]}',
               Path(html_file).resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not Path(png).exists(): raise RuntimeError(f'chromium wrote no screenshot: {r.stderr[-500:]}')
    return Path(png)

# ----------------------------------------------------------------------------------------------------------------

def run_checks(nbs=NBS, force=False, screenshots=None, pages=('index', '03_data'), quiet=False):
    "Everything above, in order. Returns (findings, results-of-processing, screenshot paths)."
    t0 = time.time()
    def say(*a):
        if not quiet:
            print(*a, file=sys.stderr)
    refresh_site_files(nbs)
    say(f'refreshed nbdev.yml and sidebar.yml ({time.time()-t0:.1f}s)')
    results = process_notebooks(nbs, force=force)
    say(f'processed {len(results)} notebooks into {PROC} ({time.time()-t0:.1f}s)')
    for nb, r in results.items():
        proc = PROC/nb.relative_to(nbs)
        n_sd = len(_show_doc_cells(read_nb(proc))) if proc.exists() and not r['error'] else 0
        took = 'cached' if r.get('cached') else f"{r['seconds']:.1f}s"
        say(f"  {nb.name:24s} {'FAILED' if r['error'] else 'ok':6s} {took:>7s}  {n_sd:3d} show_doc")
    findings = check_processing(results) + check_site_config(nbs) + check_sidebar(nbs)
    for nb in notebooks(nbs):
        findings += check_title(nb) + check_links(nb, nbs) + check_show_doc(nb, nbs) + check_outputs(nb)
    findings += check_docstrings() + check_api_documented(nbs)
    say(f'checked titles, links, show_doc and docstrings ({time.time()-t0:.1f}s)')
    findings += render(nbs, results)
    say(f'rendered HTML into {PREVIEW} ({time.time()-t0:.1f}s)')
    shots = []
    if screenshots:
        out = Path(screenshots)
        out.mkdir(parents=True, exist_ok=True)
        for p in pages:
            nb = next((n for n in notebooks(nbs) if n.stem == p or page_name(n) == p or page_name(n) == p + '.html'), None)
            if nb is None or not (PREVIEW/page_name(nb)).exists():
                findings.append(Finding('render', p, 'no rendered page to screenshot'))
                continue
            shots.append(screenshot(PREVIEW/page_name(nb), out/f'{nb.stem}.png'))
        say(f'screenshots: {", ".join(map(str, shots))} ({time.time()-t0:.1f}s)')
    return findings, results, shots

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--screenshots', metavar='OUT_DIR', help='also screenshot the rendered pages with headless chromium')
    ap.add_argument('--pages', default='index,03_data', help='notebooks to screenshot (comma-separated stems)')
    ap.add_argument('--force', action='store_true', help='reprocess every notebook (ignore the _proc cache)')
    ap.add_argument('--json', metavar='FILE', help='also write the findings as JSON')
    ap.add_argument('--proc-one', nargs=2, metavar=('SRC', 'DST'), help=argparse.SUPPRESS)   # worker mode
    a = ap.parse_args(argv)
    if a.proc_one:
        print(json.dumps(_proc_one(a.proc_one)))
        return 0
    findings, results, shots = run_checks(force=a.force, screenshots=a.screenshots, pages=a.pages.split(','))
    for f in sorted(findings, key=lambda f: (not f.error, f.check, f.where)):
        print(f)
    n_err = sum(f.error for f in findings)
    print(f'{n_err} errors, {len(findings)-n_err} warnings; HTML in {PREVIEW}'
          + (f'; screenshots: {", ".join(map(str, shots))}' if shots else ''))
    if a.json:
        Path(a.json).write_text(json.dumps([dataclasses.asdict(f) for f in findings], indent=1))
    return 1 if n_err else 0

if __name__ == '__main__':
    sys.exit(main())
