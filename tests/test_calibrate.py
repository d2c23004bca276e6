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


def test_files_fitted_on_other_texts_are_kept(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQKV_HOME", str(tmp_path))
    general = calibrate.default_path(tiny_model_dir, "seqkv-3")
    mine = calibrate.default_path(tiny_model_dir, "seqkv-3", "my own domain text")
    assert general != mine and general.name.split("-")[-1] != mine.name.split("-")[-1]
    untagged = general.parent / general.name.replace("-" + general.name.split("-")[-1], ".safetensors")
    general.parent.mkdir(parents=True)
    for f in (general, mine, untagged):
        f.write_bytes(b"x")
    assert calibrate.prune_stale(tiny_model_dir) == [untagged]


def test_calibration_text_from_jsonl_chats_and_errors(tiny_model_dir, tmp_path):
    import pytest

    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi there"}, '
                     '{"role": "assistant", "content": "Hello!"}]}\n\n')
    text = calibrate.read_text(chats, tiny_model_dir)
    assert "Hi there" in text and "Hello!" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no messages"}\n')
    with pytest.raises(calibrate.CalibrationError, match="bad.jsonl:1"):
        calibrate.read_text(bad, tiny_model_dir)
    with pytest.raises(calibrate.CalibrationError, match="unreadable"):
        calibrate.read_text(tmp_path / "missing.txt")
    with pytest.raises(calibrate.CalibrationError, match="at least"):
        calibrate.capture(tiny_model_dir, "far too short a text", 8192)


def test_general_text_ships_with_the_package():
    text = calibrate.read_text()
    assert len(text) > 100_000 and "<|im_start|>" in text
