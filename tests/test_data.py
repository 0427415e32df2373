"Bad input and format tests for speeder.readers, speeder.data and `speeder data` (each error: one line, exit 2, nothing written)."
import gzip, json
import numpy as np, pytest
from speeder.cli import run_cli
from speeder.config import SpeederError
from speeder.data import prepare_dataset, sample_candidates, make_examples, write_amazon_fixture, load_processed
from speeder.readers import read_amazon, read_movielens

def _one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert 'error' in json.loads(r.stdout.strip().splitlines()[-1])

def test_unknown_dataset(tmp_path):
    _one_line_error(run_cli('data', 'netflix', '--json', '--data-dir', str(tmp_path)), 'unknown dataset', 'netflix')

def test_data_dir_missing(tmp_path):
    _one_line_error(run_cli('data', 'ml-100k', '--json', '--raw-dir', str(tmp_path/'nope')), 'does not exist')

def test_data_dir_empty(tmp_path):
    (tmp_path/'empty').mkdir()
    _one_line_error(run_cli('data', 'ml-100k', '--json', '--raw-dir', str(tmp_path/'empty')), 'is empty')
    _one_line_error(run_cli('data', 'amazon-toys', '--json', '--data-dir', str(tmp_path)), 'missing or empty')

def test_interactions_missing_column(tmp_path):
    d = tmp_path/'ml'
    d.mkdir()
    (d/'x.inter').write_text('user_id:token\titem_id:token\trating:float\n1\t2\t3\n')
    (d/'x.item').write_text('item_id:token\tmovie_title:token_seq\n2\tToy Story\n')
    _one_line_error(run_cli('data', 'ml-100k', '--json', '--raw-dir', str(d)), 'missing column', 'timestamp', 'x.inter')

def test_grouplens_wrong_columns(tmp_path):
    d = tmp_path/'ml'
    d.mkdir()
    (d/'u.data').write_text('1\t2\t3\t881250949\n1\t2\n')
    (d/'u.item').write_text('2|Toy Story (1995)|01-Jan-1995||url' + '|0' * 19 + '\n')
    with pytest.raises(SpeederError, match=r'u.data:2: expected 4'):
        read_movielens(d)

def test_amazon_meta_not_json_names_file_and_line(tmp_path):
    raw = write_amazon_fixture(tmp_path/'raw', '2023', n_users=6, n_items=10, per_user=5)
    with open(raw/'meta_Toys.jsonl', 'a') as f:
        f.write('{this is not json\n')
    r = run_cli('data', 'amazon-toys', '--json', '--data-dir', str(tmp_path/'data'), '--raw-dir', str(raw))
    _one_line_error(r, 'meta_Toys.jsonl:11', 'not a JSON object')
    assert not (tmp_path/'data'/'amazon-toys'/'processed').exists()   # nothing written

def test_amazon_review_missing_field(tmp_path):
    raw = write_amazon_fixture(tmp_path/'raw', '2018', n_users=6, n_items=10, per_user=5)
    with gzip.open(raw/'Toys_5.json.gz', 'at') as f:
        f.write(json.dumps({'asin': 'B00001', 'overall': 5}) + '\n')
    with pytest.raises(SpeederError, match=r'Toys_5.json.gz:31: review is missing user'):
        read_amazon(raw)

def test_image_folder_missing(tmp_path):
    raw = write_amazon_fixture(tmp_path/'raw', '2023', n_users=6, n_items=10, per_user=5)
    r = run_cli('data', 'amazon-toys', '--json', '--raw-dir', str(raw), '--images', str(tmp_path/'no-images'),
                '--data-dir', str(tmp_path/'data'))
    _one_line_error(r, 'image folder', 'does not exist')

def test_too_few_items_for_negatives():
    ex = make_examples([[1, 2, 3, 4, 5]], max_history=10)
    with pytest.raises(SpeederError, match='too few items to draw 19 negatives'):
        sample_candidates(ex['test'], [[1, 2, 3, 4, 5]], n_items=20, n_candidates=20)

@pytest.mark.parametrize('release', ['2014', '2018', '2023'])
def test_amazon_releases_end_to_end(tmp_path, release):
    raw, img = tmp_path/'raw', tmp_path/'img'
    write_amazon_fixture(raw, release, n_users=30, n_items=40, per_user=8, images=img)
    ds = prepare_dataset('amazon-toys', tmp_path/'data', raw_dir=raw, images=img)
    assert ds.info['kcore'] == 5 and ds.n_users == 30
    assert ds.test.candidates.shape == (30, 20) and ds.info['n_items_with_image'] == ds.n_items
    assert all(t in c for t, c in zip(ds.test.targets, ds.test.candidates))
    assert ds.items[1]['title'] and ds.items[1]['brand'].startswith('Brand')

def test_cache_reused_and_rebuilt_on_change(amazon):
    root, raw, img = amazon
    ds = prepare_dataset('amazon-toys', root, raw_dir=raw, images=img)
    info = ds.path/'info.json'
    t0 = info.stat().st_mtime_ns
    ds2 = prepare_dataset('amazon-toys', root, raw_dir=raw, images=img)
    assert info.stat().st_mtime_ns == t0 and np.array_equal(ds2.test.candidates, ds.test.candidates)
    ds3 = prepare_dataset('amazon-toys', root, raw_dir=raw, images=img, seed=1)   # a protocol change rebuilds
    assert ds3.info['seed'] == 1 and not np.array_equal(ds3.test.candidates, ds.test.candidates)

def test_error_does_not_overwrite_previous_processed(amazon):
    root, raw, img = amazon
    prepare_dataset('amazon-toys', root, raw_dir=raw, images=img)
    before = (root/'amazon-toys'/'processed'/'info.json').read_text()
    with open(raw/'meta_Toys.jsonl', 'a') as f:
        f.write('garbage\n')
    with pytest.raises(SpeederError):
        prepare_dataset('amazon-toys', root, raw_dir=raw, images=img)
    assert (root/'amazon-toys'/'processed'/'info.json').read_text() == before
    assert load_processed(root/'amazon-toys'/'processed').n_users == 30

def test_json_output_is_one_clean_line(amazon):
    root, raw, img = amazon
    r = run_cli('data', 'amazon-toys', '--json', '--data-dir', str(root), '--raw-dir', str(raw), '--images', str(img))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out['n_candidates'] == 20 and out['n_users'] == 30 and out['dataset'] == 'amazon-toys'

def test_raw_dir_with_unknown_files_is_refused(tmp_path):
    "No silent fallback to the packaged copy: the files looked for are named, and nothing is built."
    d = tmp_path/'mine'
    d.mkdir()
    (d/'ratings.csv').write_text('1,2,3\n')
    r = run_cli('data', 'ml-100k', '--json', '--raw-dir', str(d), '--data-dir', str(tmp_path/'data'))
    _one_line_error(r, 'holds no MovieLens files', 'u.data + u.item', '.inter', 'ratings.csv')
    assert not (tmp_path/'data').exists()

def test_corrupt_image_is_found_when_the_dataset_is_built(tmp_path):
    raw, img = tmp_path/'raw', tmp_path/'img'
    write_amazon_fixture(raw, '2023', n_users=30, n_items=40, per_user=8, images=img)
    (img/'B00005.png').write_bytes(b'not an image at all')
    args = ['data', 'amazon-toys', '--json', '--data-dir', str(tmp_path/'data'), '--raw-dir', str(raw), '--images', str(img)]
    _one_line_error(run_cli(*args), 'B00005.png', '--skip-bad-images')
    assert not (tmp_path/'data'/'amazon-toys'/'processed').exists()
    r = run_cli(*args, '--skip-bad-images')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['n_bad_images'] == 1 and res['n_items_with_image'] == res['n_items'] - 1
