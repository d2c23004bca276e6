"""The offline fixtures are what they claim: the real SmolLM2, a held-out split, a trained tiny model."""

import json

import seqkv_fixtures as fixtures
from seqkv_fixtures import corpus, smollm2


def test_smollm2_is_the_verified_checkpoint(smollm2_dir):
    gguf = fixtures.home() / "downloads" / smollm2.GGUF_NAME
    assert smollm2.sha256_of(gguf) == fixtures.SMOLLM2_GGUF_SHA256
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["rope_theta"] == 100000.0


def test_split_is_deterministic_and_disjoint():
    assert corpus.split_of("library/os.rst.txt") == corpus.split_of("library/os.rst.txt")
    splits = {corpus.split_of(f"library/mod{i}.rst.txt") for i in range(200)}
    assert splits == {"train", "valid", "test"}
    train = fixtures.corpus_path("train").read_text()
    test = fixtures.corpus_path("test").read_text()
    assert len(test) > 500_000 and len(train) > 5 * len(test)
    assert test[10_000:10_400] not in train


def test_tiny_model_learned_something(tiny_model_dir):
    record = json.loads((tiny_model_dir / "training.json").read_text())
    assert record["test_ppl"] < record["unigram_test_ppl"] / 5


def test_prose_is_disjoint_english_narrative():
    from seqkv_fixtures import prose

    assert prose.split_of("emma/012") == prose.split_of("emma/012")
    texts = {s: fixtures.prose_path(s).read_text() for s in fixtures.SPLITS}
    assert len(texts["test"]) > 200_000 and len(texts["train"]) > 5 * len(texts["test"])
    train = {p for p in texts["train"].split("\n\n") if len(p) >= 200}
    for split in ("test", "valid"):
        long_paragraphs = [p for p in texts[split].split("\n\n") if len(p) >= 200]
        assert len(long_paragraphs) > 300
        assert not train.intersection(long_paragraphs), f"{split} shares a paragraph with train"
    for text in texts.values():
        assert "Project Gutenberg" not in text and "CHAPTER" not in text and "_" not in text
        words_and_spaces = sum(c.isalpha() or c.isspace() for c in text) / len(text)
        code_symbols = sum(text.count(c) for c in "{}<>=#|\\/`$@^~") / len(text)
        assert words_and_spaces > 0.94 and code_symbols < 1e-4
        assert sum(text.count(f" {w} ") for w in ("the", "and", "of", "to", "her")) > len(text) / 60
