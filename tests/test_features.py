"Bad input, masking and cache tests for speeder.features (fast: tiny random encoders, the real ones on a few items)."
import json, os, shutil
import pytest, torch
from speeder.config import SpeederError
from speeder.assets import fetch_asset
from speeder.data import prepare_dataset, write_amazon_fixture
import speeder.features as sf
from speeder.encoders import (TextEncoder, VisionEncoder, load_efficientnet_lite0, weights_fingerprint, mean_pool,
                              last_pool, LITE0_FILE)
from speeder.features import ItemFeatures, text_features, vision_features, item_features, SEQUENCE_DIM

def _amazon(tmp_path, images=True, drop=(), corrupt=()):
    "A small Amazon-2023 dataset under tmp_path (images optional; some deleted before, some corrupted after building)."
    raw, img = tmp_path/'raw', tmp_path/'img'
    write_amazon_fixture(raw, '2023', n_users=60, n_items=32, per_user=8, images=img if images else None)
    for a in drop:
        (img/f'{a}.png').unlink()
    ds = prepare_dataset('amazon-toys', root=tmp_path/'data', raw_dir=raw, images=img if images else None)
    for a in corrupt:
        (img/f'{a}.png').write_bytes(b'not an image at all')
    return ds

def _tiny_bert(folder, hidden=16, seed=0):
    "A randomly initialised 1-layer BERT saved with MiniLM's tokenizer: a real, loadable, fast model folder."
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=128)).save_pretrained(folder)
    tok = fetch_asset('all-minilm-l6-v2')/'model'
    for f in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
        shutil.copy(tok/f, folder/f)
    return folder

@pytest.fixture
def count_encodes(monkeypatch):
    "Counts calls to TextEncoder.encode (the expensive part a cache hit must skip)."
    calls = []
    real = TextEncoder.encode
    def counting(self, texts, batch_size=64):
        calls.append(self.name)
        return real(self, texts, batch_size)
    monkeypatch.setattr(TextEncoder, 'encode', counting)
    return calls

# --- encoder folders ---------------------------------------------------------------------------------------------

def test_missing_encoder_path(tmp_path):
    ds = _amazon(tmp_path)
    with pytest.raises(SpeederError, match='does not exist') as e:
        text_features(ds, encoder=tmp_path/'no-such-model')
    assert str(tmp_path/'no-such-model') in str(e.value)
    with pytest.raises(SpeederError, match='no-such-vision'):
        vision_features(ds, encoder=tmp_path/'no-such-vision')

def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path/'empty').mkdir()
    with pytest.raises(SpeederError, match='is not a model folder') as e:
        TextEncoder(tmp_path/'empty', root=tmp_path)
    assert str(tmp_path/'empty') in str(e.value)
    bad = tmp_path/'badcfg'
    bad.mkdir()
    (bad/'config.json').write_text('{"hello": 1}')
    with pytest.raises(SpeederError, match='config.json cannot be loaded'):
        TextEncoder(bad, root=tmp_path)
    noweights = tmp_path/'noweights'
    noweights.mkdir()
    shutil.copy(fetch_asset('all-minilm-l6-v2')/'model'/'config.json', noweights/'config.json')
    with pytest.raises(SpeederError, match='has no weights file'):
        TextEncoder(noweights, root=tmp_path)
    torch.save({'w': torch.zeros(2)}, tmp_path/'other.pth')
    with pytest.raises(SpeederError, match='not an EfficientNet-Lite0 state dict'):
        load_efficientnet_lite0(tmp_path/'other.pth')
    (tmp_path/'junk.pth').write_bytes(b'junk')
    with pytest.raises(SpeederError, match='cannot be read'):
        load_efficientnet_lite0(tmp_path/'junk.pth')

def test_unloadable_weights_name_the_folder(tmp_path):
    m = _tiny_bert(tmp_path/'broken')
    (m/'model.safetensors').write_bytes(b'truncated')
    enc = TextEncoder(m, root=tmp_path)
    with pytest.raises(SpeederError, match='cannot be loaded') as e:
        enc.encode(['a kite'])
    assert str(m) in str(e.value)

def test_pooling():
    h = torch.arange(12.).view(2, 3, 2)
    assert mean_pool(h, torch.tensor([[1, 0, 0], [1, 1, 1]])).tolist() == [[0., 1.], [8., 9.]]
    assert last_pool(h, torch.tensor([[1, 1, 0], [0, 0, 1]])).tolist() == [[2., 3.], [10., 11.]]
    with pytest.raises(SpeederError, match='unknown pooling'):
        TextEncoder(pooling='cls')

# --- images: corrupt, skipped, missing --------------------------------------------------------------------------

def test_corrupt_image_names_item_and_file(tmp_path):
    ds = _amazon(tmp_path, corrupt=['B00005'])
    i = ds.raw_item_ids.index('B00005')
    with pytest.raises(SpeederError) as e:
        vision_features(ds)
    msg = str(e.value)
    assert f'item {i} (B00005)' in msg and 'B00005.png' in msg and 'skip_bad_images' in msg

def test_skip_bad_images_counts_and_masks(tmp_path, capsys):
    ds = _amazon(tmp_path, corrupt=['B00005', 'B00007'])
    bad = [ds.raw_item_ids.index(a) for a in ('B00005', 'B00007')]
    vis, present, meta = vision_features(ds, skip_bad_images=True)
    assert meta['n_bad'] == 2 and sorted(b[0] for b in meta['bad']) == sorted(bad)
    assert not present[bad].any() and vis[bad].abs().sum() == 0
    assert int(present.sum()) == ds.n_items - 2
    assert '2 unreadable image(s)' in capsys.readouterr().err
    # the cache remembers the bad files: without skipping, a cache hit still refuses them
    with pytest.raises(SpeederError, match='B0000[57]'):
        vision_features(ds)

def test_missing_image_is_masked(tmp_path):
    ds = _amazon(tmp_path, drop=['B00003'])
    i = ds.raw_item_ids.index('B00003')
    assert ds.items[i]['image'] is None
    vis, present, meta = vision_features(ds)
    assert vis.shape == (ds.n_items + 1, 1280) and present.dtype == torch.bool
    assert present[i].item() is False and present[0].item() is False and vis[i].abs().sum() == 0
    assert meta['n_no_image'] == 1 and meta['n_bad'] == 0 and int(present.sum()) == ds.n_items - 1
    assert (vis[present].abs().sum(1) > 0).all()

def test_efficientnet_strict_load_and_shape():
    net = load_efficientnet_lite0(fetch_asset('efficientnet-lite0')/LITE0_FILE)   # strict=True inside
    sd = torch.load(fetch_asset('efficientnet-lite0')/LITE0_FILE, map_location='cpu', weights_only=True)
    assert set(net.state_dict()) == set(sd)
    with torch.inference_mode():
        f = net.features(torch.randn(3, 3, 224, 224))
    assert f.shape == (3, 1280) and (f >= 0).all() and (f <= 6).all()   # ReLU6 then average pooling

# --- cache ------------------------------------------------------------------------------------------------------

def test_cache_reuse_does_not_recompute(tmp_path, count_encodes):
    ds = _amazon(tmp_path, images=False)
    enc = _tiny_bert(tmp_path/'bert')
    a = text_features(ds, enc, root=tmp_path)
    b = text_features(ds, enc, root=tmp_path)
    assert count_encodes == ['bert'] and torch.equal(a, b)
    assert a.shape == (ds.n_items + 1, 16) and a[0].abs().sum() == 0
    assert len(list((ds.path.parent/'features').glob('text-bert-*.pt'))) == 1

def test_cache_rebuilt_for_another_encoder(tmp_path, count_encodes, capsys):
    ds = _amazon(tmp_path, images=False)
    enc = _tiny_bert(tmp_path/'bert', seed=0)
    a = text_features(ds, enc, root=tmp_path)
    _tiny_bert(tmp_path/'bert', seed=1)               # same folder, other weights: a different encoder
    b = text_features(ds, enc, root=tmp_path)
    assert count_encodes == ['bert', 'bert'] and not torch.allclose(a, b)
    assert 'rebuilding' in capsys.readouterr().err
    assert len(list((ds.path.parent/'features').glob('text-bert-*.pt'))) == 1   # the stale cache is gone
    c = text_features(ds)                              # the real MiniLM: another encoder altogether
    assert c.shape == (ds.n_items + 1, 384) and count_encodes[-1] == 'all-MiniLM-L6-v2'
    text_features(ds, enc, root=tmp_path)            # back to the tiny one: its cache is still valid
    assert len(count_encodes) == 3

def test_hidden_size_change_rebuilds(tmp_path, count_encodes, capsys):
    ds = _amazon(tmp_path, images=False)
    enc = _tiny_bert(tmp_path/'bert')
    text_features(ds, enc, root=tmp_path)
    [cache] = (ds.path.parent/'features').glob('text-bert-*.pt')
    blob = torch.load(cache, weights_only=True)
    blob['features'] = torch.zeros(ds.n_items + 1, 7)   # same key, wrong hidden size
    torch.save(blob, cache)
    out = text_features(ds, enc, root=tmp_path)
    assert out.shape == (ds.n_items + 1, 16) and len(count_encodes) == 2
    err = capsys.readouterr().err
    assert 'rebuilding' in err and '7)' in err
    assert torch.load(cache, weights_only=True)['features'].shape == (ds.n_items + 1, 16)

def test_weight_hashes_are_remembered(tmp_path, monkeypatch):
    import speeder.assets as sd
    f = tmp_path/'w.bin'
    f.write_bytes(b'x' * 1000)
    calls = []
    real = sd._sha256
    monkeypatch.setattr(sd, '_sha256', lambda p: calls.append(p) or real(p))
    h1, h2 = weights_fingerprint(f, tmp_path), weights_fingerprint(f, tmp_path)
    assert h1 == h2 and len(calls) == 1
    f.write_bytes(b'y' * 1001)                         # size (and mtime) change: hashed again
    assert weights_fingerprint(f, tmp_path) != h1 and len(calls) == 2
    assert json.loads((tmp_path/'.cache'/'sha256.json').read_text())[str(f.resolve())]['size'] == 1001
    assert sd.sha256_file(f) == weights_fingerprint(f, tmp_path)   # the memo changes nothing but the time

# --- all modalities ---------------------------------------------------------------------------------------------

def test_item_features_without_images(tmp_path, monkeypatch, capsys):
    ds = _amazon(tmp_path, images=False)
    def no_vision(*a, **k):
        raise AssertionError('the vision encoder must not be built for a dataset without images')
    monkeypatch.setattr(VisionEncoder, '__init__', no_vision)
    feats = item_features(ds, text_encoder=_tiny_bert(tmp_path/'bert'), root=tmp_path, standardize=False)
    n = ds.n_items + 1
    assert feats.dims == dict(text=16, vision=1280, sequence=SEQUENCE_DIM)
    assert feats.vision.shape == (n, 1280) and feats.vision.abs().sum() == 0 and not feats.vision_present.any()
    assert feats.sequence.shape == (n, SEQUENCE_DIM) and feats.sequence.abs().sum() == 0
    assert 'sequence features: none given' in capsys.readouterr().err

def test_item_features_sequence_and_to(tmp_path):
    ds = _amazon(tmp_path, drop=['B00003'])
    bert = _tiny_bert(tmp_path/'bert')
    seq = torch.randn(ds.n_items + 1, 8)
    feats = item_features(ds, text_encoder=bert, sequence=seq, root=tmp_path, standardize=False).to('cpu')
    assert isinstance(feats, ItemFeatures) and feats.dims == dict(text=16, vision=1280, sequence=8)
    assert torch.equal(feats.sequence, seq) and feats.meta['sequence'] == 'given'
    assert int(feats.vision_present.sum()) == ds.n_items - 1
    with pytest.raises(SpeederError, match=rf'expected \({ds.n_items + 1}, d\)'):
        item_features(ds, text_encoder=bert, sequence=seq[1:], root=tmp_path, standardize=False)
    with pytest.raises(SpeederError, match='disagree'):
        ItemFeatures(feats.text, feats.vision[:3], feats.vision_present, feats.sequence)
