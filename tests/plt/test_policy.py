import pytest

from vllm_seqkv.plt.policy import CostModel, LRUPolicy, PLTPolicy, simulate
from vllm_seqkv.plt.traces import TraceConfig, generate


@pytest.fixture(scope="module")
def trace():
    return generate(TraceConfig(requests=300, seed=3))


def test_trace_has_reuse_and_tenants(trace):
    salts = {s for s, _ in trace}
    assert len(salts) == 2
    inf = simulate(trace, 10**9, LRUPolicy())
    assert inf.evictions == 0 and 0.2 < inf.hit_rate < 1.0


@pytest.mark.parametrize("policy", [LRUPolicy, PLTPolicy])
def test_capacity_respected_and_bounded_by_infinite_cache(trace, policy):
    inf = simulate(trace, 10**9, policy())
    res = simulate(trace, 300, policy())
    longest = max(len(t) for _, t in trace) // 16
    assert res.peak_blocks <= max(300, longest)
    assert res.evictions > 0
    assert 0 < res.hit_rate <= inf.hit_rate


def test_cost_model_prefers_deep_and_cheap_to_restore():
    c = CostModel()
    assert c.recompute_s(16, 4096) > c.recompute_s(16, 0) > 0
    fast, slow = CostModel(bandwidth=1e12), CostModel(bandwidth=1e6)
    assert fast.restore_s(1e6) < slow.restore_s(1e6)


def test_plt_policy_keeps_frequent_prefix_over_one_offs():
    # one hot system prompt reused between two long one-off prompts; the cache (45 blocks)
    # cannot hold the prompt (12) and both one-offs (40): LRU drops most of the prompt
    import numpy as np

    rng = np.random.default_rng(0)
    sys_p = rng.integers(0, 4000, 160).tolist()
    trace = []
    for i in range(40):
        trace.append(("t", sys_p + rng.integers(0, 4000, 32).tolist()))
        trace.append(("t", rng.integers(0, 4000, 320).tolist()))
        trace.append(("t", rng.integers(0, 4000, 320).tolist()))
    lru = simulate(trace, 45, LRUPolicy())
    plt = simulate(trace, 45, PLTPolicy())
    assert plt.hit_rate > lru.hit_rate
