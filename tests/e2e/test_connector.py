"""The cold tier through a real vLLM engine: evicted prefixes come back from disk, not prefill.

One engine (tiny trained model, 12 KV blocks of 128 tokens) with a disk cold tier. A prompt
A of 600 tokens (4 full blocks) runs, five other prompts push its blocks out of vLLM's
prefix cache, then A runs again: the connector restores its 4 blocks (512 tokens) and the
greedy output equals the first run's. The engine also has approximate reuse on (a gate that
allows 2 substituted tokens): requests without the opt-in salt must not notice it.
"""

import contextlib
import os
import sys

import pytest
from transformers import AutoTokenizer

from tests.e2e.engines import seqkv_budget_for_blocks

pytestmark = pytest.mark.e2e

BLOCKS = 9  # vLLM blocks of pages (128 tokens): a few prompts fill them


@pytest.fixture(scope="module")
def ids(tiny_model_dir, test_text):
    return AutoTokenizer.from_pretrained(tiny_model_dir)(test_text[:300_000])["input_ids"]


@pytest.fixture(scope="module")
def cold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cold")


@pytest.fixture(scope="module")
def engine_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "engine.log"


@contextlib.contextmanager
def output_to(path):
    """Point fds 1 and 2 at ``path`` (engine processes started inside inherit them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@pytest.fixture(scope="module")
def gate(tiny_model_dir, tmp_path_factory):
    """A plumbing gate for the tiny model (made-up KLs): 2 substitutions within max_kl 0.005."""
    from vllm_seqkv.plt.approximate import QualityGate

    path = tmp_path_factory.mktemp("gate") / "gate.json"
    QualityGate(tiny_model_dir.name, {1: 0.001, 2: 0.002, 4: 1.0}).save(path)
    return path


@pytest.fixture(scope="module")
def llm(tiny_model_dir, cold_dir, engine_log, gate):
    from vllm import LLM

    cold = {"kind": "disk", "path": str(cold_dir), "capacity_bytes": 64 << 20,
            "approximate": {"gate": str(gate), "max_kl": 0.005}}
    with output_to(engine_log):  # the engine core and worker log there
        llm = LLM(model=str(tiny_model_dir), max_model_len=1024, seed=0, enforce_eager=True,
                  kv_cache_memory_bytes=seqkv_budget_for_blocks(tiny_model_dir, BLOCKS, max_model_len=1024),
                  additional_config={"kv_cache_backend": "seqkv", "seqkv": {"cold_tier": cold}})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def run(llm, prompt, salt=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    p = TokensPrompt(prompt_token_ids=prompt)
    if salt is not None:
        p["cache_salt"] = salt
    out = llm.generate([p], SamplingParams(max_tokens=16, temperature=0, logprobs=0), use_tqdm=False)[0]
    c = out.outputs[0]
    return out.num_cached_tokens, list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]


def flood(llm, ids, start):
    for i in range(5):
        cached, _, _ = run(llm, ids[start + 700 * i:start + 700 * i + 600])
        assert cached == 0


def test_evicted_prefix_is_restored_from_the_cold_tier(llm, ids, engine_log):
    assert "plt eviction" in engine_log.read_text()  # the default: the learned policy evicts
    a = ids[:600]
    cached, first, first_lp = run(llm, a)
    assert cached == 0
    flood(llm, ids, 1000)  # 5 x 5 blocks through 12: A's blocks leave vLLM's prefix cache
    cached, again, again_lp = run(llm, a)
    assert cached == 512  # 4 full blocks from the cold tier (the 5th is partial)
    assert again == first
    assert max(abs(x - y) for x, y in zip(first_lp, again_lp)) < 1e-3
    # another tenant (cache salt) never sees A's blocks
    cached, salted, _ = run(llm, a, salt="tenant-2")
    assert cached == 0 and salted == first


def test_corrupt_blob_is_recomputed_with_a_warning(llm, ids, cold_dir, engine_log):
    b = ids[5000:5600]
    _, first, _ = run(llm, b)
    flood(llm, ids, 6000)
    blobs = sorted(cold_dir.glob("*.blob"))
    assert blobs
    for path in blobs:  # flip one byte in every stored block (B's among them)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    log_start = engine_log.stat().st_size
    _, again, _ = run(llm, b)
    assert again == first
    # the next step runs after the failed load: B's blocks were recomputed, then re-saved
    cached, third, _ = run(llm, b)
    assert third == first
    log = engine_log.read_text()[log_start:]
    assert "is corrupt (checksum mismatch)" in log  # the tier's warning
    assert "missing or corrupt; vLLM recomputes from token 0" in log  # the connector's
    assert "Recovered from KV load failure" in log  # vLLM's


def substituted(tokens, positions):
    out = list(tokens)
    for p in positions:
        out[p] = (out[p] + 1) % 1000
    return out


def test_opted_in_request_reuses_its_tenants_near_duplicate_prefix(llm, ids, engine_log):
    a = ids[9000:9600]
    assert run(llm, a, salt="t1")[0] == 0
    flood(llm, ids, 10000)  # steps for A's saves to be stored and reported
    log_start = engine_log.stat().st_size
    b = substituted(a, [10, 300])  # blocks 0 and 2
    cached, out, _ = run(llm, b, salt="approx:t1")
    assert cached == 512 and len(out) == 16  # A's 4 blocks, although B differs in two of them
    assert "approximate reuse for request" in engine_log.read_text()[log_start:]
    assert run(llm, b, salt="t1")[0] == 0  # no opt-in: exact reuse only
    assert run(llm, b, salt="approx:t2")[0] == 0  # another tenant's blocks: never
    c = substituted(a, [11, 140, 301])  # a third substitution (block 2) is over the budget
    assert run(llm, c, salt="approx:t1")[0] == 256


def test_trie_edge_labels_from_vllm_prompt_logprobs_match_the_model(llm, ids, tiny_model_dir):
    import math

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_seqkv.plt.trie import PrefixTrie, edge_logprobs

    a = ids[12000:12300]
    out = llm.generate([TokensPrompt(prompt_token_ids=a)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lp = edge_logprobs(a, out.prompt_logprobs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=torch.tensor([a])).logits[0, :-1].float(), -1)
    ref = ref.gather(1, torch.tensor(a[1:])[:, None])[:, 0].numpy()
    # the default seqkv pages and bf16 against fp32: 0.072 measured with seqkv-f4 on the tiny
    # model (0.05 bound with seqkv-3); a label off by one position is off by nats
    assert abs(lp[1:] - ref).mean() < 0.15
    trie = PrefixTrie(block_size=128)
    trie.insert(a, "t", logprobs=lp)
    b = a[:200] + [(t + 1) % 1000 for t in a[200:]]
    assert trie.distance(a, b, "t") == pytest.approx(-lp[:200].sum() / math.log(2))
