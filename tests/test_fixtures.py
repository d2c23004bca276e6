"""The offline fixtures are what they claim: the real SmolLM2, a held-out split, a trained tiny model."""

import json

from vllm_seqkv import fixtures
from vllm_seqkv.fixtures import corpus, smollm2


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
