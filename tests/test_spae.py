"SPAE: position prompts touch only history positions, the PPT head learns distances on a toy, bad lengths fail clearly (fast)."
import math
import pytest, torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from speeder.config import SpeederError
from speeder.spae import (PositionPrompt, PositionProxyHead, position_proxy_loss, ppt_accuracy_by_distance,
                          sample_pairs, spae_total_loss, sinusoidal_positions, toy_history_states,
                          plot_ppl_similarity, plot_ppt_accuracy, plot_order_sensitivity)

def _prompt_batch(seed=0):
    "Two prompts of 14 tokens; 10 history slots at positions 2..11 (example 0 has 4 real items, example 1 all 10)."
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, 14, 16, generator=g)
    slots = torch.arange(2, 12).expand(2, 10).clone()
    present = torch.zeros(2, 10, dtype=torch.bool)
    present[0, 6:] = True
    present[1] = True
    return emb, slots, present

def test_ppl_changes_only_real_history_positions():
    ppl = PositionPrompt(10, 16)
    emb, slots, present = _prompt_batch()
    with torch.no_grad():
        out = ppl.apply_to_sequence(emb, slots, present)
    changed = (out != emb).any(-1)
    assert changed[0].nonzero().squeeze(1).tolist() == [8, 9, 10, 11]      # 4 real items, left-padded
    assert changed[1].nonzero().squeeze(1).tolist() == list(range(2, 12))
    assert torch.equal(out[~changed], emb[~changed])                        # everything else bit-identical
    # the most recent slot gets the last prompt whatever the history length
    assert torch.allclose(out[:, 11] - emb[:, 11], ppl.weight[-1].detach().expand(2, 16), atol=1e-6)

def test_ppl_on_item_tokens_and_alignment():
    ppl = PositionPrompt(10, 16)
    tok = torch.randn(3, 4, 16)                                              # a 4-slot history uses prompts 6..9
    present = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    with torch.no_grad():
        out = ppl(tok, present)
    assert torch.equal(out[~present], tok[~present])
    assert torch.allclose(out[1] - tok[1], ppl.weight[6:].detach(), atol=1e-6)
    assert torch.allclose(ppl.prompts(4), ppl.weight[6:])

def test_ppl_gradient_reaches_only_used_prompts():
    ppl = PositionPrompt(10, 8)
    tok = torch.randn(2, 3, 8)
    ppl(tok, torch.tensor([[0, 1, 1], [0, 0, 1]]).bool()).sum().backward()
    used = ppl.weight.grad.abs().sum(-1) > 0
    assert used.tolist() == [False] * 8 + [True, True]

def test_ppl_init_scale():
    torch.manual_seed(0)
    assert abs(PositionPrompt(10, 4096).weight.std().item() - 0.02) < 0.002

def test_too_long_history():
    ppl = PositionPrompt(10, 8)
    with pytest.raises(SpeederError, match='history has 12 slots but the position prompt covers max_len=10'):
        ppl(torch.randn(1, 12, 8), torch.ones(1, 12).bool())
    head = PositionProxyHead(8, max_len=10)
    with pytest.raises(SpeederError, match='history has 11 slots.*max_len=10'):
        position_proxy_loss(torch.randn(2, 11, 8), torch.ones(2, 11).bool(), head)
    with pytest.raises(SpeederError, match='history has 11 slots'):
        ppt_accuracy_by_distance(torch.randn(2, 11, 8), torch.ones(2, 11).bool(), head)

def test_bad_shapes():
    ppl = PositionPrompt(10, 8)
    with pytest.raises(SpeederError, match='hidden size 7'):
        ppl(torch.randn(1, 3, 7), torch.ones(1, 3).bool())
    with pytest.raises(SpeederError, match='present has shape'):
        ppl(torch.randn(1, 3, 8), torch.ones(1, 4).bool())
    emb, slots, present = _prompt_batch()
    with pytest.raises(SpeederError, match=r'slot positions must lie in \[0, 13\]'):
        PositionPrompt(10, 16).apply_to_sequence(emb, slots + 5, present)
    head = PositionProxyHead(8, max_len=10)
    with pytest.raises(SpeederError, match='hidden states have size 6, the PPT head expects 8'):
        position_proxy_loss(torch.randn(2, 5, 6), torch.ones(2, 5).bool(), head)
    with pytest.raises(SpeederError, match='max_len >= 2'):
        PositionProxyHead(8, max_len=1)
    with pytest.raises(SpeederError, match='ppt_weight must be >= 0'):
        spae_total_loss(torch.tensor(1.), torch.tensor(1.), -0.1)

def test_sample_pairs():
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    b, i, j = sample_pairs(present, 50, g)
    assert set(b.tolist()) == {0, 2} and len(b) == 100
    assert (i < j).all() and present[b, i].all() and present[b, j].all()
    assert set((j - i)[b == 2].tolist()) == {1, 2, 3, 4}               # all distances get drawn

def test_no_pairs_gives_zero_loss():
    head = PositionProxyHead(8, max_len=5)
    loss, acc = position_proxy_loss(torch.randn(2, 5, 8), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]).bool(), head)
    assert loss.item() == 0.0 and math.isnan(acc)

def test_ppt_loss_decreases_on_toy():
    "Hidden states = item embeddings + sinusoidal slot signal: a PPT head trained alone learns the distances."
    g = torch.Generator().manual_seed(0)
    h, p = toy_history_states(256, max_len=10, hidden=16, n_items=50, generator=g)
    torch.manual_seed(0)
    head = PositionProxyHead(16, max_len=10, head_dim=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss, acc = position_proxy_loss(h, p, head, n_pairs=4, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(9)) < 0.3                         # starts at chance
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]
    by_d = ppt_accuracy_by_distance(h, p, head)
    assert sorted(by_d) == list(range(1, 10)) and sum(by_d.values()) / 9 > 1 / 9 * 2

def test_accuracy_by_distance_counts_all_pairs():
    "A head that always answers distance 1 is right on exactly the distance-1 pairs."
    head = PositionProxyHead(4, max_len=4, head_dim=4)
    with torch.no_grad():
        for prm in head.mlp.parameters():
            prm.zero_()
        head.mlp[-1].bias.copy_(torch.tensor([1., 0., 0.]))
    acc = ppt_accuracy_by_distance(torch.randn(2, 4, 4), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool(), head, batch_size=2)
    assert acc == {1: 1.0, 2: 0.0, 3: 0.0}

def test_total_loss():
    lm, ppt = torch.tensor(2.0, requires_grad=True), torch.tensor(float('nan'))
    assert spae_total_loss(lm, ppt, 0.0) is lm                               # weight 0: PPT off, even if NaN
    assert spae_total_loss(lm, torch.tensor(4.0), 0.25).item() == 3.0

def test_toy_and_sinusoid():
    pe = sinusoidal_positions(10, 8)
    assert pe.shape == (10, 8) and torch.allclose(pe[0], torch.tensor([0., 1.] * 4))
    h, p = toy_history_states(20, max_len=6, hidden=8, min_len=2, generator=torch.Generator().manual_seed(0))
    assert h.shape == (20, 6, 8) and p[:, -1].all() and (p.sum(1) >= 2).all()
    assert (h[~p] == 0).all()
    assert all(p[k, (~p[k]).sum():].all() for k in range(20))               # left-padded, no gaps

def test_plots_return_figures():
    figs = [plot_ppl_similarity(PositionPrompt(10, 8)), plot_ppt_accuracy({1: 0.9, 2: 0.5, 3: 0.1}, chance=1/9),
            plot_order_sensitivity({'with SPAE': {'shuffled': 0.4, 'reversed': 0.6}, 'without SPAE': {'shuffled': 0.1, 'reversed': 0.2}})]
    for f in figs:
        assert isinstance(f, plt.Figure)
        plt.close(f)
