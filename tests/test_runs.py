"""Runs you can trust: names that cannot escape, overwrite only on success, nothing executed on resume, a finished
marker written last, every input checked before work starts (one line, exit 2, nothing written), a real SIGKILL + resume."""
import errno, json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from speeder.cli import run_cli
from speeder.config import STAND_IN, SpeederError, preset_settings
import speeder.runs as runs
import speeder.experiments as exp
from speeder.mpo import RunInterrupted

pytestmark = pytest.mark.usefixtures('ml100k')   # the runs' dataset, built once per session (conftest.py)

TINY = preset_settings(STAND_IN, train_examples=48, batch_size=4, eval_examples=20, valid_examples=10)
# the same preset on the command line: --llm tiny --set <its other fields>
TINY_SET = ['--set', *(f'{k}={json.dumps(v)}' for k, v in preset_settings(STAND_IN, valid_examples=10).items() if k != 'llm')]
TINY_CLI = ['--llm', STAND_IN, '--max-steps', '4', '--batch-size', '4', '--train-examples', '32', '--eval-examples', '8',
            *TINY_SET]
RESUMING = re.compile(r'resuming \S+ from checkpoint step-(\d{6})')   # the log line of a resumed run

def train(name:str, runs_dir:Path, **kw)->dict:
    "`train_main` of the tiny preset (with `kw` on top) into `runs_dir/name`."
    return exp.train_main(name=name, runs_dir=runs_dir, **{**TINY, **kw})

def tree(folder:Path)->list:
    "Every path under `folder`, with the size of each file (what 'nothing written' compares)."
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob('*'))

def one_line_error(r:subprocess.CompletedProcess, says:str):
    "Exit 2, one line on stderr naming the problem, no traceback, and the last stdout line is a JSON error."
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr and says in r.stderr, r.stderr[-2000:]
    assert len([l for l in r.stderr.splitlines() if 'error:' in l]) == 1, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert says in last['error'] and last['exit_code'] == 2

@pytest.fixture
def fresh_data(tmp_path, ml100k):
    "A data folder with ML-100k's processed files and the assets, but no SASRec and no feature cache."
    d = tmp_path/'data'
    (d/'ml-100k').mkdir(parents=True)
    (d/'.assets').symlink_to(ml100k.parent.parent/'.assets')   # processed -> ml-100k -> data
    shutil.copytree(ml100k, d/'ml-100k'/'processed')
    return d

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('runs')
    res = train('done', d, max_steps=4, checkpoint_every=2)
    return d/'done', res

# --- names and folders ----------------------------------------------------------------------------------------------

def test_names_cannot_escape(tmp_path):
    base = tmp_path/'base'
    rd = base/'runs'
    (rd/'keep').mkdir(parents=True)
    (rd/'keep'/'config.json').write_text('{}')
    victim = base/'victim'
    victim.mkdir()
    (victim/'precious.txt').write_text('x')
    before = tree(tmp_path)
    for name in ('../victim', '.', '../../tmp/escape', '..', 'a/b'):
        r = run_cli('train', *TINY_CLI, '--runs-dir', str(rd), '--name', name, '--overwrite', '--json')
        one_line_error(r, 'one plain folder name')
    assert tree(tmp_path) == before and not Path('/tmp/escape').exists()

def test_overwrite_replaces_only_on_success(finished_run, tmp_path):
    rd = tmp_path/'runs'
    shutil.copytree(finished_run[0], rd/'goodrun')
    before = tree(tmp_path)
    r = run_cli('train', *TINY_CLI, '--runs-dir', str(rd), '--name', 'goodrun', '--overwrite', '--llm', str(tmp_path/'typo'),
                '--json')
    one_line_error(r, 'does not exist')
    assert tree(tmp_path) == before
    with pytest.raises(SpeederError, match='already exists; pass --overwrite'):
        train('goodrun', rd, max_steps=2)
    res = train('goodrun', rd, overwrite=True, max_steps=2, seed=5)
    assert sorted(p.name for p in rd.iterdir()) == ['goodrun'] and res['run_dir'] == str(rd/'goodrun')
    assert json.loads((rd/'goodrun'/'config.json').read_text())['seed'] == 5

def test_failed_overwrite_keeps_the_old_run(finished_run, tmp_path, monkeypatch):
    "An overwrite that fails while training leaves the old run as it was and nothing of its own."
    rd = tmp_path/'runs'
    shutil.copytree(finished_run[0], rd/'goodrun')
    before = tree(tmp_path)
    def broken(*a, **k):
        raise SpeederError('the GPU caught fire')
    monkeypatch.setattr(exp, 'train_stages', broken)
    with pytest.raises(SpeederError, match='caught fire'):
        train('goodrun', rd, overwrite=True, max_steps=2)
    assert tree(tmp_path) == before

def test_failed_start_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise SpeederError('features went missing')
    monkeypatch.setattr(exp, 'build_model', broken)
    with pytest.raises(SpeederError, match='features went missing'):
        train('r', tmp_path, max_steps=2)
    assert list(tmp_path.iterdir()) == []   # the name stays free
    monkeypatch.undo()
    assert train('r', tmp_path, max_steps=2)['steps'] == 2

def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path/'file'
    blocker.write_text('x')
    with pytest.raises(SpeederError, match='is a file'):
        train('r', blocker, max_steps=2)

def test_runs_go_next_to_the_data_dir(fresh_data):
    r = run_cli('train', *TINY_CLI, '--data-dir', str(fresh_data), '--name', 'beside', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])['run_dir'] == str(fresh_data.parent/'runs'/'beside')
    assert (fresh_data.parent/'runs'/'beside'/'metrics.json').exists()

# --- every input checked before work starts -------------------------------------------------------------------------

@pytest.mark.parametrize('args,says', [
    (['--batch-size', '0'], 'batch_size must be at least 1'),
    (['--set', 'lr=abc'], "lr must be a number, got 'abc'"),
    (['--max-steps', '-1'], 'max_steps must be at least 1'),
    (['--set', 'n_candidates=10'], 'n_candidates=10'),
    (['--set', 'lora_rank=4'], 'unknown SpeederConfig setting(s): lora_rank'),
    (['--eval-examples', '-3'], 'eval_examples must be at least 1'),
    (['--llm', '/typo/llm'], '/typo/llm does not exist'),
    (['--images', '/typo/images'], 'image folder /typo/images does not exist'),
    (['--max-steps', 'abc'], "invalid int value: 'abc'"),
    (['--no-such-flag'], 'unrecognized arguments: --no-such-flag')])
def test_bad_input_is_refused_before_any_work(fresh_data, args, says):
    "One line, exit 2, the JSON error as the last stdout line, nothing written: no run folder, no SASRec, no features."
    before = tree(fresh_data.parent)
    base = ['train', '--llm', STAND_IN, '--max-steps', '4', '--batch-size', '4']   # sequence features: SASRec would be needed
    r = run_cli(*base, '--data-dir', str(fresh_data), '--name', 'x', *args, '--json')
    one_line_error(r, says)
    assert tree(fresh_data.parent) == before
    assert not (fresh_data/'ml-100k'/'sasrec').exists() and 'SASRec' not in r.stderr

def test_evaluate_checks_its_numbers(finished_run):
    for n in ('-3', '0'):
        one_line_error(run_cli('evaluate', str(finished_run[0]), '--eval-examples', n, '--json'), 'at least 1')
    one_line_error(run_cli('evaluate', str(finished_run[0]), '--mode', 'vote', '--json'), "invalid choice: 'vote'")

def test_json_errors_for_usage_and_unknown_commands():
    for args, says in ((['nope', '--json'], "invalid choice: 'nope'"), (['--json'], 'the following arguments are required')):
        one_line_error(run_cli(*args), says)

def test_resume_needs_a_run(tmp_path):
    with pytest.raises(SpeederError, match='not a Speeder run folder'):
        exp.train_main(resume=tmp_path)
    r = run_cli('train', '--resume', str(tmp_path/'missing'), '--json')
    one_line_error(r, 'not a Speeder run folder')
    one_line_error(run_cli('train', '--resume', str(tmp_path), '--llm', 'tiny', '--json'), 'drop --dataset and --llm')

def test_llm_path_missing_or_not_causal(tmp_path):
    r = run_cli('train', '--llm', str(tmp_path/'nope'), '--runs-dir', str(tmp_path), '--json', '--max-steps', '2')
    one_line_error(r, str(tmp_path/'nope'))
    enc = tmp_path/'encoder'
    enc.mkdir()
    (enc/'config.json').write_text(json.dumps(dict(model_type='bert', architectures=['BertModel'])))
    (enc/'model.safetensors').write_bytes(b'')   # weights are there: what is refused is the kind of model
    r = run_cli('train', '--llm', str(enc), '--runs-dir', str(tmp_path), '--json', '--max-steps', '2')
    one_line_error(r, 'not a causal')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['encoder']

# --- the run folder -------------------------------------------------------------------------------------------------

def test_run_folder_contents(finished_run):
    run, res = finished_run
    assert {'config.json', 'metrics.json', 'history.json', 'modules.pt', 'lora', 'checkpoints', 'report.md', 'plots'} \
        <= {p.name for p in run.iterdir()}
    assert {'hr1', 'valid_ratio', 'vhr1', 'score_hr1'} <= set(res) and res['backbone_is_stand_in'] is True
    assert [s['stage'] for s in res['stages']] == ['joint'] and "MPO 'auto' without item images" in res['notes'][-1]
    assert not any((run/'lora').rglob('model.safetensors'))   # the frozen backbone is never saved
    assert runs.read_run_config(run).max_steps == 4            # config.json is the SpeederConfig
    ev = exp.evaluate_main(run, 'score', 20)
    assert ev['hr1'] == pytest.approx(res['score_hr1'])

def test_every_entry_point_opens_a_cli_run(tmp_path):
    r = run_cli('train', *TINY_CLI, '--runs-dir', str(tmp_path), '--name', 'cli', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    ev = run_cli('evaluate', str(tmp_path/'cli'), '--mode', 'score', '--eval-examples', '8', '--json')
    rec = run_cli('recommend', str(tmp_path/'cli'), '--user', '1', '--json')
    assert ev.returncode == 0 and rec.returncode == 0, (ev.stderr[-1000:], rec.stderr[-1000:])
    assert json.loads(ev.stdout.splitlines()[-1])['hr1'] == json.loads(r.stdout.splitlines()[-1])['score_hr1']
    model, ds, cfg = exp.load_trained(tmp_path/'cli')   # the Python API opens the same folder
    assert cfg.max_steps == 4 and model.is_stand_in

def test_unfinished_runs_are_not_opened(finished_run, tmp_path):
    run = tmp_path/'copy'
    shutil.copytree(finished_run[0], run)
    (run/'metrics.json').unlink()
    with pytest.raises(SpeederError, match='has not finished'):
        exp.load_trained(run)

def test_hidden_size_mismatch(finished_run, tmp_path):
    run = tmp_path/'copy'
    shutil.copytree(finished_run[0], run)
    mods = torch.load(run/'modules.pt', weights_only=True)
    w = mods['mrc']['output_adapter.3.weight']
    mods['mrc']['output_adapter.3.weight'] = torch.zeros(4096, w.shape[1])
    torch.save(mods, run/'modules.pt')
    with pytest.raises(SpeederError, match='hidden size 4096'):
        exp.evaluate_main(run, 'score', 5)

def test_recommend_unknown_user(finished_run):
    with pytest.raises(SpeederError, match="unknown user 'nobody'"):
        exp.recommend_main(finished_run[0], 'nobody')

# --- checkpoints and the finished marker -----------------------------------------------------------------------------

def disk_full(*a, **k):
    raise OSError(errno.ENOSPC, 'No space left on device')

@pytest.mark.parametrize('where', ['torch_save', 'peft_save', 'safetensors'])
def test_failed_checkpoint_write_keeps_previous(finished_run, monkeypatch, tmp_path, where):
    run = tmp_path/'copy'
    shutil.copytree(finished_run[0], run)
    before = (run/'checkpoints'/'latest.json').read_text()
    model, ds, cfg = exp.load_trained(run)
    if where == 'torch_save':
        monkeypatch.setattr(runs.torch, 'save', disk_full)
    elif where == 'peft_save':
        monkeypatch.setattr(type(model.llm), 'save_pretrained', disk_full)
    else:
        import peft.peft_model   # peft writes the adapter with safetensors' save_file
        def bad_file(*a, **k):
            raise RuntimeError('safetensors: I/O error: No space left on device (os error 28)')
        monkeypatch.setattr(peft.peft_model, 'safe_save_file', bad_file)
    with pytest.raises(SpeederError, match='No space left on device.*; the previous checkpoint is intact'):
        runs.save_checkpoint(model, run, 'step-000099', dict(stage=0, fit_state=None, stage_results=[], history=[], gates=[]))
    assert (run/'checkpoints'/'latest.json').read_text() == before
    assert runs.latest_checkpoint(run) is not None and not (run/'checkpoints'/'step-000099').exists()
    assert not [p for p in (run/'checkpoints').iterdir() if p.name.startswith('.')]   # no half-written folder

def test_failed_final_save_is_not_finished_and_resumes(tmp_path, monkeypatch):
    "A crash while the final results are written leaves a run without metrics.json that --resume finishes."
    def broken(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(exp, 'write_report', broken)
    with pytest.raises(SpeederError, match='its last checkpoint is intact: continue it with --resume'):
        train('crash', tmp_path, max_steps=4)
    assert not (tmp_path/'crash'/'metrics.json').exists()
    with pytest.raises(SpeederError, match='has not finished'):
        exp.load_trained(tmp_path/'crash')
    monkeypatch.undo()
    res = exp.train_main(resume=tmp_path/'crash')
    assert res['steps'] == 4 and (tmp_path/'crash'/'metrics.json').exists()
    assert (res['resumed_at'], res['steps_run']) == (4, 0)   # every step was done: it only finished the results

def test_resuming_a_crafted_checkpoint_executes_nothing(tmp_path):
    "A stranger's run folder whose state.pt unpickles into a command is refused, and the command never runs."
    try:
        train('stranger', tmp_path, max_steps=8, checkpoint_every=2, stop_after=3)
    except RunInterrupted:
        pass
    marker = tmp_path/'pwned'
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    ck = runs.latest_checkpoint(tmp_path/'stranger')
    torch.save(dict(fit=Payload()), ck/'state.pt')
    r = run_cli('train', '--resume', str(tmp_path/'stranger'), '--json')
    one_line_error(r, 'nothing in a run folder is ever executed')
    assert not marker.exists()

def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    "Kill a real `speeder train` process after its first mid-stage checkpoint, resume it, compare with a clean run."
    args = ['train', '--llm', 'tiny', '--runs-dir', str(tmp_path), '--max-steps', '40', '--batch-size', '4',
            '--train-examples', '48', '--eval-examples', '20', '--set', 'checkpoint_every=3', *TINY_SET[1:], '--json']
    clean = run_cli(*args, '--name', 'clean')
    assert clean.returncode == 0, clean.stderr
    proc = subprocess.Popen([sys.executable, '-c', 'from speeder.cli import main; main()', *args, '--name', 'killed'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, t0, appeared = tmp_path/'killed'/'checkpoints'/'latest.json', time.time(), False
    while time.time() - t0 < 300 and not appeared:
        appeared = latest.exists() and json.loads(latest.read_text())['checkpoint'].startswith('step-')
        if not appeared:
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert appeared, 'no mid-stage checkpoint appeared within 300 s: nothing to resume from'
    assert not (tmp_path/'killed'/'metrics.json').exists(), 'the run finished before it could be killed'
    resumed = run_cli('train', '--resume', str(tmp_path/'killed'), '--json')
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(clean.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    at = int(RESUMING.search(resumed.stderr).group(1))   # the checkpoint the log says it resumed from
    assert at > 0 and (b['resumed_at'], b['steps_run']) == (at, 40 - at)   # it ran the steps left, not all 40
    for k in ('hr1', 'valid_ratio', 'vhr1', 'score_hr1', 'score_ndcg5', 'steps'):
        assert a[k] == b[k], k

# --- ablations ----------------------------------------------------------------------------------------------------------

def test_ablate_table_and_plot(tmp_path):
    out = exp.ablate_main(variants=['speeder', 'no-ppl', 'drop-modality-0.5'], runs_dir=tmp_path, max_steps=2, **TINY)
    assert [r['variant'] for r in out['rows']] == ['speeder', 'no-ppl', 'drop-modality-0.5']
    assert Path(out['plot']).exists() and all(0 <= r['vhr1'] <= 1 for r in out['rows'])
    assert json.loads((tmp_path/'ablate-ml-100k-no-ppl'/'config.json').read_text())['use_ppl'] is False
    with pytest.raises(SpeederError, match='unknown ablation'):
        exp.ablate_main(variants=['nope'], runs_dir=tmp_path)
    with pytest.raises(SpeederError, match='already exists'):   # checked before the first variant trains
        exp.ablate_main(variants=['no-ppt', 'speeder'], runs_dir=tmp_path, max_steps=2, **TINY)
    assert not (tmp_path/'ablate-ml-100k-no-ppt').exists()

def test_switches_are_the_cli_flags(tmp_path):
    r = run_cli('train', *TINY_CLI, '--runs-dir', str(tmp_path), '--name', 'sw', '--no-ppl', '--no-mpo',
                '--skip-bad-images', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = runs.read_run_config(tmp_path/'sw')
    assert (cfg.use_ppl, cfg.mpo, cfg.skip_bad_images) == (False, 'off', True)
    assert [s['stage'] for s in json.loads(r.stdout.splitlines()[-1])['stages']] == ['joint']
