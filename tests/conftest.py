import os

import pytest

import seqkv_fixtures as fixtures

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


@pytest.fixture(scope="session")
def nox_calibration(tiny_model_dir, tmp_path_factory):
    """The tiny model's ``seqkv-3-nox`` calibration (no cross-layer prediction; ~10 s to fit)."""
    from vllm_seqkv import calibrate

    path = tmp_path_factory.mktemp("calibration") / "tiny-seqkv-3-nox.safetensors"
    calibrate.calibrate(tiny_model_dir, fixtures.corpus_path("train").read_text(),
                        "seqkv-3-nox").save(path)
    return path
