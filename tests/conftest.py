import os

import pytest

from vllm_seqkv import fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def tiny_model_dir():
    return fixtures.tiny_model_dir()


@pytest.fixture(scope="session")
def smollm2_dir():
    return fixtures.smollm2_dir()


@pytest.fixture(scope="session")
def test_text():
    return fixtures.corpus_path("test").read_text()
