"""The ruler: teacher-forced perplexity, KL and attention error of every KV codec, one process.

For each window of ``context`` tokens of held-out text, the exact (uncompressed, fp32) run
gives the reference log-probabilities; then every codec runs the same window with every
layer's attention reading its cached past through the codec (decode-path semantics, see
:mod:`vllm_seqkv.bench.attention`: coded before ``exact_window_start(t)`` except sinks, exact
inside the window, own K/V always exact). Reported per codec:

- ``ppl`` / ``delta_ppl_pct`` versus ``ppl_ref``, with a paired standard error over
  256-token chunks (``delta_ppl_se_pct``; chunks of one window share context, so it is a
  rough figure);
- ``kl``: mean KL(p_exact || p_codec) of the next-token distributions, nats/token;
- ``attn_rel_err``: per layer ``||o_coded - o_exact|| / ||o_exact||`` of the attention output
  (before o_proj) for the same queries, over the last 256 queries of each window;
- ``bits_per_element`` all-in (``KVCodec.bits_per_element`` with the model's shapes and the
  context), ``bytes_per_token`` (K and V, all layers) and ``ratio_vs_bf16``.

Codecs that need calibration (``vllm_seqkv.codec.needs_calibration``: the seqkv presets) get
the model's calibration, fitted on the calibration text (never the evaluation text).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_seqkv.bench.data import windows
from vllm_seqkv.bench.forward import run_window
from vllm_seqkv.bench.model import LlamaForward
from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import KVCodec
from vllm_seqkv.codec.calibration import CalibrationError

SE_CHUNK = 256  # tokens per chunk for the paired standard error of Δppl


@dataclass
class QualitySettings:
    model_dir: Path
    text: Path
    calib_text: Path
    context: int
    tokens: int
    codecs: list[str]
    calib_tokens: int
    command: str
    windows: int = 0  # filled by evaluate()


@dataclass
class CodecTally:
    """Running sums for one codec over windows."""

    chunk_nll: list[float] = field(default_factory=list)  # mean NLL per SE_CHUNK tokens (nats)
    kl_sum: float = 0.0
    err_sq: list[float] = field(default_factory=list)
    ref_sq: list[float] = field(default_factory=list)

    def add(self, nll: list[float], kl_sum: float, err_sq: list[float], ref_sq: list[float]) -> None:
        self.chunk_nll += nll
        self.kl_sum += kl_sum
        self.err_sq = [a + b for a, b in zip(self.err_sq, err_sq)] if self.err_sq else list(err_sq)
        self.ref_sq = [a + b for a, b in zip(self.ref_sq, ref_sq)] if self.ref_sq else list(ref_sq)


def load_codecs(settings: QualitySettings) -> tuple[dict[str, KVCodec], dict[str, str]]:
    """Build the named codecs; seqkv presets get the model's calibration for that preset.

    With the default calibration text and size (the train split, ``calibrate.DEFAULT_TOKENS``)
    the calibration files the vLLM backend uses are loaded (fitted and saved if missing);
    otherwise each preset is fitted afresh in memory. Activations are captured once for all presets.
    Returns the codecs and, per codec, where its calibration came from.
    """
    from vllm_seqkv import calibrate, fixtures
    from vllm_seqkv.codec import needs_calibration

    default_text = (Path(settings.calib_text).resolve() == fixtures.corpus_path("train").resolve()
                    and settings.calib_tokens == calibrate.DEFAULT_TOKENS)
    captured = None
    codecs, sources = {}, {}
    for name in settings.codecs:
        calibration, sources[name] = None, "none"
        if needs_calibration(name):
            path = calibrate.default_path(settings.model_dir, name)
            if default_text and path.exists():
                try:
                    calibration = calibrate.load(path, name)
                    sources[name] = str(path)
                except CalibrationError as exc:  # an older format or a corrupt file: refit
                    print(f"refitting: {exc}", file=sys.stderr)
            if calibration is None:
                if captured is None:
                    captured = calibrate.capture(settings.model_dir, Path(settings.calib_text).read_text(),
                                                 settings.calib_tokens)
                calibration = calibrate.calibrate(settings.model_dir, "", name, captured=captured)
                sources[name] = f"fitted on {settings.calib_tokens} tokens of {settings.calib_text}"
                if default_text:
                    calibration.save(path)
        codecs[name] = make_codec(name, calibration)
    return codecs, sources


def evaluate(settings: QualitySettings) -> list[dict]:
    """Run the ruler; returns one record per codec (see module docstring)."""
    model = LlamaForward(settings.model_dir)
    codecs, calibration = load_codecs(settings)
    evaluation = windows(settings.model_dir, settings.text, settings.context, settings.tokens)
    settings.windows = len(evaluation)
    ref_nll: list[float] = []  # per SE_CHUNK-token chunk
    tallies = {name: CodecTally() for name in codecs}
    bar = tqdm(total=len(evaluation) * (len(codecs) + 1), desc="ruler", unit="run")
    for window in evaluation:
        inputs, targets = window[:-1], window[1:]
        bar.set_postfix_str("exact")
        ref = run_window(model, inputs).log_probs
        ref_nll += chunk_nll(ref, targets)
        ref_probs = ref.exp()
        bar.update()
        for name, codec in codecs.items():
            bar.set_postfix_str(name)
            got = run_window(model, inputs, codec, measure_attention=True)
            nll = chunk_nll(got.log_probs, targets)
            kl_sum = float((ref_probs * (ref - got.log_probs)).sum())
            tallies[name].add(nll, kl_sum, got.attn_err_sq, got.attn_ref_sq)
            bar.update()
    bar.close()
    records = [_record(name, codecs[name], tallies[name], ref_nll, model, settings) for name in codecs]
    for record in records:
        record["calibration"] = calibration[record["codec"]]
    return records


def chunk_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean next-token NLL (nats) of each ``SE_CHUNK``-token chunk: ``log_probs [T, V]``,
    ``targets [T]``; ``T`` must be a multiple of the chunk (equal weights)."""
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    size = math.gcd(SE_CHUNK, nll.numel())
    return [float(part.mean()) for part in nll.split(size)]


def _record(name: str, codec: KVCodec, tally: CodecTally, ref_nll: list[float], model: LlamaForward,
            settings: QualitySettings) -> dict:
    cfg = model.config
    bits = codec.bits_per_element(cfg.num_kv_heads, cfg.head_dim, settings.context, cfg.num_layers)
    diffs = torch.tensor(tally.chunk_nll) - torch.tensor(ref_nll)
    mean_diff = float(diffs.mean())
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    ppl_ref = math.exp(sum(ref_nll) / len(ref_nll))
    ppl = math.exp(sum(tally.chunk_nll) / len(tally.chunk_nll))
    attn = [math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(tally.err_sq, tally.ref_sq)]
    evaluated = settings.windows * settings.context
    return {
        "codec": name,
        "bits_per_element": bits,
        "bytes_per_token": bits * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim / 8,
        "ratio_vs_bf16": 16.0 / bits,
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "delta_ppl_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "delta_ppl_se_pct": 100.0 * math.exp(mean_diff) * se,
        "kl": tally.kl_sum / evaluated,
        "attn_rel_err_mean": sum(attn) / len(attn),
        "attn_rel_err": attn,
        "tokens": evaluated,
        "windows": settings.windows,
        "model": cfg.name,
        "text": str(settings.text),
        "context": settings.context,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": settings.command,
    }
