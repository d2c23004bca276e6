"""Layer 0 from the token id on a real trained model: the calibration built and verified the
table from vLLM's forward; the ruler's forward agrees."""

import torch

from vllm_seqkv import calibrate
from benchmarks.model import LlamaForward
from vllm_seqkv.codec.token_table import TokenTableCodec


def test_tiny_models_layer_0_is_its_token_table(tiny_model_dir):
    calibration = calibrate.load_for_model(tiny_model_dir, "seqkv-3")  # the preset with the table
    assert calibration.layer0_tokens, calibration.layer0_check
    assert "verified" in calibration.layer0_check
    model = LlamaForward(tiny_model_dir)
    tokens = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    _, kv = model.qkv(0, model.embed(tokens), torch.arange(300))
    key_codec, value_codec = calibration.codecs(0)
    for codec, exact in ((key_codec, kv.key_pre), (value_codec, kv.value)):
        assert isinstance(codec, TokenTableCodec)
        decoded = codec.decode(codec.encode(exact))
        # the table is bf16: what is left is bf16 rounding
        assert float((decoded - exact).norm() / exact.norm()) < 4e-3
