"""The ruler's forward (benchmarks/model.py) computes what vLLM's engine computes.

One float32 vLLM CPU engine per model (exact cache, eager, no prefix caching) runs a prompt
with the calibration's own capture hooks installed (``integration/capture.py``: pre-RoPE keys
after any k norm as ``rotary_emb`` receives them, values as ``Attention`` receives them) and
returns vLLM's prompt logprobs. The ruler's per-layer ``key_pre`` / ``value`` and its
log-probabilities of the same prompt must equal them to float32 rounding:

* ``rope-llama3``: the trained tiny Llama under llama3 RoPE scaling; the prompt runs past the
  original 512 positions, and keys above layer 0 depend on the RoPE table through attention;
* ``gemma3``: Gemma-3 (random weights): q/k norm, ``(1 + w)`` norms, embedding scale
  ``sqrt(hidden)``, sandwich norms, per-layer-type RoPE bases, and its interleaved
  local/global layers: the prompt runs to 4x the 64-token sliding window of its local layers;
* ``mistral``: the trained tiny Llama as a Mistral, a 64-token window on every layer, the
  prompt 4x the window;
* ``rope-partial``: the trained tiny Llama rotating half of each head (vLLM's
  ``partial_rotary_factor``): the capture and the ruler both hand keys over in the channel
  order of :func:`vllm_seqkv.codec.rope.channel_order`, and the logprobs show the ruler
  rotates the channels vLLM rotates.

Dropping the RoPE type, the embedding scale or the sliding window from the ruler (or moving
the window by one position) moves these by far more than the tolerances (checked when the
test was written).
"""

import functools

import pytest
import torch

import seqkv_fixtures as fixtures
from benchmarks.forward import run_window
from benchmarks.model import LlamaForward
from seqkv_fixtures import architectures

pytestmark = pytest.mark.e2e
CASES = {"rope-llama3": 600, "gemma3": 4 * 64, "mistral": 4 * architectures.MISTRAL_WINDOW,
         "rope-partial": 256}  # prompt tokens
KV_RELATIVE = 1e-5  # ||ruler - vLLM|| / ||vLLM|| per layer, float32 on both sides
LOGPROB_ABS = 2e-4  # nats, per prompt token


def _prompt(model_dir, length: int) -> list[int]:
    from transformers import AutoTokenizer

    text = fixtures.corpus_path("test").read_text()[:20 * length]
    return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"][:length]


def _vllm_forward(model_dir, ids: list[int]) -> tuple[dict, list[float]]:
    """vLLM's captured K/V ``{"keys", "values"}: per layer [T, H_kv, D]`` and prompt logprobs."""
    from tests.e2e.engines import engine, prompt_logprobs
    from vllm_seqkv.integration import capture

    with engine(model_dir, "auto", dtype="float32", enable_prefix_caching=False,
                max_model_len=1024, kv_cache_dtype="auto") as llm:
        llm.apply_model(functools.partial(capture.worker_start, store_dtype="float32"))
        logprobs = prompt_logprobs(llm, ids)[0]
        captured = llm.apply_model(capture.worker_drain)[0]
        llm.apply_model(capture.worker_finish)
    assert captured["ids"].tolist() == ids, "the engine ran the prompt in another shape than one prefill"
    return captured, logprobs


@pytest.mark.parametrize("name", list(CASES))
def test_ruler_forward_equals_vllms(name, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model's callables
    model_dir = architectures.build(name)
    ids = _prompt(model_dir, CASES[name])
    assert len(ids) == CASES[name]
    captured, vllm_logprobs = _vllm_forward(model_dir, ids)
    ruler = run_window(LlamaForward(model_dir), torch.tensor(ids), collect_kv=True)
    worst = 0.0
    for layer, kv in enumerate(ruler.kv):
        for what, mine, theirs in (("keys", kv.key_pre, captured["keys"][layer]),
                                   ("values", kv.value, captured["values"][layer])):
            assert mine.shape == theirs.shape, (layer, what)
            error = float((mine - theirs.float()).norm() / theirs.float().norm())
            assert error < KV_RELATIVE, f"layer {layer} {what}: ruler vs vLLM relative error {error:.2e}"
            worst = max(worst, error)
    mine = ruler.log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    gap = float((mine - torch.tensor(vllm_logprobs)).abs().max())
    print(f"{name}: K/V relative error <= {worst:.1e}, prompt logprobs within {gap:.1e} nats")  # pytest -s
    assert gap < LOGPROB_ABS, f"prompt logprobs: ruler vs vLLM differ by up to {gap:.2e} nats"
