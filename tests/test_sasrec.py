"SASRec: missing/stale checkpoints give one clear error naming the command; a tiny training run writes its files."
import json
import numpy as np, pytest, torch
from speeder.config import SpeederError
from speeder.data import prepare_dataset, write_amazon_fixture
from speeder.sasrec import (SASRec, SASRecConfig, attention_mask, load_sasrec, sasrec_dir, sasrec_item_embeddings,
                            sasrec_main, sasrec_scores, train_sasrec, training_windows)

TINY = dict(d_model=16, max_epochs=3, batch_size=32)

@pytest.fixture
def toys(amazon):
    root, raw, img = amazon
    return prepare_dataset('amazon-toys', root=root, raw_dir=raw, images=img)

def test_embeddings_before_training_name_the_command(toys):
    with pytest.raises(SpeederError, match=r'run `speeder sasrec --dataset amazon-toys` first') as e:
        sasrec_item_embeddings(toys)
    assert 'item_embeddings.pt' in str(e.value)
    with pytest.raises(SpeederError, match='speeder sasrec --dataset amazon-toys'):
        load_sasrec(toys)

def test_tiny_train_writes_files(toys):
    model, res = train_sasrec(toys, SASRecConfig(**TINY), progress_bar=False)
    d = sasrec_dir(toys)
    assert d == toys.path.parent/'sasrec'
    assert sorted(p.name for p in d.iterdir()) == ['item_embeddings.pt', 'metrics.json', 'model.pt']   # no temp files left
    emb = sasrec_item_embeddings(toys)
    assert emb.shape == (toys.n_items + 1, 16) and emb[0].abs().sum() == 0
    m = json.loads((d/'metrics.json').read_text())
    for k in ('hr1', 'hr5', 'ndcg5', 'valid', 'best_epoch', 'epochs', 'wall_s', 'n_params', 'config'):
        assert k in m, k
    assert m['epochs'] == 3 and 1 <= m['best_epoch'] <= 3 and m['config']['d_model'] == 16
    assert 0 <= m['hr1'] <= m['hr5'] <= 1
    scores = sasrec_scores(load_sasrec(toys), toys.test)
    assert scores.shape == (len(toys.test), 20)
    np.testing.assert_allclose(scores, sasrec_scores(model, toys.test), rtol=1e-5, atol=1e-6)

def test_same_seed_same_embeddings(toys, tmp_path):
    _, a = train_sasrec(toys, SASRecConfig(**TINY), out_dir=tmp_path/'a', progress_bar=False)
    _, b = train_sasrec(toys, SASRecConfig(**TINY), out_dir=tmp_path/'b', progress_bar=False)
    assert torch.equal(torch.load(tmp_path/'a'/'item_embeddings.pt'), torch.load(tmp_path/'b'/'item_embeddings.pt'))
    untimed = lambda h: [{k: v for k, v in r.items() if k != 'time_s'} for r in h]
    assert untimed(a['history']) == untimed(b['history'])

def test_embeddings_of_another_build_are_refused(toys, amazon, tmp_path):
    train_sasrec(toys, SASRecConfig(**{**TINY, 'max_epochs': 1}), progress_bar=False)
    root, _, img = amazon
    raw2 = write_amazon_fixture(tmp_path/'raw2', '2023', n_users=30, n_items=45, per_user=8, images=img, seed=1)
    other = prepare_dataset('amazon-toys', root=root, raw_dir=raw2)   # same folder, different data
    with pytest.raises(SpeederError, match='another build of amazon-toys'):
        sasrec_item_embeddings(other)

def test_sasrec_main_flat_row(tmp_path):
    root = tmp_path/'data'
    write_amazon_fixture(root/'amazon-toys', '2023', n_users=30, n_items=40, per_user=8)
    r = sasrec_main('amazon-toys', root, progress_bar=False, **TINY)
    assert {'dataset', 'hr1', 'hr5', 'ndcg5', 'valid_ratio', 'vhr1', 'best_epoch', 'epochs', 'wall_s', 'checkpoint'} <= set(r)
    assert r['valid_ratio'] == 1.0 and r['vhr1'] == r['hr1'] and r['dataset'] == 'amazon-toys'
    assert r['checkpoint'] == str(root/'amazon-toys'/'sasrec'/'model.pt')
    json.dumps(r)

def test_bad_settings():
    with pytest.raises(SpeederError, match='unknown SASRec setting'):
        sasrec_main('ml-100k', epochz=3)
    with pytest.raises(SpeederError, match='not divisible'):
        SASRec(10, SASRecConfig(d_model=10, n_heads=3))

def test_shapes_and_causality():
    torch.manual_seed(0)
    model = SASRec(20, SASRecConfig(d_model=8, n_heads=2)).eval()
    h = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    out = model(h)
    assert out.shape == (2, 6, 8) and torch.isfinite(out).all()
    assert model.score_candidates(h, torch.randint(1, 21, (2, 20))).shape == (2, 20)
    h2 = h.clone()
    h2[:, 4] = 9                      # change a later item: earlier states must not move
    torch.testing.assert_close(model(h2)[:, :4], out[:, :4])
    long = torch.randint(1, 21, (3, 15))              # longer than max_len: only the last 10 are read
    torch.testing.assert_close(model(long), model(long[:, -10:]))
    assert not attention_mask(h)[0, 3, :2].any()      # real items never attend to padding
    w = training_windows([[1, 2, 3], list(range(1, 30))], max_len=10, offset=4)
    assert w.shape[1] == 11 and (w[:, -1] != 0).all()

def test_early_stop_keeps_the_best_epoch(toys, monkeypatch):
    "Valid NDCG@5 forced to peak at epoch 2: training stops `patience` evaluations later, with epoch 2's weights."
    import speeder.sasrec as sasrec
    real, forced, seen = sasrec.evaluate_sasrec, iter([0.2, 0.5, 0.4, 0.5, 0.3, 0.9]), []
    def stub(model, split):
        if split is not toys.valid: return real(model, split)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        v = next(forced)
        return dict(hr1=v, hr5=v, ndcg5=v, n=len(split))
    monkeypatch.setattr(sasrec, 'evaluate_sasrec', stub)
    model, res = train_sasrec(toys, SASRecConfig(**dict(TINY, max_epochs=10)), progress_bar=False)
    assert SASRecConfig().patience == 3
    assert (res['best_epoch'], res['epochs'], len(seen)) == (2, 5, 5)   # epochs 3-5 do not beat epoch 2 (a tie is no gain)
    same = lambda a: all(torch.equal(v, a[k]) for k, v in model.state_dict().items())
    assert same(seen[1]) and not same(seen[-1])   # the best epoch's weights, not the last ones
