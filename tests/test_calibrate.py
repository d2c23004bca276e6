"""Calibration files on disk: one current name per model and preset, stale ones pruned."""

from vllm_seqkv import calibrate


def test_prune_removes_only_this_models_stale_files(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    current = calibrate.default_path(tiny_model_dir, "seqkv-2")
    current.parent.mkdir(parents=True)
    stale = current.parent / current.name.replace("-seqkv-2-", "-seqkv-2-8192t-old-")
    other_model = current.parent / ("other" + current.name)
    in_progress = current.with_suffix(".tmp")
    for f in (current, stale, other_model, in_progress):
        f.write_bytes(b"x")
    assert calibrate.prune_stale(tiny_model_dir) == [stale]
    assert current.exists() and other_model.exists() and in_progress.exists()
    assert not stale.exists()
