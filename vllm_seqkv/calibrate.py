"""`python -m vllm_seqkv.calibrate MODEL_DIR [--text FILE]`: fit the codec's calibration.

Runs the calibration text (default: the general-domain set shipped with the package,
``vllm_seqkv/data/general_calibration.txt``: prose, ChatML dialogue, code, some non-English;
``--text`` takes a plain text file or JSONL of chats ``{"messages": [...]}`` rendered with
the model's chat template) through vLLM's own engine (:mod:`vllm_seqkv.integration.capture`:
its device, dtype and tensor-parallel layout, exact cache), which captures pre-RoPE K, V and
query second moments per layer and head plus ``o_proj``; fits the preset (``--preset``,
default seqkv-f4) and writes a checksummed file atomically to :func:`default_path`, under a
file lock (concurrent runs wait and reuse it). ``vllm serve ... --kv-cache-backend seqkv``
runs this module in a subprocess at first start when the file is missing
(:mod:`vllm_seqkv.integration.first_start`). The vLLM backend and the ruler load it from
there. For transform presets it then fits the cold tier's code-level coder on the hot codes
of 4,096 tokens of the general calibration text (a transformers forward;
:func:`cold_prior_path`; ``--no-cold-prior`` skips it), which the cold-tier connector uses.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

from vllm_seqkv import paths
from vllm_seqkv.codec.calibration import Calibration, CalibrationError, Capture, TransformCalibration
from vllm_seqkv.codec.token_table import verify


from vllm_seqkv.codec.presets import DEFAULT_PRESET  # noqa: E402  (re-exported)
LAYER0_TOLERANCE = 1e-3  # fp32 forward of the same weights: only rounding differs
DEFAULT_TOKENS = 24576  # validation split, seqkv-3: +1.07 % at 8192 tokens, +0.86 % at 24576
MIN_TOKENS = 4096  # below this the per-component quantizers are fitted on too few samples
COLD_PRIOR_TOKENS = 4096  # SmolLM2: 2.45 bits/element at 4k tokens, 2.44 at 16k


GENERAL_TEXT = Path(__file__).with_name("data") / "general_calibration.txt"


def read_text(path: Path | None = None, model_dir: Path | None = None) -> str:
    """Calibration text: ``path`` (plain text, or ``.jsonl`` of ``{"messages": [...]}`` chats
    rendered with ``model_dir``'s chat template), default the shipped general set."""
    path = Path(path) if path is not None else GENERAL_TEXT
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration text {path} is unreadable: {exc}") from None
    if path.suffix != ".jsonl":
        return raw
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if model_dir is not None else None
    chats = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise CalibrationError(f"{path}:{number}: not a JSON object with 'messages'") from None
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            chats.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages))
    return "\n".join(chats)


def text_tag(text: str) -> str:
    """Short content hash naming a calibration by the text it was fitted on."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_path(model_dir: Path, preset: str = DEFAULT_PRESET, text: str | None = None) -> Path:
    """Where the calibration of ``preset`` for ``model_dir`` lives (rotation presets share one),
    fitted on ``DEFAULT_TOKENS`` tokens of ``text`` (default: the general set); the text's
    hash is in the name, so a file fitted on other text is never taken for it."""
    from vllm_seqkv.codec.presets import PRESETS

    spec = PRESETS[preset]
    kind = spec.calibration_name if spec.calibration_kind == "transform" else "channel"
    tag = text_tag(text if text is not None else read_text())
    return paths.home() / "calibration" / f"{_model_key(model_dir)}-{kind}-{DEFAULT_TOKENS}t-{tag}.safetensors"


def cold_prior_path(model_dir: Path, preset: str = DEFAULT_PRESET,
                    calibration: str | None = None) -> Path:
    """The cold tier's code-level coder prior, next to (and fitted after) the calibration
    (``calibration``: an explicit calibration file instead of the default one)."""
    return (Path(calibration) if calibration else default_path(model_dir, preset)).with_suffix(
        ".cold-prior.npz")


def _model_key(model_dir: Path) -> str:
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode())
    key.update((model_dir / "config.json").read_bytes())
    return f"{model_dir.name}-{key.hexdigest()[:12]}"


def prune_stale(model_dir: Path) -> list[Path]:
    """Delete this model's calibration files that no preset maps to any more (older
    names, other token counts); files fitted on other texts (another hash) are kept. Returns
    what was deleted. NOTE: ``.tmp`` files are left alone: another process may be writing one."""
    from vllm_seqkv.codec.presets import PRESETS

    tag = text_tag(read_text())
    prefixes = {default_path(model_dir, name).name.removesuffix(f"-{tag}.safetensors") + "-"
                for name, p in PRESETS.items() if p.calibration_kind != "none"}
    folder = paths.home() / "calibration"

    def current(f: Path) -> bool:
        rest = next((f.name[len(p):] for p in prefixes if f.name.startswith(p)), None)
        return rest is not None and len(rest.split(".")[0]) == 8 and rest.split(".", 1)[1] in (
            "safetensors", "cold-prior.npz")

    stale = [f for f in folder.glob(_model_key(model_dir) + "-*")
             if not current(f) and f.suffix in (".safetensors", ".npz")]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def load(path: Path, preset: str):
    """The calibration file of ``preset`` at ``path`` (raises :class:`CalibrationError`)."""
    from vllm_seqkv.codec.presets import PRESETS

    if PRESETS[preset].calibration_kind == "transform":
        return TransformCalibration.load(path, PRESETS[preset].calibration_name)
    return Calibration.load(path)


def load_for_model(model_dir: Path, preset: str = DEFAULT_PRESET):
    path = default_path(model_dir, preset)
    if not path.exists():
        raise CalibrationError(
            f"no seqkv calibration of preset {preset} for {model_dir}: run "
            f"`python -m vllm_seqkv.calibrate {model_dir} --preset {preset}`"
        )
    return load(path, preset)


def codec_for_model(model_dir: Path, preset: str = DEFAULT_PRESET):
    """``preset``'s KV codec with the model's calibration (CalibrationError if never fitted)."""
    from vllm_seqkv.codec import make_codec, needs_calibration

    return make_codec(preset, load_for_model(model_dir, preset) if needs_calibration(preset) else None)


def calibration_ids(model_dir: Path, text: str, tokens: int = DEFAULT_TOKENS) -> list[int]:
    """The first ``tokens`` token ids of ``text`` (raises :class:`CalibrationError` below
    ``min(tokens, MIN_TOKENS)``: too few samples for the per-component quantizers)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read the tokenizer of {model_dir}: {exc}") from None
    ids = tok(text[: tokens * 8])["input_ids"][:tokens]
    if len(ids) < min(tokens, MIN_TOKENS):
        raise CalibrationError(f"the calibration text has {len(ids)} tokens; the fit needs at least "
                               f"{min(tokens, MIN_TOKENS)} (asked for {tokens})")
    if len(ids) < tokens:
        print(f"[seqkv] calibration text has {len(ids)} tokens, fewer than the {tokens} asked for",
              file=sys.stderr)
    return ids


def needs_layer0_table(preset: str) -> bool:
    """Does ``preset``'s fit use the layer-0 token table (a forward of the whole vocabulary)?"""
    from vllm_seqkv.codec.presets import PRESETS

    return bool(getattr(PRESETS[preset], "layer0_tokens", False))


def default_dtype() -> str:
    """The capture's model dtype: float32 on CPU (cheap, and what the fit was designed on),
    the serving dtype (vLLM's ``auto``) on accelerators."""
    from vllm_seqkv.integration import compat

    return "float32" if compat.is_cpu() else "auto"


def capture(model_dir: Path, text: str, tokens: int = DEFAULT_TOKENS, window: int = 512, *,
            layer0_table: bool = True, dtype: str | None = None, tensor_parallel_size: int = 1,
            progress: bool = True) -> Capture:
    """Pre-RoPE K, V and query statistics of the model over ``tokens`` of ``text``, captured
    inside a vLLM engine (:mod:`vllm_seqkv.integration.capture`; ``dtype`` default
    :func:`default_dtype`). ``layer0_table``: also the layer-0 token table (see
    :func:`needs_layer0_table`)."""
    from vllm_seqkv.integration import capture as vllm_capture

    ids = calibration_ids(model_dir, text, tokens)
    return vllm_capture.capture(model_dir, ids, window=window, dtype=dtype or default_dtype(),
                                layer0_table=layer0_table, tensor_parallel_size=tensor_parallel_size,
                                layer0_tolerance=LAYER0_TOLERANCE, progress=progress)


def capture_transformers(model_dir: Path, text: str, tokens: int = DEFAULT_TOKENS,
                         window: int = 512) -> Capture:
    """TEST ORACLE ONLY: the same statistics by a transformers fp32 forward of the whole
    model (patched ``apply_rotary_pos_emb``, ``v_proj`` hooks); the tests compare
    :func:`capture` against it."""
    from transformers import AutoModelForCausalLM

    ids = calibration_ids(model_dir, text, tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    layers = model.model.layers
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv_heads
    keys = [[] for _ in layers]
    values = [[] for _ in layers]
    query_sq = torch.zeros(len(layers), kv_heads, head_dim, dtype=torch.float64)

    attn_module = sys.modules[type(layers[0].self_attn).__module__]
    original_rope = attn_module.apply_rotary_pos_emb
    state = {"layer": 0}

    def capture_rope(q, k, *args, **kwargs):
        # q, k here are [1, heads, T, D] before rotation (keys are coded pre-RoPE).
        layer = state["layer"]
        q_sq = q[0].transpose(0, 1).reshape(-1, kv_heads, group, head_dim).double().pow(2).mean(2)
        query_sq[layer] += q_sq.sum(0)
        keys[layer].append(k[0].transpose(0, 1).detach().clone())
        state["layer"] = layer + 1
        return original_rope(q, k, *args, **kwargs)

    def capture_value(layer):
        def hook(_module, _inputs, out):
            values[layer].append(out[0].view(-1, kv_heads, head_dim).detach().clone())
        return hook

    handles = [layer.self_attn.v_proj.register_forward_hook(capture_value(i))
               for i, layer in enumerate(layers)]
    attn_module.apply_rotary_pos_emb = capture_rope
    try:
        with torch.no_grad():
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window]).unsqueeze(0)
                state["layer"] = 0
                model(input_ids=chunk)
        for h in handles:
            h.remove()
        handles = []
        table = _layer0_table(model, attn_module, kv_heads, head_dim)
    finally:
        attn_module.apply_rotary_pos_emb = original_rope
        for h in handles:
            h.remove()
    keys, values = [torch.cat(k) for k in keys], [torch.cat(v) for v in values]
    count = keys[0].shape[0]
    token_ids = torch.tensor(ids[:count])
    verified, check = verify(table, token_ids, keys[0], values[0], LAYER0_TOLERANCE)

    value_metric = []
    for layer in layers:
        w = layer.self_attn.o_proj.weight.detach().double().view(-1, kv_heads, group, head_dim)
        value_metric.append(torch.stack([
            sum(w[:, h, j].T @ w[:, h, j] for j in range(group)) for h in range(kv_heads)]))
    return Capture(str(Path(model_dir).name), keys, values, (query_sq / count).float(),
                   torch.stack(value_metric).float(), token_ids,
                   table if verified else None, check)


class _Layer0Done(Exception):
    pass


def _layer0_table(model, attn_module, kv_heads: int, head_dim: int, chunk: int = 4096):
    """Pre-RoPE K and V of layer 0 for every vocabulary id ``[vocab, H, D]``, by the
    model's own forward on one-token sequences, stopped at layer 0's RoPE (V is computed
    before it). NOTE: ``apply_rotary_pos_emb`` of the attention module is patched by the
    caller's ``try``; this function replaces it and the caller restores the original."""
    vocab = model.get_input_embeddings().weight.shape[0]
    out_k, out_v = [], []
    v_proj = model.model.layers[0].self_attn.v_proj

    def stop_at_rope(q, k, *args, **kwargs):
        out_k.append(k[:, :, 0].detach().clone())  # [B, H, D]
        raise _Layer0Done

    hook = v_proj.register_forward_hook(
        lambda _m, _i, out: out_v.append(out[:, 0].view(-1, kv_heads, head_dim).detach().clone()))
    attn_module.apply_rotary_pos_emb = stop_at_rope
    try:
        with torch.no_grad():
            for start in range(0, vocab, chunk):
                try:
                    model(input_ids=torch.arange(start, min(start + chunk, vocab))[:, None])
                except _Layer0Done:
                    pass
    finally:
        hook.remove()
    return torch.cat(out_k), torch.cat(out_v)


def calibrate(model_dir: Path, text: str, preset: str = DEFAULT_PRESET, tokens: int = DEFAULT_TOKENS,
              captured: Capture | None = None, **capture_options):
    """Fit ``preset``'s calibration for the model (reusing ``captured`` activations if given;
    ``capture_options`` go to :func:`capture`)."""
    from vllm_seqkv.codec.presets import PRESETS

    capture_options.setdefault("layer0_table", needs_layer0_table(preset))
    captured = captured or capture(model_dir, text, tokens, **capture_options)
    from tqdm import tqdm

    bar = tqdm(total=captured.num_layers, desc=f"[seqkv] fitting {preset}", unit="layer",
               disable=captured.num_layers * captured.tokens < 100_000)

    def progress(layer, _total):
        bar.update(1 if layer else 0)

    try:
        return PRESETS[preset].fit(captured, progress)
    finally:
        bar.update(bar.total - bar.n)
        bar.close()


def lock_path(path: Path) -> Path:
    """The lock file guarding the calibration file ``path`` (one fit per file at a time)."""
    return path.with_name(path.name + ".lock")


def ensure(model_dir: Path, preset: str = DEFAULT_PRESET, text_path: Path | None = None, *,
           cold_prior: bool = True, **capture_options) -> Path:
    """The calibration file of ``preset`` for ``model_dir`` fitted on ``text_path`` (default:
    the general set): reused when it loads (checksum, format, preset), else fitted (a corrupt
    or foreign file is reported and refitted, never trusted) and written atomically. A file
    lock next to it makes concurrent callers wait for one fit and reuse its file.
    ``cold_prior``: also fit the cold tier's coder prior (transform presets)."""
    from filelock import FileLock, Timeout

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(f"{model_dir} is not a model directory (no config.json)")
    text = read_text(text_path, model_dir)
    path = default_path(model_dir, preset, text)
    lock = FileLock(str(lock_path(path)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # NOTE: before OSError, of which filelock's Timeout is a subclass
        print(f"[seqkv] another process is calibrating {model_dir} ({lock.lock_file}); waiting "
              "to reuse its file", file=sys.stderr)
        lock.acquire()
    except OSError as exc:
        raise CalibrationError(f"cannot write to the calibration folder {path.parent}: {exc} "
                               "(set SEQKV_HOME to a writable folder)") from None
    try:
        if path.exists():
            try:
                load(path, preset)
                if cold_prior:
                    ensure_cold_prior(model_dir, preset)
                return path
            except CalibrationError as exc:
                print(f"[seqkv] {exc}; refitting it", file=sys.stderr)
                path.unlink()
        cold_prior_path(model_dir, preset).unlink(missing_ok=True)  # fitted on the old codes
        print(f"[seqkv] fitting the {preset} calibration of {model_dir} on {DEFAULT_TOKENS} tokens "
              f"of {text_path or GENERAL_TEXT} through vLLM (once per model and preset)", file=sys.stderr)
        calibration = calibrate(model_dir, text, preset, DEFAULT_TOKENS, **capture_options)
        if getattr(calibration, "layer0_check", ""):
            print(f"[seqkv] {calibration.layer0_check}", file=sys.stderr)
        calibration.save(path)
        for stale in prune_stale(model_dir):
            print(f"[seqkv] removed stale calibration {stale}", file=sys.stderr)
        if cold_prior:
            ensure_cold_prior(model_dir, preset)
        return path
    finally:
        lock.release()


def ensure_cold_prior(model_dir: Path, preset: str = DEFAULT_PRESET) -> Path | None:
    """Fit the cold tier's code-level coder prior once (transform presets; else None)."""
    from vllm_seqkv.codec.presets import PRESETS

    if PRESETS[preset].calibration_kind != "transform":
        return None
    path = cold_prior_path(model_dir, preset)
    if path.exists():
        return path
    from vllm_seqkv.tiers.cold_prior import fit_cold_prior

    print(f"[seqkv] fitting the cold tier's coder prior of {preset} for {model_dir} on "
          f"{COLD_PRIOR_TOKENS} tokens of the calibration text", file=sys.stderr)
    codec = fit_cold_prior(model_dir, codec_for_model(model_dir, preset), read_text(), COLD_PRIOR_TOKENS)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        codec.save_prior(f)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    from vllm_seqkv.codec.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m vllm_seqkv.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        choices=[n for n, p in PRESETS.items() if p.calibration_kind != "none"])
    parser.add_argument("--text", type=Path, default=None,
                        help="calibration text: plain text or .jsonl of {'messages': [...]} chats "
                        "(default: the general set shipped with the package)")
    parser.add_argument("--dtype", default=None,
                        help="vLLM model dtype of the capture (default: float32 on CPU, the "
                        "serving dtype 'auto' on accelerators)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--no-cold-prior", dest="cold_prior", action="store_false",
                        help="skip the cold tier's coder prior (without it the cold tier codes bytes, not codes)")
    args = parser.parse_args(argv)
    try:
        print(ensure(args.model, args.preset, args.text, cold_prior=args.cold_prior,
                     dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size))
    except CalibrationError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
