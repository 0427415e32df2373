"MPO stage plans: which stages a run gets, and the errors a bad order gives."
import pytest
from speeder.config import SpeederError
import speeder.mpo as mpo

def test_stage_plans():
    names = lambda **kw: [s.name for s in mpo.mpo_stages(**kw)[0]]
    assert names() == ['text', 'vision', 'joint']
    assert names(has_images=False) == ['joint']                 # 'auto': no curriculum without images
    assert names(has_images=False, mpo='on') == ['text', 'joint']
    assert names(modalities=('text', 'sequence')) == ['text', 'joint']
    assert names(mpo='off') == ['joint']
    assert names(order=('sequence', 'text', 'vision')) == ['sequence', 'text', 'joint']
    with pytest.raises(SpeederError, match='--mpo-order'):
        mpo.mpo_stages(order=('text', 'text', 'vision'))

def test_stage_steps_cover_the_budget():
    stages, _ = mpo.mpo_stages(has_images=False, mpo='on')
    assert mpo.stage_steps(stages, 10) == [5, 5] and sum(mpo.stage_steps(mpo.mpo_stages()[0], 100)) == 100
    assert mpo.stage_steps(stages, 1) == [1, 1]   # every stage runs at least once
