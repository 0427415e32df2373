"MPO stage plans (which stages a run gets, the errors a bad order gives) and the weights a staged run keeps."
import pytest
from speeder.config import JOINT, SpeederConfig, SpeederError
import speeder.mpo as mpo
from speeder.train import stage_steps

def test_stage_plans():
    names = lambda **kw: [s.name for s in mpo.mpo_stages(**kw)[0]]
    assert names() == ['text', 'vision', JOINT]
    assert names(has_images=False) == [JOINT]                 # 'auto': no curriculum without images
    assert names(has_images=False, mpo='on') == ['text', JOINT]
    assert names(modalities=('text', 'sequence')) == ['text', JOINT]
    assert names(mpo='off') == [JOINT]
    assert names(order=('sequence', 'text', 'vision')) == ['sequence', 'text', JOINT]
    with pytest.raises(SpeederError, match='--mpo-order'):
        mpo.mpo_stages(order=('text', 'text', 'vision'))

def test_stage_steps_cover_the_budget():
    stages, _ = mpo.mpo_stages(has_images=False, mpo='on')
    assert stage_steps(stages, 10) == [5, 5] and sum(stage_steps(mpo.mpo_stages()[0], 100)) == 100
    assert stage_steps(stages, 1) == [1, 1]   # every stage runs at least once

def test_stage_shares_come_from_the_config():
    from speeder.config import SpeederConfig
    cfg = SpeederConfig(first_share=0.5, second_share=0.1, joint_share=0.4)
    assert [s.share for s in mpo.mpo_stages(cfg=cfg)[0]] == pytest.approx([0.5, 0.1, 0.4])
    assert [s.share for s in mpo.mpo_stages(has_images=False, mpo='on', cfg=cfg)[0]] == pytest.approx([5 / 9, 4 / 9])
    assert [s.share for s in mpo.mpo_stages()[0]] == pytest.approx([0.4, 0.2, 0.4])   # the defaults: today's shares

def test_train_stages_keeps_the_best_point_and_says_so():
    "With a curve, the state says which point's weights the model holds; `on_best` hears every new best; keep='last' keeps the last."
    from speeder.config import STAND_IN
    from speeder.backbone import load_backbone
    from speeder.data import toy_split
    from speeder.features import random_features
    from speeder.model import SpeederRecommender
    toy = toy_split(8)
    for keep in ('best', 'last'):
        cfg = SpeederConfig.preset(STAND_IN, batch_size=4, lr=5e-3, keep=keep)
        m = SpeederRecommender(random_features(), cfg, load_backbone(STAND_IN), device='cpu')
        stages, _ = mpo.mpo_stages(cfg.modalities, has_images=False, mpo='on', cfg=cfg)
        heard = []
        st = mpo.train_stages(m, toy, stages, 4, toy, curve_every=1e-9, curve_examples=8, on_best=heard.append)
        last = [p for p in st['curve'] if p['stage'] == stages[-1].name]   # MPO keeps only a point of its last stage
        best = max(reversed(last), key=lambda p: p['hr1'])   # the highest valid HR@1 there, the later on a tie
        assert heard[-1] is best and all(p['stage'] == stages[-1].name for p in heard)
        want = (best['step'], best['hr1'], 'best') if keep == 'best' else (4, st['curve'][-1]['hr1'], 'last')
        assert (st['kept']['step'], st['kept']['hr1'], st['kept']['rule']) == want
