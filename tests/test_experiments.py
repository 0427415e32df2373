"""What a run measures (issue 16), on the tiny stand-in: seeds change results and the same seed repeats them; ablate and
compare report mean, sd and n over seeds; a recipe's fields reach config.json; the kept weights are the best valid point
and survive a resume; the report has the reference lines and the history controls; the demo's phases fit in its wall
time; bad `--seeds` and `--recipe` are one-line errors."""
import json
from pathlib import Path
import numpy as np, pytest, torch
from speeder.cli import run_cli
from speeder.config import PRESETS, SPEEDER, STAND_IN, SpeederError, preset_settings
import speeder.experiments as exp
import speeder.train as train
from speeder.compare import compare_main, compare_markdown
from speeder.mpo import RunInterrupted
from speeder.runs import CHECKPOINTS, KEPT, REPORT, load_kept, read_run_config
from speeder.train import trained_state

pytestmark = pytest.mark.usefixtures('ml100k')   # the runs' dataset, built once per session (conftest.py)

TINY = preset_settings(STAND_IN, train_examples=48, batch_size=4, eval_examples=20, valid_examples=10, max_steps=3)
TINY_SET = ['--set', *(f'{k}={json.dumps(v)}' for k, v in preset_settings(STAND_IN, valid_examples=10).items() if k != 'llm')]
TINY_CLI = ['--llm', STAND_IN, '--batch-size', '4', '--train-examples', '32', '--eval-examples', '8', *TINY_SET]

def tree(folder:Path)->list:
    "Every path under `folder` (what 'nothing written' compares)."
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))

def one_line_error(r, says:str):
    "Exit 2, one line on stderr naming the problem, no traceback, the JSON error as the last stdout line."
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr and says in r.stderr, r.stderr[-2000:]
    assert len([l for l in r.stderr.splitlines() if 'error:' in l]) == 1, r.stderr
    assert says in json.loads(r.stdout.strip().splitlines()[-1])['error']

def losses(run_dir)->list:
    "Every step's LM loss of a finished run."
    return [r['lm_loss'] for r in json.loads((Path(run_dir)/'history.json').read_text())['history']]

@pytest.fixture(scope='module')
def ablated(tmp_path_factory):
    "`speeder ablate` of two variants with two seeds each, on the tiny stand-in."
    d = tmp_path_factory.mktemp('ablate')
    return d, exp.ablate_main(variants=[SPEEDER, 'paper'], runs_dir=d, seeds=2, **TINY)

# --- seeds ----------------------------------------------------------------------------------------------------------

def test_ablate_seeds_mean_sd_n(ablated):
    d, res = ablated
    test_rows = {r['variant']: r for r in res['rows']}
    assert res['seeds'] == [0, 1] and list(test_rows) == [SPEEDER, 'paper']
    row = test_rows[SPEEDER]
    assert row['n'] == 2 and [r['seed'] for r in row['runs']] == [0, 1]
    vals = [r['score_hr1'] for r in row['runs']]
    assert row['score_hr1'] == pytest.approx(np.mean(vals)) and row['score_hr1_sd'] == pytest.approx(np.std(vals, ddof=1))
    assert [read_run_config(r['run_dir']).seed for r in row['runs']] == [0, 1]
    assert {'own', 'other', 'popular_item', 'margin_lost'} <= set(row) and row['own'] == pytest.approx(row['score_hr1'])
    md = exp.ablation_markdown(res)
    assert '(2) |' in md and ' ± ' in md and 'random (same users)' in md and 'own history' in md
    assert '| 3 ± 0.000 (2) |' in md   # every run took its 3 steps
    assert json.loads((d/'ablate-ml-100k'/'ablation.json').read_text())['rows'][0]['runs'][1]['seed'] == 1

def test_seeds_change_results_and_the_same_seed_repeats_them(ablated, tmp_path):
    s0, s1 = ablated[1]['rows'][0]['runs']
    assert losses(s0['run_dir']) != losses(s1['run_dir'])   # another seed: another init, data order, dropout
    again = exp.train_main(name='again', runs_dir=tmp_path, **dict(TINY, seed=0))
    assert losses(again['run_dir']) == losses(s0['run_dir'])
    assert (again['score_hr1'], again['vhr1']) == (s0['score_hr1'], s0['vhr1'])

def test_paper_variant_is_the_paper_preset(ablated):
    paper = next(r for r in ablated[1]['rows'] if r['variant'] == 'paper')
    cfg = read_run_config(paper['runs'][0]['run_dir'])
    assert all(getattr(cfg, k) == v for k, v in PRESETS['paper'].items())

def test_compare_seeds(tmp_path):
    res = compare_main(methods=(SPEEDER, 'text-only'), out=tmp_path/'c', sasrec=False, seeds=2, **TINY)
    rows = {r['method']: r for r in res['rows']}
    assert (rows[SPEEDER]['n'], rows['text-only']['n']) == (2, 1)   # the baselines run once unless asked
    assert res['seeds'] == {SPEEDER: [0, 1], 'text-only': [0]} and len(res['runs']) == 3
    vals = [r['hr1'] for r in res['runs'] if r['method'] == SPEEDER]
    assert rows[SPEEDER]['hr1'] == pytest.approx(np.mean(vals))
    assert rows[SPEEDER]['hr1_sd'] == pytest.approx(np.std(vals, ddof=1))
    md = compare_markdown(res)
    assert 'speeder: 2 seeds (0, 1); text-only: 1 seed (0)' in md and 'popularity (same users)' in md
    again = compare_main(methods=(SPEEDER, 'text-only'), out=tmp_path/'c', sasrec=False, seeds=2, **TINY)
    assert again['runs'] == res['runs']   # a rerun finds every run done and keeps it

# --- recipes --------------------------------------------------------------------------------------------------------

def test_recipe_reaches_the_config(tmp_path):
    r = run_cli('train', *TINY_CLI, '--max-steps', '2', '--runs-dir', str(tmp_path), '--name', 'paper',
                '--recipe', 'paper', '--set', 'letter_weight=0.5', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path/'paper'/'config.json').read_text())
    assert all(cfg[k] == v for k, v in PRESETS['paper'].items() if k != 'letter_weight')
    assert cfg['letter_weight'] == 0.5 and cfg['max_steps'] == 2   # the caller's flags win over the recipe

@pytest.mark.parametrize('args,says', [
    (['ablate', '--seeds', '0'], '--seeds must be at least 1, got 0'),
    (['compare', '--seeds', '0'], '--seeds must be at least 1, got 0'),
    (['compare', '--baseline-seeds', '-1'], '--seeds must be at least 1, got -1'),
    (['train', '--recipe', 'papr'], "unknown recipe 'papr'; known: paper"),
    (['demo', '--recipe', 'tiny'], "unknown recipe 'tiny'; known: paper"),
    (['ablate', '--recipe', 'nope'], "unknown recipe 'nope'"),
    (['compare', '--recipe', 'nope'], "unknown recipe 'nope'")])
def test_bad_seeds_and_recipes(tmp_path, args, says):
    r = run_cli(*args, '--llm', STAND_IN, '--max-steps', '2', '--runs-dir', str(tmp_path), '--json')
    one_line_error(r, says)
    assert tree(tmp_path) == []

def test_resume_refuses_a_recipe(tmp_path):
    one_line_error(run_cli('train', '--resume', str(tmp_path), '--recipe', 'paper', '--json'), 'drop --recipe')

# --- the kept weights -----------------------------------------------------------------------------------------------

def test_kept_weights_are_the_best_valid_point_and_survive_resume(tmp_path, monkeypatch):
    "A valid curve whose second point is its best: killed later and resumed, the run still keeps that point's weights."
    calls = []
    def scripted(model, split, mode, n=None, **kw):   # the curve's valid HR@1: 0.9 at its second point, else 0.1
        calls.append(1)
        return dict(vhr1=0.9 if len(calls) == 2 else 0.1, n=5)
    monkeypatch.setattr(train, 'evaluate', scripted)
    kw = dict(TINY, max_steps=6, checkpoint_every=2, curve_every=1e-9)   # a curve point after every step
    with pytest.raises(RunInterrupted):
        exp.train_main(name='k', runs_dir=tmp_path, stop_after=4, **kw)
    point, before = load_kept(tmp_path/'k')
    assert (point['step'], point['hr1']) == (1, 0.9)
    res = exp.train_main(resume=tmp_path/'k')
    assert res['resumed_at'] == 4 and len(res['curve']) == 7   # the start, then every step
    assert {k: res['kept'][k] for k in ('step', 'seconds', 'hr1', 'rule')} == dict(step=1, seconds=point['seconds'], hr1=0.9,
                                                                                  rule='best')
    model, _, _ = exp.load_trained(tmp_path/'k')
    final = trained_state(model)
    same = lambda a, b: all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    assert same(before, final)   # the run's weights are those of step 1, kept across the resume
    last = torch.load(tmp_path/'k'/CHECKPOINTS/'stage-0-joint'/'modules.pt', weights_only=True)
    assert not all(torch.equal(last['mrc'][n], final['mrc'][n]) for n in last['mrc'])   # not the last step's
    assert 'Kept weights: the best point of the valid curve (valid users only), step 1' in (tmp_path/'k'/REPORT).read_text()

def test_keep_last(tmp_path):
    res = exp.train_main(name='last', runs_dir=tmp_path, **dict(TINY, keep='last'))
    assert (res['kept']['rule'], res['kept']['step']) == ('last', 3)

# --- the report and the demo ----------------------------------------------------------------------------------------

def test_report_has_references_and_history_controls(ablated):
    run = ablated[1]['rows'][0]['runs'][0]['run_dir']
    report = (Path(run)/REPORT).read_text()
    assert '| random (same users) | 0.0500 | 1.0000 | 0.0500 |' in report and 'popularity (same users)' in report
    assert '## Does it read the history? (score mode, the first 20 test users)' in report
    assert "another user's (a derangement)" in report and '![history](plots/history.png)' in report
    m = json.loads((Path(run)/'metrics.json').read_text())
    assert m['history_controls']['n'] == 20 and m['test_references']['n'] == 20

def test_demo_phases_fit_in_its_wall_time(tmp_path):
    r = run_cli('demo', *TINY_CLI, '--minutes', '0.05', '--runs-dir', str(tmp_path), '--name', 'd', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    phases = res['phases']
    assert set(phases) == {'assets', 'sasrec', 'features', 'training', 'curve', 'test', 'report'}   # timing is training
    assert all(v >= 0 for v in phases.values()) and phases['training'] > 0 and phases['curve'] > 0
    assert sum(phases.values()) <= res['wall_s'] <= res['command_wall_s']
    assert res['order_sensitivity']['original_hr1'] == pytest.approx(res['score_hr1'])   # the test picks, reused
