"""The item head and the dense next-item loss (issue 17), end to end on the tiny stand-in: a run trains them, saves
them, and answers through them again after loading; the letter default neither computes nor needs them; the ablation
rows name exactly the fields they change."""
import json
from pathlib import Path
import pytest, torch
from speeder.config import ITEM, LETTER, STAND_IN, SpeederConfig, SpeederError, preset_settings
import speeder.experiments as exp
from speeder.runs import load_kept

pytestmark = pytest.mark.usefixtures('ml100k')   # the runs' dataset, built once per session (conftest.py)

TINY = preset_settings(STAND_IN, train_examples=48, batch_size=4, eval_examples=20, valid_examples=10, max_steps=4,
                       history_examples=10, curve_examples=10)

@pytest.fixture(scope='module')
def item_run(tmp_path_factory):
    "A finished tiny run that answers with the item head and trains the dense loss."
    d = tmp_path_factory.mktemp('item')
    return d/'item', exp.train_main(name='item', runs_dir=d, answer=ITEM, dense_weight=1.0, **TINY)

def test_item_run_answers_through_the_head(item_run):
    run, res = item_run
    assert res['valid_ratio'] == 1.0   # the head always names a candidate
    assert res['hr1'] == pytest.approx(res['score_hr1'])   # generate writes the top-scored candidate's letter
    history = json.loads((run/'history.json').read_text())['history']
    assert all(r['item_loss'] > 0 and r['dense_loss'] > 0 for r in history)   # both terms trained at every step
    assert json.loads((run/'config.json').read_text())['answer'] == ITEM

def test_item_head_is_saved_and_answers_again_after_loading(item_run):
    run, res = item_run
    again = exp.evaluate_main(run, 'score', TINY['eval_examples'])
    assert again['hr1'] == pytest.approx(res['score_hr1'])
    model, _, _ = exp.load_trained(run)
    saved = torch.load(run/'modules.pt', weights_only=True)['item_head']
    assert all(torch.equal(saved[k].cpu(), v.cpu()) for k, v in model.item_head.state_dict().items())
    _, kept = load_kept(run)
    assert 'item_head' in kept   # the best point's weights include the head

def test_letter_default_trains_dense_but_answers_with_letters(tmp_path):
    res = exp.train_main(name='letter', runs_dir=tmp_path, **dict(TINY, max_steps=2))
    history = json.loads((tmp_path/'letter'/'history.json').read_text())['history']
    assert all(r['item_loss'] == 0 and r['dense_loss'] > 0 for r in history)   # the dense aid trains, the letter answers
    assert SpeederConfig.preset(STAND_IN).answer == LETTER
    exp.train_main(name='bare', runs_dir=tmp_path, **dict(TINY, max_steps=2, **exp.ABLATIONS['no-dense']))
    history = json.loads((tmp_path/'bare'/'history.json').read_text())['history']
    assert all(r['item_loss'] == 0 and r['dense_loss'] == 0 for r in history)   # no-dense: neither term

def test_ablation_rows_change_only_their_fields():
    assert exp.ABLATIONS['item'] == dict(answer=ITEM, dense_weight=0.0)
    assert exp.ABLATIONS['no-dense'] == dict(dense_weight=0.0)
    assert exp.ABLATIONS['dense'] == dict(dense_weight=1.0)   # a training aid: the letter still answers
    assert exp.ABLATIONS['item-dense'] == dict(answer=ITEM, dense_weight=1.0)
    for v in ('item', 'dense', 'item-dense', 'no-dense'):
        SpeederConfig(**exp.ABLATIONS[v])   # each is a valid config
    with pytest.raises(SpeederError, match='would never train'):
        SpeederConfig(answer=ITEM, item_weight=0.0, dense_weight=0.0)
