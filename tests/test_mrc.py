"MRC: shapes, masking of missing modalities, hard routing, the exact zero gate, parameter groups and bad input (fast: tiny random features)."
import math
import pytest, torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from speeder.config import SpeederError
from speeder.config import MODALITIES
from speeder.mrc import (MRC, MoME, MoMEBlock, ModalityAdapter, item_inputs, modality_contributions,
                         plot_modality_attention, plot_modality_contributions, pooling_weights)

DIMS = {'text': 384, 'vision': 1280, 'sequence': 64}
HAS_IMAGE = [True, True, False, True, False, True]

def _inputs(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, d, generator=g) for m, d in DIMS.items()}
    return feats, {'vision': torch.tensor(HAS_IMAGE[:B])}

def _mrc(n_blocks=2, gate=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    m = MRC(DIMS, d_model=32, llm_hidden=48, n_blocks=n_blocks, n_heads=4, **kw).eval()
    with torch.no_grad():
        m.vision_gate.fill_(gate)
    return m

def test_output_shape_and_attention():
    mrc, (feats, present) = _mrc(), _inputs()
    out, attn = mrc(feats, present, return_attention=True)
    assert out.shape == (6, 48) and attn.shape == (6, 2, 3, 3)
    rows = attn.sum(-1)                                    # present query rows sum to 1, absent rows are 0
    assert torch.allclose(rows[:, :, 0], torch.ones(6, 2), atol=1e-6)
    assert torch.allclose(rows[:, :, 1], torch.tensor(HAS_IMAGE, dtype=torch.float)[:, None].expand(6, 2), atol=1e-6)

def test_history_shape():
    mrc, (feats, present) = _mrc(), _inputs()
    out = mrc({k: v.view(2, 3, -1) for k, v in feats.items()}, {'vision': present['vision'].view(2, 3)})
    assert out.shape == (2, 3, 48)
    assert torch.allclose(out.view(6, -1), mrc(feats, present), atol=1e-6)

@pytest.mark.parametrize('use_gate,gate', [(True, 0.0), (True, 0.8), (False, 0.0)])
def test_missing_vision_is_masked(use_gate, gate):
    "An item without an image gives the same token whatever its vision row holds (even NaN)."
    mrc, (feats, present) = _mrc(gate=gate), _inputs()
    other = dict(feats, vision=torch.randn(6, 1280) * 50)
    other['vision'][2] = float('nan')
    a, b = mrc(feats, present, use_gate=use_gate), mrc(other, present, use_gate=use_gate)
    absent = ~present['vision']
    assert torch.equal(a[absent], b[absent])
    if gate != 0.0 or not use_gate:                      # the masking is per item, not global
        assert not torch.allclose(a[~absent], b[~absent])
    else:
        assert torch.equal(a, b)                        # closed gate: no item sees its image
    assert torch.isfinite(b).all()

def test_missing_sequence_is_masked():
    mrc, (feats, present) = _mrc(gate=0.5), _inputs()
    present = dict(present, sequence=torch.tensor([True, False, True, True, True, False]))
    other = dict(feats, sequence=torch.randn(6, 64))
    a, b = mrc(feats, present), mrc(other, present)
    assert torch.equal(a[[1, 5]], b[[1, 5]]) and not torch.allclose(a[[0, 2]], b[[0, 2]])

def test_items_are_independent():
    mrc, (feats, present) = _mrc(gate=0.5), _inputs()
    full = mrc(feats, present)
    for i in range(6):
        one = mrc({k: v[i:i + 1] for k, v in feats.items()}, {'vision': present['vision'][i:i + 1]})
        assert torch.allclose(one, full[i:i + 1], atol=1e-6)

def test_hard_routing():
    "Perturbing the visual expert changes vision-present items only; text-only and vision-absent items stay bit-identical."
    mrc, (feats, present) = _mrc(gate=0.6), _inputs()
    with torch.no_grad():
        before, before_txt = mrc(feats, present), mrc(feats, present, active=('text', 'sequence'))
        for blk in mrc.mome.blocks:
            for p in blk.experts['vision'].parameters():
                p.add_(torch.randn_like(p))
        after, after_txt = mrc(feats, present), mrc(feats, present, active=('text', 'sequence'))
    absent = ~present['vision']
    assert torch.equal(before[absent], after[absent]) and torch.equal(before_txt, after_txt)
    assert not torch.allclose(before[~absent], after[~absent])

def test_block_routes_each_token_to_its_own_expert():
    torch.manual_seed(0)
    blk = MoMEBlock(16, 2, 0.0).eval()
    x, missing = torch.randn(3, 3, 16), torch.zeros(3, 3, dtype=torch.bool)
    with torch.no_grad():
        y0, _ = blk(x, missing)
        for p in blk.experts['sequence'].parameters():
            p.mul_(2)
        y1, _ = blk(x, missing)
    assert torch.equal(y0[:, :2], y1[:, :2]) and not torch.allclose(y0[:, 2], y1[:, 2])

def test_zero_gate_is_exactly_text_only_and_gradient_flows():
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    with_vision = mrc(feats, present)
    stage1 = mrc(feats, present, active=('text', 'sequence'))
    no_images = mrc(feats, {'vision': torch.zeros(6, dtype=torch.bool)})
    assert torch.equal(with_vision, stage1) and torch.equal(with_vision, no_images)
    mrc.zero_grad()
    with_vision.pow(2).sum().backward()
    assert mrc.vision_gate.grad is not None and mrc.vision_gate.grad.abs().item() > 0
    # the vision adapter gets no gradient at g = 0 (its path is scaled by tanh(0) = 0) but the gate does
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in mrc.adapters['vision'].parameters())

def test_zero_gate_matches_a_model_built_without_vision():
    "Same weights, no vision modality at all: equal up to float rounding."
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    no_vis = MRC({'text': 384, 'sequence': 64}, d_model=32, llm_hidden=48, n_blocks=2, n_heads=4).eval()
    no_vis.load_state_dict({k: v for k, v in mrc.state_dict().items() if 'vision' not in k or k == 'vision_gate'})
    a, b = mrc(feats, present), no_vis({k: v for k, v in feats.items() if k != 'vision'})
    assert torch.allclose(a, b, atol=1e-6)

def test_no_gate_lets_vision_in_and_equals_open_gate():
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    stage1, nogate = mrc(feats, present, active=('text', 'sequence')), mrc(feats, present, use_gate=False)
    has = present['vision']
    assert not torch.allclose(nogate[has], stage1[has]) and torch.equal(nogate[~has], stage1[~has])
    with torch.no_grad():
        mrc.vision_gate.fill_(50.0)   # tanh(g) = 1
    assert torch.allclose(mrc(feats, present), nogate, atol=1e-5)

def test_inactive_vision_equals_absent_vision():
    mrc, (feats, present) = _mrc(gate=0.9), _inputs()
    a = mrc(feats, present, active=('text', 'sequence'))
    b = mrc(feats, {'vision': torch.zeros(6, dtype=torch.bool)})
    assert torch.equal(a, b)

def test_pooling_weights():
    p = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0]]).bool()
    assert torch.equal(pooling_weights(p), torch.tensor([[1/3, 1/3, 1/3], [.5, 0, .5], [1., 0, 0]]))
    c = pooling_weights(p, tau=torch.tensor([0.5, 0.0, 0.0]))
    assert torch.allclose(c[0], torch.tensor([0.5 * (1 - 0.5/3), 0.5/3, 0.5 * (1 - 0.5/3)]))
    assert torch.allclose(c.sum(-1), torch.ones(3))

def test_parameter_groups_partition_the_model():
    mrc = _mrc()
    groups = [mrc.modality_parameters(m) for m in MODALITIES] + [mrc.shared_parameters()]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in mrc.parameters()}
    vis = {id(p) for p in mrc.modality_parameters('vision')}
    assert id(mrc.vision_gate) in vis
    assert all(id(p) in vis for p in mrc.adapters['vision'].parameters())
    assert all(id(p) in vis for b in mrc.mome.blocks for p in b.experts['vision'].parameters())
    shared = {id(p) for p in mrc.shared_parameters()}
    assert all(id(p) in shared for p in mrc.output_adapter.parameters())
    assert all(id(p) in shared for b in mrc.mome.blocks for p in b.attn.parameters())
    with pytest.raises(SpeederError, match='unknown modality'):
        mrc.modality_parameters('audio')

def test_freezing_text_keeps_text_params_fixed():
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    mrc.train()
    for p in mrc.parameters():
        p.requires_grad_(False)
    for p in mrc.modality_parameters('vision'):
        p.requires_grad_(True)
    opt = torch.optim.SGD(mrc.modality_parameters('vision'), lr=0.1)
    text_before = [p.clone() for p in mrc.modality_parameters('text')]
    mrc(feats, present).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(text_before, mrc.modality_parameters('text')))
    assert mrc.vision_gate.item() != 0.0

def test_bad_inputs():
    mrc, (feats, present) = _mrc(), _inputs()
    with pytest.raises(SpeederError, match='text features have size 100, this MRC expects 384'):
        mrc(dict(feats, text=torch.randn(6, 100)), present)
    with pytest.raises(SpeederError, match="'vision' is active but feats has no 'vision'"):
        mrc({k: v for k, v in feats.items() if k != 'vision'}, present)
    # leaving vision out of `active` makes its features optional
    assert mrc({k: v for k, v in feats.items() if k != 'vision'}, active=('text', 'sequence')).shape == (6, 48)
    with pytest.raises(SpeederError, match='text is always present'):
        mrc(feats, {'text': torch.tensor([True] * 5 + [False])})
    with pytest.raises(SpeederError, match='"text" must be active'):
        mrc(feats, present, active=('vision',))
    with pytest.raises(SpeederError, match="unknown active modality 'audio'"):
        mrc(feats, present, active=('text', 'audio'))
    with pytest.raises(SpeederError, match=r"present\['vision'\] has shape \(5,\)"):
        mrc(feats, {'vision': torch.ones(5).bool()})
    with pytest.raises(SpeederError, match='sequence features have leading shape'):
        mrc(dict(feats, sequence=torch.randn(5, 64)), present)
    with pytest.raises(SpeederError, match='no "text" entry'):
        MRC({'vision': 1280})
    with pytest.raises(SpeederError, match="unknown modality 'audio'"):
        MRC({'text': 8, 'audio': 4})
    with pytest.raises(SpeederError, match='not divisible'):
        MRC({'text': 8}, d_model=30, n_heads=4)
    no_vis = MRC({'text': 8}, d_model=16)
    with pytest.raises(SpeederError, match="features for 'vision'"):
        no_vis({'text': torch.randn(2, 8), 'vision': torch.randn(2, 4)})

def test_item_inputs():
    from speeder.features import ItemFeatures
    n = 5
    table = ItemFeatures(torch.randn(n + 1, 384), torch.randn(n + 1, 1280), torch.tensor([0, 1, 0, 1, 1, 0]).bool(), torch.randn(n + 1, 64))
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    feats, present = item_inputs(table, ids)
    assert feats['vision'].shape == (2, 3, 1280) and present['vision'].tolist() == [[False, True, False], [True, True, False]]
    assert _mrc()(feats, present).shape == (2, 3, 48)
    with pytest.raises(SpeederError, match=r'item ids must lie in \[0, 5\]; got 0..6'):
        item_inputs(table, torch.tensor([0, 6]))

def test_contributions_and_plots():
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    r = modality_contributions(mrc, feats, present)
    assert r['gate'] == 0.0 and r['pooled']['vision'] == 0.0 and r['dropped']['vision'] == 0.0
    assert r['pooled']['text'] > 0 and r['dropped']['sequence'] > 0
    with torch.no_grad():
        mrc.vision_gate.fill_(0.5)
    r = modality_contributions(mrc, feats, present)
    assert math.isclose(r['gate'], math.tanh(0.5), rel_tol=1e-6) and r['dropped']['vision'] > 0
    _, attn = mrc(feats, present, return_attention=True)
    for fig in (plot_modality_attention(attn), plot_modality_attention(attn[:, 0]), plot_modality_contributions(mrc, feats, present)):
        assert isinstance(fig, plt.Figure)
        plt.close(fig)
    with pytest.raises(SpeederError, match='3 modalities but 2 names'):
        plot_modality_attention(attn, ('text', 'vision'))

def test_training_mode_is_restored():
    mrc, (feats, present) = _mrc(), _inputs()
    mrc.train()
    modality_contributions(mrc, feats, present)
    assert mrc.training

def test_adapter_and_mome_shapes():
    assert ModalityAdapter(10, 8)(torch.randn(2, 3, 10)).shape == (2, 3, 8)
    tokens, attn = MoME(16, n_blocks=3, n_heads=2)(torch.randn(4, 3, 16), torch.ones(4, 3).bool(), return_attention=True)
    assert tokens.shape == (4, 3, 16) and attn.shape == (4, 3, 3, 3)

def test_low_precision():
    "bf16 autocast (as on a GPU) and a bf16 model run, and the closed gate stays exact."
    mrc, (feats, present) = _mrc(gate=0.0), _inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mrc(feats, present)
        assert torch.equal(out, mrc(feats, present, active=('text', 'sequence')))
    half = _mrc(gate=0.3).to(torch.bfloat16)
    out, attn = half({k: v.bfloat16() for k, v in feats.items()}, present, return_attention=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
