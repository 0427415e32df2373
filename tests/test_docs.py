"""The docs site, checked without quarto (see tests/docs/check_docs.py): notebooks process with nbdev and render
with nbconvert, open with a title and a paragraph, document every public function, and link to pages that exist."""
import html, importlib.util, json, re, sys
from pathlib import Path
import pytest

_spec = importlib.util.spec_from_file_location('check_docs', Path(__file__).parent/'docs'/'check_docs.py')
cd = sys.modules.setdefault('check_docs', importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(cd)

NBS = cd.notebooks()
IDS = [p.name for p in NBS]

def errors(findings):
    return [str(f) for f in findings if f.error]

@pytest.fixture(scope='module')
def processed():
    "nbdev_proc_nbs's work (nbdev.yml, sidebar.yml, _proc/*.ipynb), once for this module; cached by source hash."
    cd.refresh_site_files()
    return cd.process_notebooks()

# --- the project's notebooks and package --------------------------------------------------------------------

def test_quarto_config_fits_nbdev(processed):
    assert errors(cd.check_site_config()) == []

def test_sidebar_lists_every_notebook(processed):
    assert errors(cd.check_sidebar()) == []

@pytest.mark.parametrize('nb', NBS, ids=IDS)
def test_notebook_processes(processed, nb):
    "nbdev's processors (which execute import, export and show_doc cells) run through."
    assert errors(cd.check_processing({nb: processed[nb]})) == []

@pytest.mark.parametrize('nb', NBS, ids=IDS)
def test_notebook_opens_with_title_and_paragraph(nb):
    assert errors(cd.check_title(nb)) == []

@pytest.mark.parametrize('nb', NBS, ids=IDS)
def test_notebook_links_resolve(nb):
    assert errors(cd.check_links(nb)) == []

@pytest.mark.parametrize('nb', NBS, ids=IDS)
def test_exported_functions_have_show_doc(processed, nb):
    if processed[nb]['error']:
        pytest.skip('processing failed (test_notebook_processes)')
    assert errors(cd.check_show_doc(nb)) == []

@pytest.mark.parametrize('module', cd.lib_modules())
def test_public_api_has_docstrings(module):
    assert errors(cd.check_docstrings([module])) == []

def test_pages_render(processed):
    assert errors(cd.render(results=processed)) == []
    for nb, r in processed.items():
        if r['error']: continue
        page = (cd.PREVIEW/cd.page_name(nb)).read_text()
        h1 = re.search(r'<h1 class="title">(.*?)</h1>', page, re.S)
        assert h1 and html.unescape(re.sub(r'<[^>]+>', '', h1.group(1))) == cd._title_of(nb).replace('`', ''), nb.name
        assert 'show_doc(' not in page, f'{nb.name}: show_doc source should be hidden (echo: false)'

@pytest.mark.skipif(cd.find_chromium() is None, reason='no chromium binary (Debian: apt-get install -y chromium)')
def test_screenshots(processed, tmp_path):
    from PIL import Image
    import numpy as np
    cd.render(results=processed)
    for stem in ('index', '03_data', '25_explore'):
        nb = next(p for p in NBS if p.stem == stem)
        if processed[nb]['error']: continue
        png = cd.screenshot(cd.PREVIEW/cd.page_name(nb), tmp_path/f'{stem}.png')
        im = np.asarray(Image.open(png).convert('L'), dtype=float)
        assert im.shape == (2000, 1280)
        assert im.std() > 10, f'{stem}: the screenshot is (nearly) blank'

# --- the checker itself: each check fails on a bad example ----------------------------------------------------

def _nb(path, *cells):
    "Write a notebook from ('md'|'code', source) pairs."
    cs = [{'cell_type': 'markdown' if k == 'md' else 'code', 'metadata': {}, 'source': s,
           **({} if k == 'md' else {'outputs': [], 'execution_count': None})} for k, s in cells]
    path.write_text(json.dumps({'cells': cs, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    return path

PARA = 'This notebook builds the thing up from a tiny example to the exported function.'

def test_check_title_catches_problems(tmp_path):
    good = _nb(tmp_path/'01_a.ipynb', ('md', '# A\n> one line'), ('code', '#| default_exp a'), ('md', PARA))
    assert cd.check_title(good) == []
    no_title = _nb(tmp_path/'02_b.ipynb', ('md', PARA))
    assert 'Title' in errors(cd.check_title(no_title))[0]
    no_summary = _nb(tmp_path/'03_c.ipynb', ('md', '# C'), ('md', PARA))
    assert 'summary' in errors(cd.check_title(no_summary))[0]
    crowded = _nb(tmp_path/'04_d.ipynb', ('md', f'# D\n> s\n\n{PARA}'), ('md', PARA))
    assert 'drops' in errors(cd.check_title(crowded))[0]
    code_first = _nb(tmp_path/'05_e.ipynb', ('md', '# E\n> s'), ('code', 'print(1)'), ('md', PARA))
    assert 'paragraph' in errors(cd.check_title(code_first))[0]
    only_heading = _nb(tmp_path/'06_f.ipynb', ('md', '# F\n> s'), ('md', '## Section'))
    assert 'prose' in errors(cd.check_title(only_heading))[0]

def test_check_links_catches_broken_links(tmp_path):
    _nb(tmp_path/'index.ipynb', ('md', '# I\n> s'))
    _nb(tmp_path/'05_sasrec.ipynb', ('md', '# S\n> s'))
    nb = _nb(tmp_path/'02_x.ipynb', ('md', '# X\n> s'), ('md', '[ok](05_sasrec.ipynb) [ok](sasrec.html#fit) [ok](index.html) '
             '[bad](08_mrc.ipynb) [bad](05_sasrec.html) [web](https://example.org/a.html) `[code](nope.ipynb)`'))
    errs = errors(cd.check_links(nb, nbs=tmp_path))
    assert len(errs) == 2, errs
    assert '08_mrc.ipynb' in errs[0] and 'sasrec.html' in errs[1] and 'instead' in errs[1]
    assert cd.page_name(tmp_path/'03_data.ipynb') == 'data.html' and cd.page_name(tmp_path/'index.ipynb') == 'index.html'

def test_check_docstrings_catches_missing(tmp_path, monkeypatch):
    (tmp_path/'fake_docs_mod.py').write_text('''
import dataclasses
from json import dumps as imported
__all__ = ['good', 'bad', 'Conf', 'Plain', 'CONST', 'imported']
def good(x, # the input
        ):
    "Documented."
def bad(x): pass
@dataclasses.dataclass
class Conf: a: int = 1
class Plain: pass
CONST = 3
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    found = cd.check_docstrings(['fake_docs_mod'])
    assert errors(found) == ['ERROR [docstring] fake_docs_mod: public, no docstring: bad, Conf, Plain']
    params = [f.message for f in found if f.check == 'params']
    assert len(params) == 1 and 'bad(x)' in params[0] and 'Conf(a)' in params[0] and 'good' not in params[0], params

def test_show_doc_names_follow_nbdev(tmp_path):
    nb = _nb(tmp_path/'01_a.ipynb', ('md', '# A\n> s'), ('code', '#| default_exp a'),
             ('code', '#| export\ndef f(): "doc"\nclass K: "doc"\ndef _private(): pass'),
             ('code', '#| export\n#| hide\ndef helper(): "doc"'), ('code', 'def not_exported(): pass'))
    names, hidden = cd.exported_names(nb)
    assert list(names) == ['f', 'K'] and list(hidden) == ['helper'] and names['f'][0] == 'a'

def test_check_sidebar_and_config_catch_drift(tmp_path):
    _nb(tmp_path/'index.ipynb', ('md', '# I\n> s'))
    _nb(tmp_path/'03_data.ipynb', ('md', '# D\n> s'))
    (tmp_path/'sidebar.yml').write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - 05_sasrec.ipynb\n')
    found = cd.check_sidebar(tmp_path)
    assert errors(found) == ['ERROR [sidebar] sidebar.yml: does not list 03_data.ipynb']
    assert [f.message for f in found if not f.error] == ['lists 05_sasrec.ipynb, which does not exist (yet): nbdev_docs drops it from the site']
    (tmp_path/'_quarto.yml').write_text('project:\n  type: website\nformat:\n  html:\n    css: nope.css\nmetadata-files: [nbdev.yml]\n')
    errs = errors(cd.check_site_config(tmp_path))
    assert any('sidebar.yml' in e for e in errs) and any('nope.css' in e for e in errs) and any('nbdev.yml' in e for e in errs)
