"""KV pressure on the compressed cache: vLLM preempts and resumes requests (recompute);
greedy outputs equal those of an unpressured run, and nothing hangs (tiny trained model,
in-process, CPU).

The model runs in fp32 here: in bf16, greedy decoding meets exact logit ties (top-2 margin
0 at bf16 resolution), and the different batch shapes of a pressured schedule break such ties
differently -- measured on this model for `auto` too (1 of 8 continuations diverged at a tie
under the same pressure; seqkv: 5 of 8, every divergence at a tie, logprobs within one bf16
step before it). fp32 removes the ties, so any difference would be a real one (a block read
after it was freed or reused would change logprobs far beyond that)."""

import pytest
from transformers import AutoTokenizer

from tests.e2e.engines import engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMPTS = 8
PROMPT_TOKENS = 120  # one block of 128 each at admission
NEW_TOKENS = 150  # 270 tokens per request at the end: 3 blocks
PRESSURED_BLOCKS = 6  # the demand is 8 x 3 = 24 blocks: requests grow into each other


@pytest.fixture(scope="module")
def prompts(tiny_model_dir, test_text):
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(test_text[:100_000])["input_ids"]
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(PROMPTS)]


def generate(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_resume_with_the_same_greedy_output(tiny_model_dir, prompts):
    with engine(tiny_model_dir, "seqkv", dtype="float32") as roomy:
        assert roomy.llm_engine.vllm_config.cache_config.num_gpu_blocks >= 3 * PROMPTS
        expected = generate(roomy, prompts)
    with engine(tiny_model_dir, "seqkv", dtype="float32", num_gpu_blocks_override=PRESSURED_BLOCKS,
                disable_log_stats=False) as tight:
        cache = tight.llm_engine.vllm_config.cache_config
        assert cache.num_gpu_blocks == PRESSURED_BLOCKS
        assert PROMPTS * -(-(PROMPT_TOKENS + NEW_TOKENS) // cache.block_size) >= 4 * PRESSURED_BLOCKS
        got = generate(tight, prompts)
        preempted = preemptions(tight)
    assert preempted >= PROMPTS // 2, f"only {preempted} preemptions"
    assert all(len(tokens) == NEW_TOKENS for tokens, _ in got)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    worst = max(abs(a - b) for (_, la), (_, lb) in zip(got, expected) for a, b in zip(la, lb))
    assert worst < 0.01, worst
