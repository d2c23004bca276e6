"""`python -m vllm_seqkv.calibrate MODEL_DIR`: fit the predictive codec's calibration.

Runs the model (transformers, fp32, CPU) over calibration text (default: the train split,
never the test split), collects pre-RoPE K and Q and V moments per layer/head/channel and the
``o_proj`` column norms, and writes a checksummed file to :func:`default_path`.
The vLLM backend and the ruler both load it from there.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from vllm_seqkv import fixtures
from vllm_seqkv.codec.calibration import Calibration, CalibrationError, ChannelMoments


def default_path(model_dir: Path) -> Path:
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode())
    key.update((model_dir / "config.json").read_bytes())
    return fixtures.home() / "calibration" / f"{model_dir.name}-{key.hexdigest()[:12]}.safetensors"


def load_for_model(model_dir: Path) -> Calibration:
    path = default_path(model_dir)
    if not path.exists():
        raise CalibrationError(
            f"no seqkv calibration for {model_dir}: run `python -m vllm_seqkv.calibrate {model_dir}`"
        )
    return Calibration.load(path)


def calibrate(model_dir: Path, text: str, tokens: int = 8192, window: int = 512,
              weighted: bool = True) -> Calibration:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    cfg = model.config
    layers = model.model.layers
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv_heads
    keys = ChannelMoments.zeros(len(layers), kv_heads, head_dim)
    values = ChannelMoments.zeros(len(layers), kv_heads, head_dim)
    queries = ChannelMoments.zeros(len(layers), kv_heads, head_dim)

    attn_module = sys.modules[type(layers[0].self_attn).__module__]
    original_rope = attn_module.apply_rotary_pos_emb
    state = {"layer": 0}

    def capture_rope(q, k, *args, **kwargs):
        # Keys are coded pre-RoPE (KVCodec.pre_rope_keys): q, k here are [1, heads, T, D]
        # before rotation. q_pre·e_pre == q_post·e_post, so E[q_pre²] weighs key errors.
        layer = state["layer"]
        q_sq = q[0].transpose(0, 1).reshape(-1, kv_heads, group, head_dim).pow(2).mean(2)
        queries.add(layer, q_sq)
        keys.add(layer, k[0].transpose(0, 1))
        state["layer"] = layer + 1
        return original_rope(q, k, *args, **kwargs)

    def capture_value(layer):
        def hook(_module, _inputs, out):
            values.add(layer, out[0].view(-1, kv_heads, head_dim))
        return hook

    handles = [layer.self_attn.v_proj.register_forward_hook(capture_value(i))
               for i, layer in enumerate(layers)]
    ids = tok(text[: tokens * 8])["input_ids"][:tokens]
    attn_module.apply_rotary_pos_emb = capture_rope
    try:
        with torch.no_grad():
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window]).unsqueeze(0)
                state["layer"] = 0
                model(input_ids=chunk)
    finally:
        attn_module.apply_rotary_pos_emb = original_rope
        for h in handles:
            h.remove()

    key_sensitivity = queries.mean  # E[q²] averaged over the group's query heads
    value_sensitivity = torch.stack([
        layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
        .view(kv_heads, group, head_dim).sum(1)
        for layer in layers
    ])
    return Calibration.fit(str(Path(model_dir).name), keys, values, key_sensitivity,
                           value_sensitivity, weighted=weighted)


def ensure(model_dir: Path, tokens: int = 8192) -> Path:
    path = default_path(model_dir)
    if path.exists():
        try:
            Calibration.load(path)
            return path
        except CalibrationError:
            path.unlink()
    text = fixtures.corpus_path("train").read_text()
    calibrate(model_dir, text, tokens=tokens).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_seqkv.calibrate", description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    print(ensure(args.model, args.tokens))


if __name__ == "__main__":
    main()
