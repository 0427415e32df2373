"MPO runs: stage plan, bad input, checkpoints that survive failures, and a real SIGKILL + --resume."
import errno, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from speeder.cli import run_cli
from speeder.data import SpeederError
import speeder.mpo as mpo

TINY = dict(sequence_features='zeros', lora_r=4, d_model=32, n_heads=2, train_examples=48, batch_size=4,
            eval_examples=20, valid_examples=10)
TINY_SET = ['--set', 'sequence_features="zeros"', 'lora_r=4', 'd_model=32', 'n_heads=2', 'valid_examples=10']

def test_stage_plans():
    names = lambda **kw: [s.name for s in mpo.mpo_stages(**kw)[0]]
    assert names() == ['text', 'vision', 'joint']
    assert names(has_images=False) == ['text', 'joint']
    assert names(modalities=('text', 'sequence')) == ['text', 'joint']
    assert names(mpo=False) == ['joint']
    assert names(order=('sequence', 'text', 'vision')) == ['sequence', 'text', 'joint']
    with pytest.raises(SpeederError, match='--mpo-order'): mpo.mpo_stages(order=('text', 'text', 'vision'))

def test_resume_needs_a_run(tmp_path):
    with pytest.raises(SpeederError, match='not a Speeder run folder'): mpo.train_main(resume=tmp_path)
    r = run_cli('train', '--resume', str(tmp_path/'missing'), '--json')
    assert r.returncode == 2 and 'not a Speeder run folder' in r.stderr and 'Traceback' not in r.stderr

def test_existing_run_needs_overwrite(tmp_path):
    (tmp_path/'r').mkdir(); (tmp_path/'r'/'config.json').write_text('{}')
    with pytest.raises(SpeederError, match='already exists; pass --overwrite'):
        mpo.train_main('ml-100k', 'tiny', 'r', runs_dir=tmp_path, max_steps=2, **TINY)
    assert (tmp_path/'r'/'config.json').read_text() == '{}'   # untouched

def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path/'file'; blocker.write_text('x')
    with pytest.raises(SpeederError, match='not writable'):
        mpo.train_main('ml-100k', 'tiny', 'r', runs_dir=blocker, max_steps=2, **TINY)

def test_llm_path_missing_or_not_causal(tmp_path):
    r = run_cli('train', '--llm', str(tmp_path/'nope'), '--runs-dir', str(tmp_path), '--json', '--max-steps', '2')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and str(tmp_path/'nope') in r.stderr
    enc = tmp_path/'encoder'; enc.mkdir()
    (enc/'config.json').write_text(json.dumps(dict(model_type='bert', architectures=['BertModel'])))
    r = run_cli('train', '--llm', str(enc), '--runs-dir', str(tmp_path), '--json', '--max-steps', '2')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'encoder' in r.stderr

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp('runs')
    res = mpo.train_main('ml-100k', 'tiny', 'done', runs_dir=runs, max_steps=4, checkpoint_every=2, **TINY)
    return runs/'done', res

def test_run_folder_contents(finished_run):
    run, res = finished_run
    assert {'config.json', 'metrics.json', 'history.json', 'modules.pt', 'lora', 'checkpoints'} <= {p.name for p in run.iterdir()}
    assert {'hr1', 'valid_ratio', 'vhr1', 'vhr1_score'} <= set(res) and res['backbone_is_stand_in'] is True
    assert [s['stage'] for s in res['stages']] == ['text', 'joint'] and res['notes']
    assert not any((run/'lora').rglob('model.safetensors'))   # the frozen backbone is never saved
    ev = mpo.evaluate_main(run, 'score', 20)
    assert ev['hr1'] == pytest.approx(res['score_hr1'])

def test_hidden_size_mismatch(finished_run, tmp_path):
    import shutil
    run = tmp_path/'copy'; shutil.copytree(finished_run[0], run)
    cfg = json.loads((run/'config.json').read_text()); cfg['settings']['llm_hidden'] = 4096
    (run/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(SpeederError, match='hidden size is 4096'): mpo.evaluate_main(run, 'score', 5)

def test_failed_checkpoint_write_keeps_previous(finished_run, monkeypatch, tmp_path):
    import shutil
    run = tmp_path/'copy'; shutil.copytree(finished_run[0], run)
    before = (run/'checkpoints'/'latest.json').read_text()
    model, ds, cfg = mpo.load_trained(run)
    def disk_full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(mpo.torch, 'save', disk_full)
    with pytest.raises(SpeederError, match='No space left on device; the previous checkpoint is intact'):
        mpo.save_checkpoint(model, run, 'step-000099', dict(stage=0))
    assert (run/'checkpoints'/'latest.json').read_text() == before
    assert mpo.latest_checkpoint(run) is not None and not (run/'checkpoints'/'step-000099').exists()

def test_recommend_unknown_user(finished_run):
    with pytest.raises(SpeederError, match="unknown user 'nobody'"): mpo.recommend_main(finished_run[0], 'nobody')

def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    "Kill a real `speeder train` process after its first mid-stage checkpoint, resume it, compare with a clean run."
    args = ['train', '--llm', 'tiny', '--runs-dir', str(tmp_path), '--max-steps', '40', '--batch-size', '4',
            '--train-examples', '48', '--eval-examples', '20', '--checkpoint-every', '3', '--json', *TINY_SET]
    clean = run_cli(*args, '--name', 'clean')
    assert clean.returncode == 0, clean.stderr
    proc = subprocess.Popen([sys.executable, '-c', 'from speeder.cli import main; main()', *args, '--name', 'killed'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, t0 = tmp_path/'killed'/'checkpoints'/'latest.json', time.time()
    while time.time() - t0 < 120:
        if latest.exists() and json.loads(latest.read_text())['checkpoint'].startswith('step-'): break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (tmp_path/'killed'/'metrics.json').exists(), 'the run finished before it could be killed'
    resumed = run_cli('train', '--resume', str(tmp_path/'killed'), '--json')
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(clean.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    for k in ('hr1', 'valid_ratio', 'vhr1', 'score_hr1', 'score_ndcg5', 'steps'): assert a[k] == b[k], k

def test_ablate_table_and_plot(tmp_path):
    out = mpo.ablate_main('ml-100k', 'tiny', ['speeder', 'no-ppl', 'drop-modality-0.5'], runs_dir=tmp_path,
                          max_steps=2, **TINY)
    assert [r['variant'] for r in out['rows']] == ['speeder', 'no-ppl', 'drop-modality-0.5']
    assert Path(out['plot']).exists() and all(0 <= r['vhr1'] <= 1 for r in out['rows'])
    cfg = json.loads((tmp_path/'ablate-ml-100k-no-ppl'/'config.json').read_text())['config']
    assert cfg['use_ppl'] is False
    with pytest.raises(SpeederError, match='unknown ablation'): mpo.ablate_main('ml-100k', 'tiny', ['nope'], runs_dir=tmp_path)

def test_drop_modality_masks_fixed_items():
    from speeder.llm import SpeederConfig, SpeederRecommender, load_backbone, random_features
    cfg = SpeederConfig(llm='tiny', lora_r=4, d_model=32, n_heads=2, drop_modality=0.5)
    m = SpeederRecommender(random_features(), cfg, backbone=load_backbone('tiny'))
    kept = m.modality_kept
    assert kept[:, 0].all() and 0.3 < kept[:, 1:].float().mean() < 0.7
    m2 = SpeederRecommender(random_features(), cfg, backbone=load_backbone('tiny'))
    assert torch.equal(kept, m2.modality_kept)   # the same items lose the same modalities, at train and test time
