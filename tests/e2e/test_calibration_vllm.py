"""Calibration through vLLM's engine: same statistics as the transformers oracle, one file per
model under concurrent fits, bad files refitted, bad text refused, first start calibrates."""

import os
import subprocess
import sys

import pytest
import torch

import seqkv_fixtures as fixtures
from vllm_seqkv import calibrate
from vllm_seqkv.codec.calibration import CalibrationError
from vllm_seqkv.codec.presets import PRESETS

pytestmark = pytest.mark.e2e
SMALL = 4096  # = calibrate.MIN_TOKENS: the cheapest fit the file path accepts


@pytest.fixture(scope="module")
def captures(tiny_model_dir):
    """The vLLM capture runs with the engine in its own process (as the CLI does: results
    cross the engine's RPC encoding) and the oracle in this one."""
    text = fixtures.corpus_path("train").read_text()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        ours = calibrate.capture(tiny_model_dir, text, 2048, layer0_table=True, dtype="float32",
                                 progress=False)
    oracle = calibrate.capture_transformers(tiny_model_dir, text, 2048)
    return ours, oracle


def _relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_vllm_capture_equals_the_transformers_oracle(captures):
    ours, oracle = captures
    assert ours.tokens == oracle.tokens == 2048 and ours.num_layers == oracle.num_layers
    assert torch.equal(ours.token_ids, oracle.token_ids)
    for layer in range(ours.num_layers):
        assert _relative(ours.keys[layer], oracle.keys[layer]) < 1e-4, layer
        assert _relative(ours.values[layer], oracle.values[layer]) < 1e-4, layer
    assert _relative(ours.query_sq, oracle.query_sq) < 1e-4
    assert _relative(ours.value_metric, oracle.value_metric) < 1e-5
    assert ours.layer0_table is not None and "verified" in ours.layer0_check
    for mine, theirs in zip(ours.layer0_table, oracle.layer0_table):
        assert _relative(mine, theirs) < 1e-4


@pytest.mark.parametrize("preset", ["seqkv-f4", "seqkv-3"])
def test_fits_from_either_capture_give_the_same_codec(captures, preset):
    ours, oracle = captures
    fitted = [PRESETS[preset].fit(c) for c in (ours, oracle)]
    # same bit budget per head; which component gets a bit may differ (the closed-loop fit
    # quantizes each layer's input, so rounding-level differences can flip a code), hence
    # the codecs are compared by their error below
    for name in ("k.bits", "v.bits"):
        assert torch.equal(fitted[0].tensors[name].sum(-1), fitted[1].tensors[name].sum(-1)), name
    assert fitted[0].layer0_tokens == fitted[1].layer0_tokens == (preset == "seqkv-3")
    for layer in range(1, ours.num_layers):  # layer 0 of seqkv-3 is the exact table
        for stream, x in ((0, oracle.keys[layer]), (1, oracle.values[layer])):
            errors = []
            for calibration in fitted:
                codec = calibration.codecs(layer)[stream]
                previous = None
                if calibration.cross_layer:
                    previous = (oracle.keys[layer - 1], oracle.values[layer - 1])
                y = codec.decode(codec.encode(x, previous), previous)
                errors.append(((y - x).pow(2).mean() / x.pow(2).mean()).item())
            assert abs(errors[0] - errors[1]) <= 0.05 * errors[1] + 1e-6, (layer, stream, errors)


def test_too_short_text_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("far too short a calibration text " * 20)
    with pytest.raises(CalibrationError, match="at least"):
        calibrate.ensure(tiny_model_dir, "seqkv-f4", short, cold_prior=False)
    written = [p for p in (tmp_path / "calibration").glob("*") if not p.name.endswith(".lock")]
    assert written == []


def test_a_corrupt_file_is_refitted_never_trusted(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(calibrate, "DEFAULT_TOKENS", SMALL)
    path = calibrate.default_path(tiny_model_dir, "seqkv-f4")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
    assert calibrate.ensure(tiny_model_dir, "seqkv-f4", cold_prior=False) == path
    assert "refitting it" in capsys.readouterr().err
    assert calibrate.load(path, "seqkv-f4").tokens == SMALL


_FIT = ("import sys; from vllm_seqkv import calibrate; calibrate.DEFAULT_TOKENS = {tokens}; "
        "print(calibrate.ensure(sys.argv[1], 'seqkv-f4', cold_prior=False))")


def test_concurrent_calibrations_write_one_valid_file(tiny_model_dir, tmp_path):
    env = {**os.environ, "SEQKV_HOME": str(tmp_path), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-c", _FIT.format(tokens=SMALL), str(tiny_model_dir)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    assert sum("fitting the seqkv-f4 calibration" in err for _, err in outs) == 1  # one fit
    files = sorted(p.name for p in (tmp_path / "calibration").iterdir() if not p.name.endswith(".lock"))
    assert files == [os.path.basename(paths.pop())]
    assert calibrate.load(tmp_path / "calibration" / files[0], "seqkv-f4").tokens == SMALL


def test_first_start_calibrates_then_serves(tiny_model_dir, tmp_path, monkeypatch):
    """An empty cache: ``LLM(..., kv_cache_backend="seqkv")`` fits the calibration in a
    subprocess (through vLLM), writes it to the cache, then serves with it."""
    from vllm import SamplingParams

    from tests.e2e.engines import engine

    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    path = calibrate.default_path(tiny_model_dir, calibrate.DEFAULT_PRESET)
    assert not path.exists()
    with engine(tiny_model_dir, "seqkv") as llm:
        assert calibrate.load(path, calibrate.DEFAULT_PRESET).tokens == calibrate.DEFAULT_TOKENS
        out = llm.generate(["The os module provides"], SamplingParams(max_tokens=8, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 8


def test_auto_calibrate_off_keeps_the_error(tiny_model_dir, tmp_path, monkeypatch):
    from vllm_seqkv.config import validate
    from vllm_seqkv.integration.first_start import ensure_calibrated

    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    config = validate({"kv_cache_backend": "seqkv", "auto_calibrate": False})
    assert ensure_calibrated(config, str(tiny_model_dir)) is None
    with pytest.raises(CalibrationError, match="python -m vllm_seqkv.calibrate"):
        calibrate.load_for_model(tiny_model_dir, config.preset)
    path = calibrate.default_path(tiny_model_dir, config.preset)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a calibration")
    with pytest.raises(CalibrationError, match="unreadable.*refit it with"):
        ensure_calibrated(config, str(tiny_model_dir))
    with pytest.raises(CalibrationError, match="no config.json"):
        ensure_calibrated(validate({"kv_cache_backend": "seqkv"}), str(tmp_path))
