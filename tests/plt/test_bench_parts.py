"""The library bench's measuring parts: coder bits and per-tier restore, on any bytes."""

import os

from benchmarks.plt import coder_figures, restore_figures
from vllm_seqkv.tiers.coders import ColdCodec, RawCodec
from vllm_seqkv.tiers import DiskTier, MemoryTier


def test_coder_figures_count_payload_bits_per_element_and_check_the_roundtrip():
    blocks = [os.urandom(64) for _ in range(3)]
    got = coder_figures(RawCodec(), blocks, elements=128)
    assert got["bits_per_element"] == 64 * 8 / 128 and got["bit_exact"]
    skewed = [bytes([0] * 60 + [1, 2, 3, 4]) for _ in range(3)]
    coded = coder_figures(ColdCodec.fit(skewed, 8), skewed, elements=128)
    assert coded["bit_exact"] and coded["bits_per_element"] < got["bits_per_element"]


def test_restore_figures_load_every_block_back_from_every_tier(tmp_path):
    blocks = [os.urandom(256) for _ in range(4)]
    got = restore_figures({"cpu": MemoryTier(RawCodec()), "disk": DiskTier(tmp_path, RawCodec())},
                          blocks, recompute_s=1.0)
    assert set(got) == {"cpu", "disk"}
    for fig in got.values():
        assert fig["bit_exact"] and fig["speedup_vs_recompute"] == 1.0 / fig["restore_s_per_block"]
