"MPO stage plans: which stages a run gets, and the errors a bad order gives."
import pytest
from speeder.config import JOINT, SpeederError
import speeder.mpo as mpo

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
    assert mpo.stage_steps(stages, 10) == [5, 5] and sum(mpo.stage_steps(mpo.mpo_stages()[0], 100)) == 100
    assert mpo.stage_steps(stages, 1) == [1, 1]   # every stage runs at least once

def test_stage_shares_come_from_the_config():
    from speeder.config import SpeederConfig
    cfg = SpeederConfig(first_share=0.5, second_share=0.1, joint_share=0.4)
    assert [s.share for s in mpo.mpo_stages(cfg=cfg)[0]] == pytest.approx([0.5, 0.1, 0.4])
    assert [s.share for s in mpo.mpo_stages(has_images=False, mpo='on', cfg=cfg)[0]] == pytest.approx([5 / 9, 4 / 9])
    assert [s.share for s in mpo.mpo_stages()[0]] == pytest.approx([0.4, 0.2, 0.4])   # the defaults: today's shares
