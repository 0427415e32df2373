"Reference lines and history controls on hand-made examples and the tiny stand-in: every number is checked exactly."
import numpy as np, pytest, torch
from speeder.config import SCORE, STAND_IN, SpeederConfig, SpeederError
from speeder.data import Dataset, Split, toy_split
from speeder.readers import item_record
from speeder.features import random_features
from speeder.metrics import scorer_metrics
from speeder.model import load_recommender
from speeder.answer import recommend
from speeder.references import (READOUT_DECAY, READOUTS, REFERENCE_NAMES, derangement, first_examples, history_controls,
                                margin_lost, plot_history_controls, popular_item_histories, popularity_counts,
                                popularity_scores, readout_scores, readout_tables, recency_weights, reference_lines)

def hand_dataset(sequences, split, n_items):
    "A dataset made by hand: its sequences (the last two items are the valid and test targets) and one split."
    return Dataset('hand', 'made by hand', [item_record()] * (n_items + 1), list(range(n_items + 1)), sequences,
                   split, split, split)

THREE = Split(np.arange(2), np.array([[0, 1, 2], [1, 2, 3]]), np.array([1, 4]), np.array([[1, 2, 3], [4, 3, 2]]))

@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    return load_recommender(random_features(seed=1), SpeederConfig.preset(STAND_IN), device='cpu')

def test_readout_by_hand():
    e = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.]])   # items 1, 2, 3 in two dimensions
    h, c = np.array([[0, 1, 2]]), np.array([[1, 2, 3]])
    np.testing.assert_array_equal(recency_weights(h, 0.5), [[0, 0.5, 1]])
    np.testing.assert_allclose(readout_scores(e, h, c, 0.5), [[1/3, 2/3, 1]])   # u = (0.5 e1 + e2) / 1.5
    np.testing.assert_allclose(readout_scores(e.numpy(), h, c, 1.0), [[1/2, 1/2, 1]])
    np.testing.assert_allclose(readout_scores(e, h, c, 0.0), [[0, 1, 1]])
    np.testing.assert_array_equal(readout_scores(e, np.zeros((1, 3), int), c, 0.5), [[0, 0, 0]])
    with pytest.raises(SpeederError, match=r'\[0, 1\], got -0.1'):
        recency_weights(h, -0.1)

def test_popularity_on_a_toy_dataset():
    ds = hand_dataset([[1, 2, 3, 9, 9], [2, 3, 9, 9], [3, 9, 9]], THREE, n_items=9)   # training: [1,2,3], [2,3], [3]
    np.testing.assert_array_equal(popularity_counts(ds), [0, 1, 2, 3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(popularity_scores(ds, THREE), [[1, 2, 3], [0, 3, 2]])
    # first user: 1, 2, 3 are all candidates, so item 4 (ties at zero by id); second: item 1
    np.testing.assert_array_equal(popular_item_histories(ds, THREE.histories, THREE.candidates), [[0, 4, 4], [1, 1, 1]])

def test_reference_lines_on_the_same_users(tmp_path):
    toy = toy_split(16, seed=2)
    ds = hand_dataset([list(h[h > 0]) + [t, t] for h, t in zip(toy.histories, toy.targets)], toy, n_items=60)
    feats = random_features(seed=3)
    refs = reference_lines(ds, toy, n=10, root=tmp_path, features=feats)
    assert list(refs) == ['n', 'random', 'popularity', 'sasrec', 'sasrec_readout', 'text_readout']
    assert set(REFERENCE_NAMES) == set(refs) - {'n'} and set(READOUTS) == {'sasrec_readout', 'text_readout'}
    sub = first_examples(toy, 10)
    hr1 = lambda s: scorer_metrics(s, sub.candidates, sub.targets)['hr1']
    assert (refs['n'], refs['random'], refs['sasrec']) == (10, 1 / 20, None)   # SASRec was never trained here
    assert refs['popularity'] == hr1(popularity_scores(ds, sub))
    for key, table in (('sasrec_readout', feats.sequence), ('text_readout', feats.text)):
        decay = READOUT_DECAY[READOUTS[key]]
        assert refs[key] == hr1(readout_scores(table, sub.histories, sub.candidates, decay)), key
    feats.meta = dict(sequence='zeros')   # a run on zero sequence features has no SASRec readout
    assert readout_tables(ds, tmp_path, feats)['sequence'] is None
    assert reference_lines(ds, toy, root=tmp_path, features=feats)['sasrec_readout'] is None
    with pytest.raises(SpeederError, match='no saved candidates'):
        reference_lines(ds, Split(toy.users, toy.histories, toy.targets), features=feats)

@pytest.mark.parametrize('n', [2, 3, 4, 7, 30, 200])
def test_derangement_moves_every_row(n):
    for seed in range(50):
        p = derangement(n, seed)
        assert sorted(p.tolist()) == list(range(n))
        assert (p != np.arange(n)).all(), (n, seed)
    assert (derangement(n, 5) == derangement(n, 5)).all()

def test_derangement_needs_two_rows():
    assert derangement(2).tolist() == [1, 0]
    for bad in (0, 1, -3, True):
        with pytest.raises(SpeederError, match='at least 2 rows'):
            derangement(bad)

def test_history_controls_are_what_recommend_gives(tiny):
    toy = toy_split(12, seed=1)
    toy.targets = np.array(recommend(tiny, toy.histories, toy.candidates, SCORE)['picks'])   # own = 1 by design
    ds = hand_dataset([list(h[h > 0]) + [t, t] for h, t in zip(toy.histories, toy.targets)], toy, n_items=60)
    ctl = history_controls(tiny, ds, toy, n=10, seed=1)
    assert list(ctl) == ['n', 'own', 'other', 'popular_item', 'changed_other', 'changed_popular', 'popularity',
                         'margin_lost']
    sub = first_examples(toy, 10)
    pick = lambda h: np.array(recommend(tiny, h, sub.candidates, SCORE)['picks'])
    own, other = pick(sub.histories), pick(sub.histories[derangement(10, 1)])
    popular = pick(popular_item_histories(ds, sub.histories, sub.candidates))
    assert ctl['n'] == 10 and ctl['own'] == 1.0
    assert ctl['other'] == np.mean(other == sub.targets) and ctl['popular_item'] == np.mean(popular == sub.targets)
    assert ctl['changed_other'] == np.mean(other != own) > 0
    assert ctl['changed_popular'] == np.mean(popular != own)
    assert ctl['popularity'] == scorer_metrics(popularity_scores(ds, sub), sub.candidates, sub.targets)['hr1'] < 1
    assert ctl['margin_lost'] == pytest.approx((ctl['own'] - ctl['other']) / (ctl['own'] - ctl['popularity']))
    assert ctl['margin_lost'] > 0
    assert history_controls(tiny, ds, toy, n=10, seed=1, popularity=0.5)['popularity'] == 0.5
    fig = plot_history_controls(ctl)
    assert len(fig.axes[0].patches) == 3

def test_a_model_blind_to_the_history_loses_no_margin(tiny):
    toy = toy_split(12, seed=1)
    same = Split(toy.users, np.tile(toy.histories[:1], (12, 1)), toy.targets, toy.candidates)   # one history for all
    same.targets = np.array(recommend(tiny, same.histories, same.candidates, SCORE)['picks'])
    ds = hand_dataset([list(h[h > 0]) + [t, t] for h, t in zip(same.histories, same.targets)], same, n_items=60)
    ctl = history_controls(tiny, ds, same, n=12)
    assert ctl['popularity'] < 1
    assert (ctl['own'], ctl['other'], ctl['changed_other'], ctl['margin_lost']) == (1.0, 1.0, 0.0, 0.0)

def test_margin_lost_formula_and_guards(tiny):
    assert margin_lost(0.5, 0.3, 0.1) == pytest.approx(0.5)
    assert margin_lost(0.5, 0.1, 0.1) == pytest.approx(1.0)
    assert margin_lost(0.1, 0.0, 0.1) is None and margin_lost(0.1, 0.0, 0.2) is None
    toy = toy_split(4)
    ds = hand_dataset([list(h[h > 0]) + [t, t] for h, t in zip(toy.histories, toy.targets)], toy, n_items=60)
    with pytest.raises(SpeederError, match='at least 2 users'):
        history_controls(tiny, ds, toy, n=1)
    with pytest.raises(SpeederError, match='at least 1'):
        history_controls(tiny, ds, toy, n=0)

def test_controls_default_to_the_configs_history_examples():
    model = load_recommender(random_features(seed=1), SpeederConfig.preset(STAND_IN, history_examples=3), device='cpu')
    toy = toy_split(8)
    ds = hand_dataset([list(h[h > 0]) + [t, t] for h, t in zip(toy.histories, toy.targets)], toy, n_items=60)
    assert history_controls(model, ds, toy)['n'] == 3

def test_margin_inside_the_noise_is_no_margin():
    "A margin over popularity within one binomial standard error of own's HR@1 is none: no ratio that explodes."
    assert margin_lost(0.8 / 3, 0.61 / 3, 0.79 / 3, 300) is None   # 0.003 above popularity, SE 0.026
    assert margin_lost(0.8 / 3, 0.61 / 3, 0.79 / 3) == pytest.approx(19.0)   # without n: the raw ratio
    assert margin_lost(0.5, 0.3, 0.1, 300) == pytest.approx(0.5)
