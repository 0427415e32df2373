"Baselines as prompt formats, `speeder compare` and `speeder bench` on the tiny stand-in: they run, report every field, refuse bad input."
import json
from pathlib import Path
import numpy as np
import pytest, torch
from speeder.cli import run_cli
from speeder.config import DEFAULT_DATASET, SCORE, SPEEDER, STAND_IN, SpeederConfig, SpeederError, preset_settings
from speeder.data import load_dataset, toy_split
from speeder.features import random_features
from speeder.backbone import smollm2_tokenizer
from speeder.prompt import SpeederPrompt, ItemTextPrompt, TEXT_FORMATS, short_text
from speeder.baselines import baseline_model, baseline_stages, train_baseline, BASELINES
from speeder.bench import bench_ratios, RATIOS

TINY_SET = ['--set', 'sequence_features="zeros"', 'lora_r=4', 'd_model=32', 'n_heads=2']

def _item(title, year=''):
    return dict(title=title, year=year, genres=[], brand='', category='', description='', image=None)

@pytest.fixture(scope='module')
def tok():
    return smollm2_tokenizer()

@pytest.fixture(scope='module')
def items():
    return [None] + [_item(f'Film {k}', str(1980 + k)) for k in range(1, 61)]

def test_unknown_item_and_shapes(tok, items):
    p = ItemTextPrompt(tok, items, n_candidates=3)
    with pytest.raises(SpeederError, match='item id 99 is not in the dataset'):
        p.batch([[0, 1, 99]], [[2, 3, 4]])
    with pytest.raises(SpeederError, match=r'candidates have shape \(1, 2\)'):
        p.batch([[0, 1, 2]], [[2, 3]])
    with pytest.raises(SpeederError, match='left-padded'):
        p.batch([[1, 0, 2]], [[2, 3, 4]])

def test_duplicate_titles_name_neither(tok):
    items = [None, _item('Heat'), _item('Heat'), _item('Heathers')]
    p = ItemTextPrompt(tok, items, n_candidates=3)
    assert p.pick('Heathers', [1, 2, 3]) == 3   # whole words: "Heat" is not found inside "Heathers"
    assert p.pick('Heat', [1, 2, 3]) is None    # two candidates are called "Heat": the answer names neither
    assert p.pick('Heat', [1, 3, 3]) == 1

def test_speeder_prompt_answer_mask(tok):
    p = SpeederPrompt(tok, n_candidates=20)
    b = p.batch(toy_split(3).histories, toy_split(3).candidates, toy_split(3).targets)
    assert b['n_answer'] == 2 and bool(b['answer_mask'].all())
    assert 'answer_mask' in p.batch(toy_split(3).histories, toy_split(3).candidates) and p.pick('C', list(range(1, 21))) == 2

class _Items:
    items = [None] + [_item(f'Film {k}', str(1980 + k)) for k in range(1, 61)]

def test_llara_curriculum_trains_projector_only_in_hybrid_stage():
    feats = random_features(60)
    model = baseline_model('hybrid', _Items, feats, SpeederConfig.preset(STAND_IN, batch_size=4), device='cpu')
    before = [p.detach().clone() for p in model.mrc.parameters()]
    train_baseline(model, toy_split(8), 4, stages=baseline_stages('hybrid', model.cfg)[:1])   # the text-only stage alone
    assert all(torch.equal(a, b) for a, b in zip(before, model.mrc.parameters()))   # the projector cannot change there
    hist = train_baseline(model, toy_split(8), 4)
    assert [r['stage'] for r in hist] == ['text-only'] * 2 + ['hybrid'] * 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.mrc.parameters()))
    assert model.prompt is model.formats['hybrid'] and model.prompt.item_token

def test_baseline_has_no_score_mode():
    model = baseline_model('text-only', _Items, random_features(60), SpeederConfig.preset(STAND_IN), device='cpu')
    from speeder.answer import recommend
    with pytest.raises(SpeederError, match='no score mode'):
        recommend(model, toy_split(2).histories, toy_split(2).candidates, SCORE)
    with pytest.raises(SpeederError, match='unknown baseline'):
        baseline_model('tallrec', _Items, random_features(60), SpeederConfig.preset(STAND_IN))

def test_hybrid_share_comes_from_the_config():
    model = baseline_model('hybrid', _Items, random_features(60), SpeederConfig.preset(STAND_IN, batch_size=4,
                                                                                    hybrid_text_share=0.25), device='cpu')
    hist = train_baseline(model, toy_split(8), 4)
    assert [r['stage'] for r in hist] == ['text-only'] + ['hybrid'] * 3

def test_text_multimodal_reads_more_tokens_than_text_only(tok):
    ds = load_dataset(DEFAULT_DATASET)
    short = ItemTextPrompt(tok, ds.items, short_text)
    long = ItemTextPrompt(tok, ds.items, TEXT_FORMATS['long'])
    n = lambda p: int(p.batch(ds.test.histories[:8], ds.test.candidates[:8])['attention_mask'].sum())
    assert n(long) > n(short) > 8 * 30   # well over one token per item

def test_ratios_follow_their_definition():
    rows = [dict(method='text-only', examples_per_s=1.0, generate_b1_p50_ms=300.0, prompt_tokens_mean=400.0),
            dict(method=SPEEDER, examples_per_s=5.0, generate_b1_p50_ms=60.0, score_b1_p50_ms=20.0, prompt_tokens_mean=100.0)]
    r = bench_ratios(rows)
    assert r['train_speedup'] == 5.0 and r['infer_speedup_generate'] == 5.0 and r['infer_speedup_score'] == 15.0 and r['token_ratio'] == 4.0
    assert set(r) == set(RATIOS) and bench_ratios(rows[1:])['train_speedup'] is None

def test_bench_cli_tiny(tmp_path):
    r = run_cli('bench', '--llm', 'tiny', '--train-steps', '2', '--warmup', '1', '--batch-size', '4', '--calls', '2',
                '--out', str(tmp_path), '--json', *TINY_SET)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row['method'] for row in res['rows']] == [SPEEDER, *BASELINES] and res['backbone_is_stand_in'] is True
    for row in res['rows']:
        for k in ('prompt_tokens_mean', 'prompt_tokens_p95', 'examples_per_s', 'tokens_per_s', 'generate_b1_p50_ms',
                  'generate_b1_p95_ms', 'generate_b16_p50_ms', 'generate_b16_per_request_ms', 'train_peak_mb'):
            assert row[k] is not None and row[k] > 0, (row['method'], k)
    speeder = res['rows'][0]
    assert speeder['score_b1_p50_ms'] > 0 and 'score_b1_p50_ms' not in res['rows'][1]
    assert all(res['ratios'][k] > 0 for k in ('train_speedup', 'infer_speedup_generate', 'infer_speedup_score', 'token_ratio'))
    assert res['ratios']['token_ratio'] > 2
    assert json.loads((tmp_path/'bench.json').read_text())['ratios'] == res['ratios'] and (tmp_path/'bench.png').exists()

def test_compare_cli_tiny(tmp_path):
    r = run_cli('compare', '--llm', 'tiny', '--max-steps', '2', '--batch-size', '4', '--train-examples', '16', '--eval-examples', '8',
                '--no-sasrec', '--out', str(tmp_path), '--json', *TINY_SET)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row['method'] for row in res['rows']] == [SPEEDER, *BASELINES]
    for row in res['rows']:
        assert 0 <= row['hr1'] <= 1 and 0 <= row['valid_ratio'] <= 1 and row['vhr1'] == pytest.approx(row['hr1'] * row['valid_ratio'])
        assert row['n_test'] == 8 and row['steps'] == 2
    assert res['budget'] == dict(minutes=None, steps=2, batch_size=4, train_examples=16, eval_examples=8)
    assert (tmp_path/'compare.json').exists() and (tmp_path/'compare.png').exists()

def test_bad_methods_are_named(tmp_path):
    for cmd in ('bench', 'compare'):
        r = run_cli(cmd, '--llm', 'tiny', '--methods', 'speeder,tallrec', '--out', str(tmp_path/cmd), '--json')
        assert r.returncode == 2 and 'tallrec' in r.stderr and 'Traceback' not in r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])['error']

def test_compare_keeps_finished_methods(tmp_path):
    from speeder.compare import compare_main
    tiny = preset_settings(STAND_IN, max_steps=2, batch_size=4, train_examples=16, eval_examples=8)
    llm = tiny.pop('llm')
    first = compare_main(DEFAULT_DATASET, llm, ('text-only',), tmp_path, sasrec=False, **tiny)
    (tmp_path/'compare.json').write_text(json.dumps(dict(json.loads((tmp_path/'compare.json').read_text()),
                                                         runs=[dict(first['runs'][0], train_s=-1.0)])))   # mark the kept row
    again = compare_main(DEFAULT_DATASET, llm, ('text-only', SPEEDER), tmp_path, sasrec=False, **tiny)
    assert [r['method'] for r in again['rows']] == ['text-only', SPEEDER] and again['rows'][0]['train_s'] == -1.0   # not retrained
    with pytest.raises(SpeederError, match='other settings'):
        compare_main(DEFAULT_DATASET, llm, ('text-only',), tmp_path, sasrec=False, **dict(tiny, max_steps=3))

def test_hybrid_warms_up_once_and_keeps_its_best_stage(monkeypatch):
    "LLaRA's two stages read one schedule; the kept weights (best valid point, in the text stage here) bring their prompt."
    import speeder.train as train
    from speeder.train import ValidCurve, run_lr, trained_state
    cfg = SpeederConfig.preset(STAND_IN, batch_size=4, warmup_share=0.25, hybrid_text_share=0.5)
    model = baseline_model('hybrid', _Items, random_features(60), cfg, device='cpu')
    forced = iter([0.1, 0.2, 0.5, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])   # steps 0..8: the best is step 2, in the text-only stage
    monkeypatch.setattr(train, 'evaluate', lambda *a, **k: dict(vhr1=next(forced), n=4))
    copies = {}
    curve = ValidCurve(model, toy_split(8), 4, every=0.0, on_best=lambda p: copies.update({p['step']: trained_state(model)}))
    hist = train_baseline(model, toy_split(8), 8, curve=curve)
    lrs = [r['lr'] for r in hist]
    assert [r['stage'] for r in hist] == ['text-only'] * 4 + ['hybrid'] * 4
    assert lrs == pytest.approx([run_lr(model.cfg, s, 8) for s in range(8)], abs=1e-15)
    assert lrs[4] < lrs[3]   # the hybrid stage does not warm up again
    assert curve.kept == dict(step=2, seconds=curve.points[2]['seconds'], hr1=0.5, rule='best', stage='text-only')
    assert model.prompt is model.formats['text-only']   # the prompt the kept weights answered with
    now = trained_state(model)
    assert all(torch.equal(now[k][n], copies[2][k][n]) for k in now for n in now[k])
