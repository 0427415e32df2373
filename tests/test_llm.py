"Bad input and fast behaviour tests for speeder.llm (the tiny stand-in backbone; seconds each on a CPU)."
import json
import numpy as np
import pytest, torch
from speeder.config import SpeederError
from speeder.assets import fetch_asset
from speeder.data import Split, load_dataset
from speeder.features import ItemFeatures
from speeder.config import SpeederConfig, LABELS
from speeder.data import toy_split
from speeder.features import random_features
from speeder.backbone import add_lora, check_causal_lm, load_backbone, tiny_llm, smollm2_tokenizer
from speeder.prompt import SpeederPrompt, ITEM_TOKEN, render_prompt
from speeder.model import SpeederRecommender, LOSS_KEYS
from speeder.answer import evaluate, recommend, reorder_histories
from speeder.train import fit

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "The tiny stand-in is made of small ops: one thread is as fast, and far faster when other jobs share the CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _features(n_items=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {m: torch.randn(n_items + 1, d, generator=g) for m, d in dict(text=384, vision=1280, sequence=64).items()}
    present = torch.arange(n_items + 1) % 2 == 1
    for x in t.values():
        x[0] = 0
    t['vision'][~present] = 0
    return ItemFeatures(t['text'], t['vision'], present, t['sequence'])

def _model(**kw):
    cfg = SpeederConfig(**dict(dict(llm='tiny', lora_r=4, d_model=32, n_heads=2, dropout=0.0, lora_dropout=0.0), **kw))
    return SpeederRecommender(_features(), cfg, device='cpu')

_toy = toy_split   # the 05_llm notebook's toy: 8 memorisable examples over 60 items

# --- the --llm path --------------------------------------------------------------------------------------------

def test_llm_path_missing(tmp_path):
    with pytest.raises(SpeederError, match='does not exist') as e:
        load_backbone(tmp_path/'no-such-llm')
    assert str(tmp_path/'no-such-llm') in str(e.value)

def test_llm_path_not_a_causal_lm(tmp_path):
    minilm = fetch_asset('all-minilm-l6-v2')/'model'
    with pytest.raises(SpeederError, match='not a causal') as e:
        load_backbone(minilm)
    assert str(minilm) in str(e.value) and 'BertModel' in str(e.value)
    (tmp_path/'empty').mkdir()
    with pytest.raises(SpeederError, match='config.json') as e:
        load_backbone(tmp_path/'empty')
    assert str(tmp_path/'empty') in str(e.value)
    (tmp_path/'file.bin').write_bytes(b'x')
    with pytest.raises(SpeederError, match='not a model folder'):
        load_backbone(tmp_path/'file.bin')
    bad = tmp_path/'badcfg'
    bad.mkdir()
    (bad/'config.json').write_text('{"hello": 1}')
    with pytest.raises(SpeederError, match='cannot be loaded'):
        check_causal_lm(bad)

def test_llm_path_a_real_causal_lm_folder(tmp_path):
    "A saved LLaMA folder (the tiny one) loads through the generic path."
    tok = smollm2_tokenizer()
    tiny_llm(tok).save_pretrained(tmp_path/'llm')
    tok.save_pretrained(tmp_path/'llm')
    model, tok2 = load_backbone(tmp_path/'llm')
    assert type(model).__name__ == 'LlamaForCausalLM' and len(tok2) == len(tok)
    assert torch.equal(model.get_input_embeddings().weight, tiny_llm(tok).get_input_embeddings().weight)

def test_lora_targets_must_exist():
    with pytest.raises(SpeederError, match='not linear layers') as e:
        add_lora(load_backbone('tiny')[0], targets=('q_proj', 'query'))
    assert 'query' in str(e.value) and 'q_proj' in str(e.value).split('it has:')[1]

# --- config ------------------------------------------------------------------------------------------------------

def test_config_roundtrip_and_unknown_keys():
    cfg = SpeederConfig(llm='tiny', modalities=('text', 'sequence'), lora_targets=['q_proj'])
    assert SpeederConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(SpeederError, match='lora_rank'):
        SpeederConfig.from_dict(dict(lora_rank=4))
    with pytest.raises(SpeederError, match='audio'):
        SpeederConfig(modalities=('text', 'audio'))
    with pytest.raises(SpeederError, match='text is always on'):
        SpeederConfig(modalities=('vision', 'sequence'))
    with pytest.raises(SpeederError, match='dtype'):
        SpeederConfig(dtype='float8')
    with pytest.raises(SpeederError, match='labels'):
        SpeederConfig(n_candidates=30)

# --- the prompt ----------------------------------------------------------------------------------------------------

def test_prompt_has_30_item_tokens():
    p = SpeederPrompt(smollm2_tokenizer())
    ids, hist, cand, letters = p.ids(10)
    assert ids.count(p.item_id) == 30 and len(hist) == 10 and len(cand) == 20
    assert render_prompt(10).count(ITEM_TOKEN) == 30
    assert p.tokenizer.decode(ids) == render_prompt(10)
    assert all(ids[c] == p.item_id for c in cand) and all(ids[h] == p.item_id for h in hist)
    assert [ids[l] for l in letters] == p.label_ids and letters == [c + 1 for c in cand]

def test_prompt_bad_batches():
    p = SpeederPrompt(smollm2_tokenizer())
    h, c = np.array([[0] * 8 + [3, 4]]), np.arange(10, 30)[None]
    with pytest.raises(SpeederError, match='not exactly once'):
        p.batch(h, c, targets=[99])
    with pytest.raises(SpeederError, match='left-padded'):
        p.batch(np.array([[3, 4] + [0] * 8]), c)
    with pytest.raises(SpeederError, match=r'expects \(1, 20\)'):
        p.batch(h, c[:, :10])
    with pytest.raises(SpeederError, match='one token'):
        SpeederPrompt(smollm2_tokenizer(), n_candidates=2, labels=['B', 'Candidate12'])

def test_history_longer_than_position_prompts():
    "A history wider than max_history is refused with a message that says how to fix it (no silent truncation)."
    m = _model(max_history=10)
    h = np.arange(1, 13)[None]            # 12 items, position prompts cover 10
    b = m.prompt.batch(h, np.arange(21, 41)[None], targets=[21])
    with pytest.raises(SpeederError, match='12 slots but there are 10 position prompts') as e:
        m(b)
    assert 'histories[:, -10:]' in str(e.value)
    m(m.prompt.batch(h[:, -10:], np.arange(21, 41)[None], targets=[21]))   # the suggested fix works

# --- the model -------------------------------------------------------------------------------------------------------

def test_ppl_changes_only_history_positions():
    m = _model().eval()
    with torch.no_grad():
        for p in m.ppl.parameters():
            p.normal_()
    b = m.prompt.batch(np.array([[0] * 7 + [5, 6, 7], list(range(1, 11))]), np.arange(21, 61).reshape(2, 20))
    with torch.no_grad():
        on = m.embed(b)
        m.cfg.use_ppl = False
        off = m.embed(b)
    changed = (on - off).abs().sum(-1) > 0
    for r in range(2):
        hp = b['hist_pos'][r][b['hist_pos'][r] >= 0]
        assert changed[r].nonzero().squeeze(1).tolist() == sorted(hp.tolist())

def test_losses_and_modalities():
    m = _model()
    b = m.prompt.batch(np.array([[0] * 7 + [5, 6, 7]]), np.arange(21, 41)[None], targets=[25])
    out = m(b)
    assert set(out) == set(LOSS_KEYS) and torch.isfinite(out['loss'])
    with pytest.raises(SpeederError, match='targets'):
        m(m.prompt.batch(np.array([[0] * 7 + [5, 6, 7]]), np.arange(21, 41)[None]))
    text_only = m.item_tokens(torch.tensor([1, 2]), active=('text',))
    assert not torch.allclose(text_only, m.item_tokens(torch.tensor([1, 2])))
    assert torch.equal(m.item_tokens(torch.tensor([0, 1]))[0], torch.zeros(m.hidden))

def test_answer_modes_and_bad_modes():
    m = _model()
    h, c = np.array([[0] * 7 + [5, 6, 7]] * 3), np.stack([np.arange(11, 31), np.arange(21, 41), np.arange(41, 61)])
    s = recommend(m, h, c, 'score')
    assert s['scores'].shape == (3, 20) and all(p in row for p, row in zip(s['picks'], c))
    g = recommend(m, h, c, 'generate')
    assert len(g['answers']) == 3 and all(p is None or p in row for p, row in zip(g['picks'], c))
    with pytest.raises(SpeederError, match='answer mode'):
        recommend(m, h, c, 'beam')
    with pytest.raises(SpeederError, match='item ids must lie in 0..60'):
        recommend(m, h, c + 1, 'score')
    with pytest.raises(SpeederError, match='no saved candidates'):
        evaluate(m, Split(np.zeros(1), h[:1], np.array([25])))

def test_generate_and_score_agree_on_a_trained_toy():
    "Overfit 8 examples until both answer modes pick every target; then they agree."
    toy = _toy()
    m = _model(d_model=64, lora_r=8, lr=5e-3, batch_size=8, max_steps=150, warmup_steps=5, use_ppt=False)
    fit(m, toy)
    gen, sc = recommend(m, toy.histories, toy.candidates, 'generate'), recommend(m, toy.histories, toy.candidates, 'score')
    assert sc['picks'] == list(toy.targets)
    assert gen['picks'] == sc['picks']

def test_reorder_histories():
    h = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    assert reorder_histories(h, 'reverse').tolist() == [[0, 0, 3, 2, 1], [8, 7, 6, 5, 4]]
    many = np.tile([0, 0, 1, 2, 3, 4, 5, 6], (30, 1))
    sh = reorder_histories(many, 'shuffle', seed=1)
    assert (sh[:, :2] == 0).all()                                        # padding stays on the left
    assert all(sorted(r) == sorted(many[0]) for r in sh)                  # the same items
    assert (sh[:, 2:] != many[:, 2:]).any(1).all()                        # ... in another order, in every row
    assert len({tuple(r) for r in sh}) > 20                               # and not the same other order each time
    with pytest.raises(SpeederError, match='order'):
        reorder_histories(h, 'sorted')

# --- config checks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bad,says', [(dict(lr='abc'), "lr must be a number, got 'abc'"),
                                      (dict(batch_size=0), 'batch_size must be at least 1'),
                                      (dict(max_steps=-1), 'max_steps must be at least 1'),
                                      (dict(eval_examples=-3), 'eval_examples must be at least 1'),
                                      (dict(train_examples=0), 'train_examples must be at least 1'),
                                      (dict(skip_bad_images='true'), 'skip_bad_images must be true or false'),
                                      (dict(lora_targets=[1, 2]), 'lora_targets must be a list of names'),
                                      (dict(warmup_steps=1.5), 'warmup_steps must be an integer'),
                                      (dict(drop_modality=-0.1), 'drop_modality must lie in [0, 1]')])
def test_config_values_are_checked(bad, says):
    with pytest.raises(SpeederError) as e:
        SpeederConfig(**bad)
    assert says in str(e.value) and '\n' not in str(e.value)

def test_config_accepts_json_and_comma_lists():
    cfg = SpeederConfig.from_dict(dict(lr=1, skip_bad_images=True, modalities='text,sequence', eval_examples=None))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.modalities == ('text', 'sequence') and cfg.skip_bad_images

def test_drop_modality_masks_fixed_items():
    cfg = SpeederConfig(llm='tiny', lora_r=4, d_model=32, n_heads=2, drop_modality=0.5)
    m = SpeederRecommender(random_features(), cfg, backbone=load_backbone('tiny'))
    kept = m.modality_kept
    assert kept[:, 0].all() and 0.3 < kept[:, 1:].float().mean() < 0.7
    m2 = SpeederRecommender(random_features(), cfg, backbone=load_backbone('tiny'))
    assert torch.equal(kept, m2.modality_kept)   # the same items lose the same modalities, at train and test time

# --- issue: item tokens keep their identity, a direct signal for the choice ------------------------------------------

def test_item_tokens_stay_at_the_word_scale_and_apart():
    "Trained on the toy, the tiny model's item tokens keep the words' RMS and do not collapse onto one direction."
    from speeder.train import token_stats
    items, ends = torch.arange(1, 61), {}
    for w in (1.0, 0.0):
        m = _model(d_model=64, lora_r=8, lr=5e-3, batch_size=8, max_steps=120, warmup_steps=5, spread_weight=w)
        start = token_stats(m, items)
        fit(m, _toy())
        ends[w] = token_stats(m, items)
        assert start['token_rms'] == pytest.approx(start['word_rms'], rel=1e-3)
        assert ends[w]['token_rms'] == pytest.approx(ends[w]['word_rms'], rel=1e-3)
    assert ends[0.0]['token_cos'] > 0.7, ends   # without the spread loss they turn towards one direction
    assert ends[1.0]['token_cos'] < 0.2, ends   # with it they stay apart

def test_token_scale_none_is_mrc_raw_output():
    m = _model(token_scale='none')
    with torch.no_grad():
        x = m.item_tokens(torch.arange(1, 61))
    assert x.pow(2).mean().sqrt().item() != pytest.approx(m.word_rms.item(), rel=1e-2)

def test_listwise_loss_and_its_switch():
    b_model = _model()
    toy = _toy()
    b = b_model.prompt.batch(toy.histories, toy.candidates, toy.targets)
    on = b_model(b)
    assert on['listwise_loss'] > 0 and on['loss'] > on['lm_loss']
    off = _model(listwise_weight=0.0)(b)
    assert off['listwise_loss'] == 0 and off['listwise_acc'] == 0
    hist = fit(_model(d_model=64, lora_r=8, lr=5e-3, batch_size=8, max_steps=80, warmup_steps=5), toy)
    assert np.mean([r['listwise_acc'] for r in hist[-10:]]) > np.mean([r['listwise_acc'] for r in hist[:10]])

def test_item_lr_sets_its_own_groups():
    from speeder.model import group_parameters
    from speeder.train import _optimizer
    m = _model(lr=1e-3, item_lr=5e-3)
    opt = _optimizer(m, m.trainable_parameters(), m.cfg)
    lora = {id(p) for p in group_parameters(m, 'lora')}
    for g in opt.param_groups:
        assert g['peak_lr'] == (1e-3 if id(g['params'][0]) in lora else 5e-3)
        assert len({id(p) in lora for p in g['params']}) == 1
