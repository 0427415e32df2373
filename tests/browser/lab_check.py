"""Open a notebook in JupyterLab with headless Chromium, run all its cells, use its explorer app, take screenshots.

    python tests/browser/lab_check.py [--notebook nbs/25_explore.ipynb] [--out DIR] [--timeout 420]

What a person would do, done by a script: start `jupyter lab --no-browser` on 127.0.0.1 with a random token (own
settings and workspace folders, so nothing of yours is read or written), open the notebook's URL in headless
Chromium, run every cell (the `notebook:run-all-cells` command, through `window.jupyterapp`, which
`--expose-app-in-browser` exposes), wait for the kernel, then look at the explorer app: screenshots of the
app, of its Position and Runs tabs, and after picking another user in its dropdown. Chromium is driven through the
DevTools protocol over a pipe (`--remote-debugging-pipe`: null-terminated JSON on fds 3 and 4), so only the
standard library is needed. Exit status 0 when every check passed; the screenshots are written either way.

Needs a `chromium` binary (Debian: `apt-get install -y chromium`); exits with status 77 (skip) without one.
"""
from __future__ import annotations
import argparse, base64, json, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = 77

def find_chromium():
    return next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(b)), None)

def free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

# ----------------------------------------------------------------------------------------------------------------
# JupyterLab

def start_lab(tmp:Path, port:int, token:str, log)->subprocess.Popen:
    "jupyter lab on 127.0.0.1 serving the repository, with throw-away settings and workspaces."
    settings = tmp/'settings'/'@jupyterlab'/'apputils-extension'
    settings.mkdir(parents=True)
    (settings/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--port-retries=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--expose-app-in-browser',
           f'--LabApp.user_settings_dir={tmp/"settings"}', f'--LabApp.workspaces_dir={tmp/"workspaces"}',
           '--LabApp.news_url=None', '--ServerApp.open_browser=False'] + (['--allow-root'] if os.geteuid() == 0 else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
               JUPYTER_RUNTIME_DIR=str(tmp/'runtime'), MPLBACKEND='module://matplotlib_inline.backend_inline')
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)

def wait_for_lab(port:int, token:str, proc, timeout:float=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f'jupyter lab exited with status {proc.returncode}')
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=2) as r:
                if r.status == 200: return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f'jupyter lab did not answer on port {port} within {timeout}s')

# ----------------------------------------------------------------------------------------------------------------
# Chromium over the DevTools pipe

class Chromium:
    "Headless Chromium driven over `--remote-debugging-pipe` (fd 3: commands in, fd 4: replies and events out)."
    def __init__(self, exe:str, profile:Path, size=(1400, 1900)):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        def fds():
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)
        self.proc = subprocess.Popen([exe, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-sync',
                                      '--disable-background-networking', '--disable-component-update', '--hide-scrollbars',
                                      '--remote-debugging-pipe', f'--user-data-dir={profile}', f'--window-size={size[0]},{size[1]}',
                                      'about:blank'], pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session, self.size = b'', 0, None, size
        page = next(t for t in self.call('Target.getTargets')['targetInfos'] if t['type'] == 'page')
        self.session = self.call('Target.attachToTarget', targetId=page['targetId'], flatten=True, _session=False)['sessionId']
        self.call('Page.enable')
        self.call('Runtime.enable')
        self.call('Emulation.setFocusEmulationEnabled', enabled=True)   # the page behaves as if it had focus
        self.call('Emulation.setDeviceMetricsOverride', width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)

    def _read(self)->dict:
        while b'\0' not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError('chromium closed the DevTools pipe')
            self._buf += chunk
        msg, self._buf = self._buf.split(b'\0', 1)
        return json.loads(msg)

    def call(self, method:str, _session:bool=True, **params)->dict:
        self._id += 1
        msg = dict(id=self._id, method=method, params=params)
        if _session and self.session:
            msg['sessionId'] = self.session
        os.write(self._w, json.dumps(msg).encode() + b'\0')
        while True:
            m = self._read()
            if m.get('id') == self._id:
                if 'error' in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get('result', {})

    def js(self, expr:str, timeout:float=60):
        "Evaluate JavaScript in the page (promises awaited); returns its value."
        r = self.call('Runtime.evaluate', expression=expr, awaitPromise=True, returnByValue=True, timeout=int(timeout * 1000))
        if 'exceptionDetails' in r: raise RuntimeError(f"JS error: {r['exceptionDetails'].get('exception', {}).get('description', r['exceptionDetails'])}")
        return r.get('result', {}).get('value')

    def wait(self, expr:str, timeout:float=120, every:float=0.5, what:str=''):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                v = self.js(expr)
                if v: return v
            except RuntimeError:
                pass
            time.sleep(every)
        raise TimeoutError(f'waited {timeout:.0f}s for {what or expr[:80]}')

    def click(self, x:float, y:float):
        "A real left click (mouse down and up) at page coordinates, as a person's mouse would."
        for kind in ('mouseMoved', 'mousePressed', 'mouseReleased'):
            self.call('Input.dispatchMouseEvent', type=kind, x=x, y=y, button='left' if kind != 'mouseMoved' else 'none',
                      clickCount=1 if kind != 'mouseMoved' else 0)

    def screenshot(self, png:Path)->Path:
        data = self.call('Page.captureScreenshot', format='png')['data']
        png.write_bytes(base64.b64decode(data))
        return png

    def close(self):
        try:
            self.call('Browser.close', _session=False)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

# ----------------------------------------------------------------------------------------------------------------
# The checks

NB = "window.__nb"   # the notebook panel (set by `find_panel_js`; shell.currentWidget follows focus, which headless pages lack)
KERNEL = f"({NB} && {NB}.sessionContext && {NB}.sessionContext.session && {NB}.sessionContext.session.kernel)"
CELLS = f"{NB}.content.widgets"

def find_panel_js(path:str)->str:
    return (f"(() => {{ if (!window.jupyterapp) return false; const w = Array.from(jupyterapp.shell.widgets('main'))"
            f".find(w => w.context && w.context.path === {json.dumps(path)}); if (!w) return false; window.__nb = w; "
            f"jupyterapp.shell.activateById(w.id); return true; }})()")

def app_cell_js(body:str)->str:
    "JavaScript run with `out` = the output area of the cell that displays the explorer app (source starts `app = explore(`)."
    return (f"(() => {{ const cells = {CELLS}; const i = cells.findIndex(c => c.model.type === 'code' && "
            f"c.model.sharedModel.getSource().split('\\n').some(l => l.startsWith('app = explore('))); "
            f"if (i < 0) return null; const out = cells[i].node.querySelector('.jp-Cell-outputArea'); {body} }})()")

def check_lab(notebook:str='nbs/25_explore.ipynb', out:Path|None=None, timeout:float=420, size=(1400, 1900))->dict:
    "Run the whole check; returns {'ok', 'problems', 'screenshots', 'seconds'}."
    exe = find_chromium()
    if exe is None: raise FileNotFoundError('no chromium binary on PATH (Debian: apt-get install -y chromium)')
    out = Path(out or tempfile.mkdtemp(prefix='lab-check-'))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='lab-run-'))
    port, token, t0 = free_port(), secrets.token_hex(16), time.time()
    problems, shots = [], []
    say = lambda *a: print(f'[{time.time() - t0:5.1f}s]', *a, file=sys.stderr, flush=True)
    log = open(out/'jupyter-lab.log', 'w')
    lab = start_lab(tmp, port, token, log)
    browser = None
    try:
        wait_for_lab(port, token, lab)
        say(f'jupyter lab up on 127.0.0.1:{port}')
        browser = Chromium(exe, tmp/'chromium', size)
        browser.call('Page.navigate', url=f'http://127.0.0.1:{port}/lab/tree/{notebook}?reset&token={token}')
        browser.wait(find_panel_js(notebook), 120, what='the notebook to open')
        browser.wait(f"{KERNEL} && {KERNEL}.status === 'idle'", 120, what='the kernel to start')
        say('notebook open, kernel idle: running all cells')
        t_run = time.time()
        browser.js("jupyterapp.commands.execute('notebook:run-all-cells')", timeout=timeout)   # resolves when the cells are done
        n_code = browser.js(f"{CELLS}.filter(c => c.model.type === 'code').length")
        done = f"{CELLS}.every(c => c.model.type !== 'code' || (c.model.executionCount !== null && !c.node.classList.contains('jp-mod-executing'))) && {KERNEL}.status === 'idle'"
        errors_js = (f"{CELLS}.filter(c => c.model.type === 'code').map((c, i) => [i, Array.from({{length: c.model.outputs.length}}, "
                     f"(_, k) => c.model.outputs.get(k).toJSON()).filter(o => o.output_type === 'error')]).filter(x => x[1].length)"
                     f".map(x => x[0] + ': ' + x[1][0].ename + ': ' + x[1][0].evalue)")
        while time.time() - t_run < timeout:
            if browser.js(errors_js): break
            if browser.js(done): break
            time.sleep(1)
        else:
            problems.append(f'the notebook did not finish within {timeout:.0f}s')
        errs = browser.js(errors_js)
        if errs:
            problems += [f'cell error {e}' for e in errs]
        ran = browser.js(f"{CELLS}.filter(c => c.model.type === 'code' && c.model.executionCount !== null).length")
        say(f'{ran}/{n_code} code cells ran in {time.time() - t_run:.0f}s' + (f'; errors: {errs}' if errs else ''))
        shots.append(browser.screenshot(out/'lab-1-notebook-top.png'))
        if errs:
            idx = int(errs[0].split(':')[0])
            browser.js(f"{NB}.content.activeCellIndex = {idx}; {NB}.content.scrollToItem({idx}, 'start')")
            time.sleep(1)
            shots.append(browser.screenshot(out/'lab-error-cell.png'))
            return dict(ok=False, problems=problems, screenshots=[str(s) for s in shots], seconds=time.time() - t0)
        # the app: scroll its cell to the top of the window and wait for the widget view to render
        browser.js(app_cell_js(f"{NB}.content.activeCellIndex = i; return {NB}.content.scrollToItem(i, 'start').then(() => true);"))
        try:
            browser.wait(app_cell_js("return !!(out && out.querySelector('.widget-tab, .jupyter-widget-tab, .jupyter-widgets-tab'));"),
                          60, what='the explorer widget to render')
        except TimeoutError as e:
            problems.append(f'the explorer app did not render as a widget ({e})')
        time.sleep(1.5)
        text = browser.js(app_cell_js("return out ? out.innerText : '';")) or ''
        if 'Error displaying widget' in text or 'Error rendering' in text:
            problems.append('the widget shows an error instead of the app')
        if 'tiny stand-in' in text and 'noise' not in text:
            problems.append('the stand-in banner is incomplete')
        for need in ('History', 'Candidates', 'target'):
            if need not in text:
                problems.append(f'the app does not show {need!r}')
        shots.append(browser.screenshot(out/'lab-2-explorer-answer.png'))
        # pick another user in the dropdown, as a person would
        picked = browser.js(app_cell_js(
            "const sel = Array.from(out.querySelectorAll('.widget-dropdown')).find(d => d.innerText.trim().startsWith('user'));"
            "const s = sel && sel.querySelector('select'); if (!s || s.options.length < 2) return null;"
            "s.selectedIndex = 1; s.dispatchEvent(new Event('change', {bubbles: true})); return s.options[1].text;"))
        if picked is None:
            problems.append('no user dropdown with two users in the app')
        else:
            try:
                browser.wait(app_cell_js(f"return out.innerText.includes('user ' + {json.dumps(picked)} + ' —');"), 60,
                             what=f'the app to show user {picked}')
                say(f'picked user {picked} in the dropdown: the app followed')
            except TimeoutError as e:
                problems.append(f'picking user {picked} did not update the app ({e})')
            time.sleep(1)
            shots.append(browser.screenshot(out/'lab-3-explorer-other-user.png'))
        for k, tab in enumerate(('MoME attention', 'Position', 'Runs')):
            at = browser.js(app_cell_js(
                f"const t = Array.from(out.querySelectorAll('.lm-TabBar-tab')).find(e => e.innerText.trim() === {json.dumps(tab)});"
                "if (!t) return null; t.scrollIntoView({block: 'center'}); const r = t.getBoundingClientRect(); "
                "return [r.x + r.width / 2, r.y + r.height / 2];"))
            if not at:
                problems.append(f'no {tab!r} tab in the app')
                continue
            browser.click(*at)
            want = {'MoME attention': 'item', 'Position': 'score pick', 'Runs': 'SASRec'}[tab]
            try:
                browser.wait(app_cell_js(f"const p = out.querySelector('.lm-TabPanel-stackedPanel:not(.lm-mod-hidden), .widget-tab-contents > .lm-Widget:not(.lm-mod-hidden)');"
                                          f"return !!p && p.innerText.includes({json.dumps(want)});"), 90, what=f'the {tab} tab')
            except TimeoutError as e:
                problems.append(f'the {tab!r} tab did not show its content ({e})')
            time.sleep(1)
            shots.append(browser.screenshot(out/f'lab-{4 + k}-explorer-{tab.split()[0].lower()}.png'))
        say('screenshots: ' + ', '.join(str(s) for s in shots))
    finally:
        if browser:
            browser.close()
        _stop(lab)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(ok=not problems, problems=problems, screenshots=[str(s) for s in shots], seconds=round(time.time() - t0, 1))

def _stop(proc):
    "End the process group we started (jupyter lab and its kernels)."
    if proc.poll() is not None: return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    except ProcessLookupError:
        pass

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--notebook', default='nbs/25_explore.ipynb', help='notebook path relative to the repository')
    ap.add_argument('--out', default=None, help='folder for the screenshots and the jupyter lab log (default: a temp folder)')
    ap.add_argument('--timeout', type=float, default=420, help='seconds allowed for running all cells')
    a = ap.parse_args(argv)
    if find_chromium() is None:
        print('skipped: no chromium binary (Debian: apt-get install -y chromium)', file=sys.stderr)
        return SKIP
    res = check_lab(a.notebook, a.out, a.timeout)
    print(json.dumps(res, indent=1))
    return 0 if res['ok'] else 1

if __name__ == '__main__':
    sys.exit(main())
