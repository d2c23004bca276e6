"""The ruler's chat suite, free-running generation, position buckets and decode cost, on the
tiny trained model, against hand-computed values."""

import math

import pytest
import torch

import seqkv_fixtures as fixtures
from benchmarks import chat
from benchmarks.forward import run_window
from benchmarks.generate import generate
from benchmarks.model import LlamaForward
from benchmarks.quality import PositionTally
from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import KVCodec, Packed, SlotLayout, TensorCodec

SETTINGS = chat.ChatSettings(max_new_tokens=12, samples=1, prompts=4)


class ExactCodec(TensorCodec):
    """Stores float32 as is: reading through it must change nothing."""

    def encode(self, x):
        return Packed({"x": x.float().clone()}, tuple(x.shape))

    def decode(self, packed):
        return packed.fields["x"]

    def bits_per_element(self, num_kv_heads, head_dim):
        return 32.0


class ZeroCodec(ExactCodec):
    def decode(self, packed):
        return torch.zeros(packed.shape)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return LlamaForward(tiny_model_dir)


@pytest.fixture(scope="module")
def state(model, tiny_model_dir):
    return chat.prepare(model, tiny_model_dir, SETTINGS)


def test_suite_has_the_promised_prompts():
    suite = chat.load_suite()
    assert len(suite) == 60
    assert sum(len(c["messages"]) == 1 for c in suite) == 48
    assert all(c["messages"][-1]["role"] == "user" for c in suite)
    assert {c["kind"] for c in suite} == {"knowledge", "code", "instruction", "summary"}
    # interleaved: the first few keep both kinds
    assert any(len(c["messages"]) > 1 for c in suite[:6])


def test_chat_format_uses_the_template(tiny_model_dir):
    fmt = chat.ChatFormat(tiny_model_dir)
    ids = fmt.prompt_ids([{"role": "user", "content": "Hello there"}])
    text = fmt.tokenizer.decode(ids.tolist())
    assert "Hello there" in text and text.rstrip().endswith("assistant|>")
    assert fmt.stop_ids


def test_generation_matches_step_by_step_decoding(model, state):
    """Batched incremental greedy decoding = re-running the whole sequence each step."""
    prompts = [p for _, p in state["prompts"][:2]]
    got = generate(model, prompts, None, 6)
    for prompt, tokens in zip(prompts, got):
        sequence, expected = prompt.clone(), []
        for _ in range(6):
            token = int(run_window(model, sequence).log_probs[-1].argmax())
            expected.append(token)
            sequence = torch.cat([sequence, torch.tensor([token])])
        assert tokens == expected


@pytest.mark.parametrize("name", ["fp8-e4m3", "kivi-2", "turbo-3"])
def test_coded_generation_follows_the_decode_path_rule(model, state, name):
    """A codec's greedy answer is the argmax of the teacher-forced run through the same codec
    (block codecs code a block when it completes, exact windows stay exact)."""
    codec = make_codec(name)
    prompts = [p for _, p in state["prompts"][:3]]
    for prompt, tokens in zip(prompts, generate(model, prompts, codec, 40)):
        sequence = torch.cat([prompt, torch.tensor(tokens)])
        log_probs = run_window(model, sequence[:-1], codec).log_probs[prompt.numel() - 1:]
        assert log_probs.argmax(-1).tolist() == tokens


def test_sampling_is_seeded(model, state):
    prompts = [p for _, p in state["prompts"][:2]]
    a = generate(model, prompts, None, 8, temperature=1.0, seeds=[1, 2])
    b = generate(model, prompts, None, 8, temperature=1.0, seeds=[1, 2])
    c = generate(model, prompts, None, 8, temperature=1.0, seeds=[3, 4])
    assert a == b and a != c


def test_an_exact_codec_costs_nothing(model, state):
    codec = KVCodec("exact", ExactCodec(), ExactCodec())
    pooled, by_mode = chat.teacher_forced(model, state["reference"], {"exact-codec": codec})
    assert pooled["exact-codec"].kl == pytest.approx(0.0, abs=1e-5)
    assert chat.delta_pct(pooled["exact-codec"], pooled["exact"])[0] == pytest.approx(0.0, abs=1e-4)
    own = chat.reference_answers(model, state["prompts"], SETTINGS, state["stop_ids"], codec)
    assert [a.tokens for a in own] == [a.tokens for a in state["reference"]]
    exact, free = chat.score_by_exact(model, state["reference"]), chat.score_by_exact(model, own)
    assert chat.ratio_se(free["greedy"], exact["greedy"])[0] == pytest.approx(1.0)
    greedy = [a.tokens for a in state["reference"] if a.mode == "greedy"]
    assert chat.agreement(greedy, [a.tokens for a in own if a.mode == "greedy"]) == 1.0


def test_zeroed_keys_do_large_damage(model, state):
    codec = KVCodec("zero-k", ZeroCodec(), ExactCodec())
    pooled, _ = chat.teacher_forced(model, state["reference"], {"zero-k": codec})
    assert chat.delta_pct(pooled["zero-k"], pooled["exact"])[0] > 10.0
    assert pooled["zero-k"].kl / pooled["zero-k"].tokens > 0.05
    own = chat.reference_answers(model, state["prompts"], SETTINGS, state["stop_ids"], codec)
    greedy = [a.tokens for a in state["reference"] if a.mode == "greedy"]
    assert chat.agreement(greedy, [a.tokens for a in own if a.mode == "greedy"]) < 1.0


def test_agreement_counts_until_the_first_divergence():
    assert chat.agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert chat.agreement([[1, 2], [5, 6, 7, 8]], [[1, 2], [6]]) == pytest.approx(0.5)


def test_position_buckets_by_hand():
    ref, got = PositionTally(), PositionTally()
    nll = torch.full((1100,), 1.0)
    ref.add(nll, torch.zeros(1100))
    worse = nll.clone()
    worse[:64] += math.log(1.5)  # ppl x1.5 in bucket 0-63 only
    got.add(worse, torch.full((1100,), 0.25))
    delta = got.delta_ppl_pct(ref)
    assert delta["0-63"] == pytest.approx(50.0, rel=1e-5)
    assert delta["64-255"] == pytest.approx(0.0, abs=1e-6) and delta["1024+"] == pytest.approx(0.0, abs=1e-6)
    assert got.count == {"0-63": 64, "64-255": 192, "256-1023": 768, "1024+": 76}
    assert got.kl()["256-1023"] == pytest.approx(0.25)


def _layout_bits(codec, layer, heads, dim):
    key, value = codec.codecs_for_layer(layer)
    return 8 * SlotLayout(key, value, heads, dim).slot_bytes / (2 * dim)


@pytest.fixture(scope="module")
def capture(tiny_model_dir):
    from vllm_seqkv import calibrate

    return calibrate.capture(tiny_model_dir, fixtures.corpus_path("train").read_text(), 1024)


@pytest.mark.parametrize("preset", ["seqkv-3", "seqkv-3-nox", "seqkv-f3"])
def test_decode_cost_follows_the_slot_layout(model, capture, preset):
    from vllm_seqkv.codec.presets import PRESETS

    codec = make_codec(preset, PRESETS[preset].fit(capture))
    cfg = model.config
    heads, dim, layers, context = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, 1024
    sink_share = codec.sink_tokens / context
    expected = []
    for layer in range(layers):
        key, value = codec.codecs_for_layer(layer)
        own = _layout_bits(codec, layer, heads, dim)
        if getattr(key, "table", None) is not None:  # token table: the index, then the row
            own = 32.0 / dim + 16.0
        if getattr(key, "predictor", None) is not None:  # the layer below, K and V in float32
            own += 64.0
        expected.append(own * (1 - sink_share) + 16.0 * sink_share)
    read = codec.decode_read_bits_per_element(heads, dim, context, layers)
    assert read == pytest.approx(sum(expected) / layers)
    transient = codec.transient_bytes_per_token(heads, dim, layers)
    if PRESETS[preset].cross_layer:
        assert transient == 2 * 2 * heads * dim * 4 and read > 10 * codec.bits_per_element(heads, dim, context, layers)
    else:
        assert transient == 0
    if PRESETS[preset].fusable:
        assert read == pytest.approx(codec.bits_per_element(heads, dim, context, layers))
