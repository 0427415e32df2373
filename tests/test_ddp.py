"""`speeder train` under torchrun (DDP, gloo on CPU): 2 processes x 4 examples give the losses of 1 process x 8,
only rank 0 writes and prints, and a killed torchrun run resumes to the same result."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
from speeder.config import STAND_IN, SpeederError, preset_settings
from speeder.experiments import train_main

pytestmark = pytest.mark.usefixtures('ml100k')   # the runs' dataset, built once per session (conftest.py)

# dropout off and PPT off (its position pairs are drawn per batch, so 2 x 4 would draw other pairs than 1 x 8), the
# spread and dense losses off (their means run over the batch's distinct items and its history positions with a next
# item, which 2 x 4 splits otherwise than 1 x 8): what is left differs between 1 and 2 processes only in the order of
# float additions
TINY = preset_settings(STAND_IN, valid_examples=10, dropout=0, lora_dropout=0, use_ppt=False, mpo='on', spread_weight=0,
                       dense_weight=0, curve_every=None)
SET = ['--set', *(f'{k}={json.dumps(v)}' for k, v in TINY.items() if k != 'llm')]
ARGS = ['train', '--llm', STAND_IN, '--max-steps', '12', '--train-examples', '48', '--eval-examples', '20',
        '--checkpoint-every', '3', '--json', *SET]
# float32 losses of ~30 whose sums run in another order: observed relative differences are ~1e-7 (1 ulp); 1e-5 leaves
# 100x room for the drift a few more ulps per step can build, and is far below what a real bug moves (a wrong data
# slice or gradients summed instead of averaged change the loss by >1e-2 from the second step on)
RTOL = 1e-5

def _launcher(folder:Path)->Path:
    "What the `speeder` console script runs, as a file torchrun can start."
    f = folder/'speeder_main.py'
    f.write_text('from speeder.cli import main\nmain()\n')
    return f

def one_process(folder:Path, *args:str)->subprocess.CompletedProcess:
    "`speeder ARGS` in a plain process, one thread like each torchrun worker (two on shared cores can run 5x slower)."
    return subprocess.run([sys.executable, str(_launcher(folder)), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))

def torchrun_cmd(folder:Path, *args:str, n:int=2)->list:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n), str(_launcher(folder)), *args]

def torchrun(folder:Path, *args:str, n:int=2)->subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(folder, *args, n=n), capture_output=True, text=True, timeout=300)

def last_json(r:subprocess.CompletedProcess)->dict:
    return json.loads(r.stdout.splitlines()[-1])

def history(run:Path)->list:
    "The loss history without the timings."
    return [{k: v for k, v in r.items() if k not in ('seconds', 'examples_per_s', 'step_s')}
            for r in json.loads((run/'history.json').read_text())['history']]

def assert_same_losses(ha:list, hb:list):
    "Step by step: the same stage, step and learning rate, and LM loss and gradient norm within `RTOL`."
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        assert (ra['stage'], ra['step'], ra['lr']) == (rb['stage'], rb['step'], rb['lr'])
        for k in ('lm_loss', 'grad_norm'):
            assert rb[k] == pytest.approx(ra[k], rel=RTOL), (ra['stage'], ra['step'], k)

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One run in 1 process with batch 8, one under torchrun with 2 processes x batch 4 (the same global batch)."
    d = tmp_path_factory.mktemp('ddp')
    one = one_process(d, *ARGS, '--runs-dir', str(d), '--name', 'one', '--batch-size', '8')
    two = torchrun(d, *ARGS, '--runs-dir', str(d), '--name', 'two', '--batch-size', '4')
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return d, one, two

def test_two_processes_match_one(runs):
    "2 processes x 4 examples (DDP) train like 1 process x 8, step by step, to the same final loss."
    d, one, two = runs
    a, b = last_json(one), last_json(two)
    assert (a['world_size'], b['world_size']) == (1, 2) and a['steps'] == b['steps'] == 12 and a['n_test'] == b['n_test'] == 20
    ha, hb = history(d/'one'), history(d/'two')
    assert_same_losses(ha, hb)
    print(f"final LM loss: 1 process {ha[-1]['lm_loss']:.8f}, 2 processes {hb[-1]['lm_loss']:.8f}")

def test_gradient_accumulation_matches_one(runs):
    "2 processes x 2 examples x 2 accumulation steps (DDP's no_sync on the first): still the global batch of 8."
    d, one, _ = runs
    acc = torchrun(d, *ARGS, 'grad_accum=2', '--runs-dir', str(d), '--name', 'acc', '--batch-size', '2')   # ARGS ends in --set
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert_same_losses(history(d/'one'), history(d/'acc'))

def test_rank_zero_alone_prints_and_writes(runs):
    d, _, two = runs
    assert [l for l in two.stdout.splitlines() if l.strip()] == [two.stdout.splitlines()[-1]]   # one JSON line, from rank 0
    ck = d/'two'/'checkpoints'
    assert sorted(p.name for p in ck.iterdir()) == ['latest.json', 'stage-0-text', 'stage-1-joint']   # no racing leftovers
    assert json.loads((ck/'stage-1-joint'/'state.json').read_text())['world_size'] == 2
    assert two.stderr.count('MPO stage 1/2') == 1   # logs from rank 0 only (mpo=on: two stages, as find_unused needs)

def _children(pid:int)->list[int]:
    "Process ids whose parent is `pid` (torchrun starts each worker in a session of its own)."
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out

@pytest.mark.skipif(not Path('/proc').exists(), reason='needs /proc to find the worker processes')
def test_sigkilled_torchrun_run_resumes(runs):
    "SIGKILL both workers after the first mid-stage checkpoint; resuming under torchrun gives the uninterrupted run."
    d, _, two = runs
    proc = subprocess.Popen(torchrun_cmd(d, *ARGS, '--runs-dir', str(d), '--name', 'killed', '--batch-size', '4'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, t0, appeared = d/'killed'/'checkpoints'/'latest.json', time.time(), False
    try:
        while time.time() - t0 < 300 and not appeared:
            appeared = latest.exists() and json.loads(latest.read_text())['checkpoint'].startswith('step-')
            if not appeared:
                time.sleep(0.02)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert appeared, 'no mid-stage checkpoint appeared within 300 s: nothing to resume from'
    assert not (d/'killed'/'metrics.json').exists(), 'the run finished before it could be killed'
    with pytest.raises(SpeederError, match='resume it with torchrun --nproc_per_node 2'):   # 1 process cannot continue it
        train_main(resume=d/'killed')
    resumed = torchrun(d, 'train', '--resume', str(d/'killed'), '--json')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = last_json(two), last_json(resumed)
    at = int(re.search(r'resuming \S+ from checkpoint step-(\d{6})', resumed.stderr).group(1))   # what the log says
    assert at > 0 and (b['resumed_at'], b['steps_run']) == (at, 12 - at)   # it ran the steps left, not all 12
    for k in ('hr1', 'valid_ratio', 'vhr1', 'score_hr1', 'score_ndcg5', 'steps', 'world_size'):
        assert a[k] == b[k], k
    assert history(d/'killed') == history(d/'two')   # every loss, learning rate and gradient norm, step by step
