import json

import pytest

import seqkv_fixtures as fixtures
from benchmarks.__main__ import main
from benchmarks.quality import QualitySettings, evaluate

RECORD_KEYS = {"codec", "bits_per_element", "ppl", "ppl_ref", "delta_ppl_pct", "kl", "model", "text",
               "context", "date", "command"}


@pytest.fixture(scope="module")
def records(tiny_model_dir):
    settings = QualitySettings(
        model_dir=tiny_model_dir, text=fixtures.corpus_path("test"), calib_text=fixtures.corpus_path("train"),
        context=128, tokens=768, codecs=["bf16", "int8-token", "turbo-4", "int4-token", "turbo-2", "kivi-2"],
        calib_tokens=256, command="pytest")
    return {r["codec"]: r for r in evaluate(settings)}


def test_bf16_cache_is_lossless_for_perplexity(records):
    assert abs(records["bf16"]["delta_ppl_pct"]) < 0.5
    assert records["bf16"]["kl"] < 1e-3


def test_two_bit_codes_hurt_more_than_four_bit(records):
    four = min(records["turbo-4"]["delta_ppl_pct"], records["int4-token"]["delta_ppl_pct"])
    assert max(records["turbo-2"]["delta_ppl_pct"], records["kivi-2"]["delta_ppl_pct"]) > four
    assert records["turbo-2"]["kl"] > records["turbo-4"]["kl"] > records["int8-token"]["kl"]
    assert records["turbo-2"]["attn_rel_err_mean"] > records["turbo-4"]["attn_rel_err_mean"]


def test_records_carry_the_ruler_fields(records):
    for record in records.values():
        assert RECORD_KEYS <= set(record)
        assert record["ppl_ref"] == records["bf16"]["ppl_ref"]
        assert record["tokens"] == 6 * 128
        assert record["bytes_per_token"] == pytest.approx(record["bits_per_element"] * 2 * 4 * 2 * 32 / 8)
    # exact reference on a trained model: far below the unigram perplexity
    assert records["bf16"]["ppl_ref"] < 300


def test_cli_writes_json_plot_and_markdown(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Other\n\nkeep me\n")
    argv = ["quality", "--quick", "--tokens", "128", "--codecs", "bf16,turbo-3",
            "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"), "--markdown", str(markdown)]
    main(argv)
    records = json.loads((tmp_path / "q.json").read_text())
    suites = [(r["suite"], r["text"].split("/")[-2], r["codec"]) for r in records]
    assert suites == [("long", "pydocs", "bf16"), ("long", "pydocs", "turbo-3"),
                      ("long", "prose", "bf16"), ("long", "prose", "turbo-3"),
                      ("chat", "benchmarks", "bf16"), ("chat", "benchmarks", "turbo-3")]
    assert records[0]["command"].startswith("python -m benchmarks quality --quick")
    for r in records:
        assert r["decode_read_bits_per_element"] == pytest.approx(r["bits_per_element"])  # no dependencies
        assert r["transient_bytes_per_token"] == 0
    chat = {r["codec"]: r for r in records if r["suite"] == "chat"}
    assert chat["turbo-3"]["chat_kl"] > chat["bf16"]["chat_kl"] >= 0
    assert set(records[0]["delta_ppl_pct_by_position"]) == {"0-63", "64-255"}  # context 128
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "## Other\n\nkeep me" in text and "## Quality (ruler)" in text and "| turbo-3 |" in text
    assert "### Chat suite" in text and "### Side by side" in text
