"JupyterLab, tried as a person would (tests/browser/lab_check.py); skipped where there is no Chromium (CI)."
import importlib.util, sys
from pathlib import Path
import pytest

_spec = importlib.util.spec_from_file_location('lab_check', Path(__file__).parent/'lab_check.py')
lab = sys.modules.setdefault('lab_check', importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(lab)

@pytest.mark.skipif(lab.find_chromium() is None, reason='no chromium binary (Debian: apt-get install -y chromium)')
def test_explore_notebook_in_jupyterlab(tmp_path):
    res = lab.check_lab('nbs/25_explore.ipynb', tmp_path)
    assert res['ok'], res['problems']
    from PIL import Image
    import numpy as np
    shots = {Path(p).name: p for p in res['screenshots']}
    assert {'lab-2-explorer-answer.png', 'lab-5-explorer-position.png', 'lab-6-explorer-runs.png'} <= set(shots)
    for p in shots.values():
        im = np.asarray(Image.open(p).convert('L'), dtype=float)
        assert im.shape == (1900, 1400) and im.std() > 10, f'{p}: blank screenshot'
