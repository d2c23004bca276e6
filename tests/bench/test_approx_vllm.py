"""The served approximate-reuse bench's comparison of two runs' tail log-probabilities."""

import math

import pytest

from benchmarks.approx_vllm import compare, markdown


def dist(*probs):
    return {t: math.log(p) for t, p in enumerate(probs)}


def test_identical_runs_compare_as_equal():
    runs = [dist(0.5, 0.3, 0.2), dist(0.1, 0.8, 0.1)]
    got = compare(runs, runs, [0, 1], top=2)
    assert got == {"kl_top": pytest.approx(0.0, abs=1e-12), "dnll": pytest.approx(0.0, abs=1e-12),
                   "top1_agreement": 1.0}


def test_kl_counts_the_top_tokens_and_the_rest_and_dnll_the_true_tokens():
    exact, approx = [dist(0.6, 0.3, 0.1)], [dist(0.3, 0.6, 0.1)]
    got = compare(exact, approx, [0], top=2)
    want = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6)  # the rest (0.1) agrees
    assert got["kl_top"] == pytest.approx(want)
    assert got["dnll"] == pytest.approx(math.log(0.6 / 0.3))
    assert got["top1_agreement"] == 0.0
    # a top token the approximate run did not return gets its lowest returned probability
    got = compare([dist(0.6, 0.3)], [{1: math.log(0.9), 2: math.log(0.05)}], [1], top=2)
    assert got["kl_top"] == pytest.approx(0.6 * math.log(0.6 / 0.05) + 0.3 * math.log(0.3 / 0.9)
                                          + 0.1 * math.log(0.1 / 0.05))


def test_markdown_has_one_row_per_k_with_its_gate():
    res = {"command": "c", "machine": "m", "date": "d", "model": "x", "context": 1024, "tail": 128,
           "top": 20, "by_substitutions": [
               {"substitutions": k, "windows": 4, "cached_tokens": 1024.0, "kl_top_nats_per_token": 0.01,
                "kl_top_max_window": 0.02, "delta_ppl_pct": 0.5, "top1_agreement": 0.95,
                "ttft_speedup": 2.5} for k in (1, 2)]}
    text = markdown(res, {"1": 0.005}, codec_kl=0.012)
    assert "| 1 | 1024 | 0.0100 / 0.0200 | 0.0050 | +0.50 | 0.950 | 2.5x |" in text
    assert "| 2 | 1024 | 0.0100 / 0.0200 | — |" in text
    assert "the KL is 2.0-2.0x the fp32 gate's" in text
    assert "allows **2** substituted token(s), the fp32 gate 1" in text
    costed = markdown({**res, "prefill_time_with_prompt_logprobs_over_without": 1.3}, {})
    assert "took **1.30x** the time of a plain one" in costed
    assert "the time of a plain one" not in text
