import pytest
from speeder.config import DEFAULT_DATASET
from speeder.data import prepare_dataset, write_amazon_fixture

@pytest.fixture(scope='session')
def ml100k():
    "ML-100k's processed folder in the default data folder, built from the packaged asset when missing: what runs train on."
    return prepare_dataset(DEFAULT_DATASET).path

@pytest.fixture
def amazon(tmp_path):
    "A tiny Amazon-2023 folder with item images; returns (root, raw_dir, images_dir)."
    raw, img = tmp_path/'raw', tmp_path/'img'
    write_amazon_fixture(raw, '2023', n_users=30, n_items=40, per_user=8, images=img)
    return tmp_path/'data', raw, img
