"""The ruler: what every KV codec does to the model, in every regime users meet, one process.

Suites (records carry ``suite`` and ``path``):

- ``long``: teacher-forced windows of ``context`` tokens of each long-context text (held-out
  Python docs, plus ``extra_texts`` such as English prose), fields below, plus
  ``delta_ppl_pct_by_position`` / ``kl_by_position`` per position bucket (0-63, 64-255,
  256-1023, 1024+) so that a codec good on average but bad early shows;
- ``chat``: the chat suite (:mod:`.chat`): teacher-forced Δppl and KL over the exact model's
  own answers (greedy and T=1), and free-running answers written with the codec, scored by
  the exact model (``free_*_ppl_ratio``, ``greedy_agreement``);
- ``path`` "vllm": vLLM's own KV dtypes and seqkv presets through the CPU engine
  (:mod:`.vllm_peers`).

Every record has the decode cost: ``decode_read_bits_per_element`` (what one decode step
reads per cached element, dependencies included, :meth:`KVCodec.decode_read_bits_per_element`)
and ``transient_bytes_per_token`` (held outside the pages during a step).

Long suite: for each window of ``context`` tokens of held-out text, the exact (uncompressed, fp32) run
gives the reference log-probabilities; then every codec runs the same window with every
layer's attention reading its cached past through the codec (decode-path semantics, see
:mod:`benchmarks.attention`: coded before ``exact_window_start(t)`` except sinks, exact
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
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from benchmarks.data import windows
from benchmarks.forward import run_window
from benchmarks.model import LlamaForward
from vllm_seqkv.codec import make_codec
from vllm_seqkv.codec.base import KVCodec
from vllm_seqkv.codec.calibration import CalibrationError

if TYPE_CHECKING:
    from benchmarks.chat import ChatSettings

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
    extra_texts: list[Path] = field(default_factory=list)  # more long-context texts, reported apart
    chat: "ChatSettings | None" = None  # the chat suite (None: not run)
    chat_codecs: list[str] | None = None  # codecs on the chat suite (None: all)
    vllm_peers: list[str] = field(default_factory=list)  # e.g. auto, fp8_e4m3, seqkv-3 (through vLLM)


@dataclass
class CodecTally:
    """Running sums for one codec over windows."""

    chunk_nll: list[float] = field(default_factory=list)  # mean NLL per SE_CHUNK tokens (nats)
    kl_sum: float = 0.0
    err_sq: list[float] = field(default_factory=list)
    ref_sq: list[float] = field(default_factory=list)
    buckets: "PositionTally" = field(default_factory=lambda: PositionTally())

    def add(self, nll: list[float], kl_sum: float, err_sq: list[float], ref_sq: list[float]) -> None:
        self.chunk_nll += nll
        self.kl_sum += kl_sum
        self.err_sq = [a + b for a, b in zip(self.err_sq, err_sq)] if self.err_sq else list(err_sq)
        self.ref_sq = [a + b for a, b in zip(self.ref_sq, ref_sq)] if self.ref_sq else list(ref_sq)


def load_codecs(settings: QualitySettings) -> tuple[dict[str, KVCodec], dict[str, str]]:
    """Build the named codecs; seqkv presets get the model's calibration for that preset.

    With the default size (``calibrate.DEFAULT_TOKENS``) calibrations are cached under
    :func:`vllm_seqkv.calibrate.default_path` by text hash (with the default text, the general
    set, these are the files the vLLM backend uses): loaded, or fitted and saved if missing;
    otherwise each preset is fitted afresh in memory. Activations are captured once for all presets.
    Returns the codecs and, per codec, where its calibration came from.
    """
    from vllm_seqkv import calibrate
    from vllm_seqkv.codec import needs_calibration

    text = calibrate.read_text(settings.calib_text, settings.model_dir)
    default_size = settings.calib_tokens == calibrate.DEFAULT_TOKENS
    captured = None
    codecs, sources = {}, {}
    for name in settings.codecs:
        calibration, sources[name] = None, "none"
        if needs_calibration(name):
            path = calibrate.default_path(settings.model_dir, name, text)
            if default_size and path.exists():
                try:
                    calibration = calibrate.load(path, name)
                    sources[name] = str(path)
                except CalibrationError as exc:  # an older format or a corrupt file: refit
                    print(f"refitting: {exc}", file=sys.stderr)
            if calibration is None:
                if captured is None:
                    captured = calibrate.capture(settings.model_dir, text, settings.calib_tokens)
                calibration = calibrate.calibrate(settings.model_dir, "", name, captured=captured)
                sources[name] = f"fitted on {settings.calib_tokens} tokens of {settings.calib_text}"
                if default_size:
                    calibration.save(path)
        codecs[name] = make_codec(name, calibration)
    return codecs, sources


def evaluate(settings: QualitySettings) -> list[dict]:
    """Run the ruler; returns records: per long-context text and codec (``suite`` "long"),
    then per codec on the chat suite (``suite`` "chat"), then vLLM's own peers (``path``
    "vllm"); see the module docstring."""
    model = LlamaForward(settings.model_dir)
    codecs, calibration = load_codecs(settings)
    records = []
    for text in [settings.text, *settings.extra_texts]:
        records += _long_suite(model, codecs, text, settings)
    state = None
    if settings.chat is not None:
        from benchmarks.chat import prepare

        print("chat suite: the exact model writes the reference answers", file=sys.stderr)
        state = prepare(model, settings.model_dir, settings.chat)
        chat_codecs = {n: codecs[n] for n in (settings.chat_codecs or codecs) if n in codecs}
        records += _chat_suite(model, chat_codecs, settings, state)
    for record in records:
        record["calibration"] = calibration[record["codec"]]
    if settings.vllm_peers:
        from benchmarks.vllm_peers import peer_records

        records += peer_records(model, settings, state)
    default = default_preset()
    for record in records:
        record["default"] = record["codec"] in (default, f"vllm:{default}")
    return records


def default_preset() -> str:
    from vllm_seqkv.config import SeqKVConfig

    return SeqKVConfig().preset


def _long_suite(model: LlamaForward, codecs: dict[str, KVCodec], text: Path,
                settings: QualitySettings) -> list[dict]:
    evaluation = windows(settings.model_dir, text, settings.context, settings.tokens)
    ref_nll: list[float] = []  # per SE_CHUNK-token chunk
    ref_buckets = PositionTally()
    tallies = {name: CodecTally() for name in codecs}
    bar = tqdm(total=len(evaluation) * (len(codecs) + 1), desc=f"ruler {Path(text).parent.name}/{Path(text).name}",
               unit="run")
    for window in evaluation:
        inputs, targets = window[:-1], window[1:]
        bar.set_postfix_str("exact")
        ref = run_window(model, inputs).log_probs
        ref_nll += chunk_nll(ref, targets)
        ref_token_nll = token_nll(ref, targets)
        ref_buckets.add(ref_token_nll, torch.zeros_like(ref_token_nll))
        ref_probs = ref.exp()
        bar.update()
        for name, codec in codecs.items():
            bar.set_postfix_str(name)
            got = run_window(model, inputs, codec, measure_attention=True)
            nll = chunk_nll(got.log_probs, targets)
            kl_tokens = (ref_probs * (ref - got.log_probs)).sum(-1)
            tallies[name].add(nll, float(kl_tokens.sum()), got.attn_err_sq, got.attn_ref_sq)
            tallies[name].buckets.add(token_nll(got.log_probs, targets), kl_tokens)
            bar.update()
    bar.close()
    return [_record(name, codecs[name], tallies[name], ref_nll, ref_buckets, model, settings, text,
                    len(evaluation)) for name in codecs]


def _chat_suite(model: LlamaForward, codecs: dict[str, KVCodec], settings: QualitySettings,
                state: dict) -> list[dict]:
    from benchmarks import chat

    chat_settings = settings.chat
    prompts, reference, stop_ids = state["prompts"], state["reference"], state["stop_ids"]
    runs = 1 + chat_settings.samples
    bar = tqdm(total=len(reference) * len(codecs), desc="chat teacher-forced", unit="answer")
    pooled, by_mode = chat.teacher_forced(model, reference, codecs, bar)
    bar.close()
    exact_free = chat.score_by_exact(model, reference)
    exact_greedy = [a.tokens for a in reference if a.mode == "greedy"]
    cfg = model.config
    mean_len = state["mean_len"]
    records = []
    for name, codec in tqdm(codecs.items(), desc="chat free-running", unit="codec"):
        own = chat.reference_answers(model, prompts, chat_settings, stop_ids, codec)
        free = chat.score_by_exact(model, own)
        greedy_ratio, greedy_se = chat.ratio_se(free["greedy"], exact_free["greedy"])
        record = {
            "codec": name, "suite": "chat", "path": "ruler", "text": str(chat.SUITE_PATH),
            "conversations": len(prompts), "answers_per_prompt": runs,
            "answer_tokens": pooled["exact"].tokens, "mean_sequence_tokens": mean_len,
            "ppl_ref": pooled["exact"].ppl, "ppl": pooled[name].ppl,
            "chat_kl": pooled[name].kl / max(pooled[name].tokens, 1),
            "free_greedy_ppl_ratio": greedy_ratio, "free_greedy_ppl_ratio_se": greedy_se,
            "greedy_agreement": chat.agreement(exact_greedy, [a.tokens for a in own if a.mode == "greedy"]),
            **_decode_cost(codec, cfg, round(mean_len)),
            "model": cfg.name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "command": settings.command,
        }
        record["chat_delta_ppl_pct"], record["chat_delta_ppl_se_pct"] = chat.delta_pct(pooled[name], pooled["exact"])
        for mode, tallies in by_mode.items():
            record[f"chat_{mode}_delta_ppl_pct"] = chat.delta_pct(tallies[name], tallies["exact"])[0]
        if "t1" in free:
            record["free_t1_ppl_ratio"], record["free_t1_ppl_ratio_se"] = chat.ratio_se(free["t1"], exact_free["t1"])
        records.append(record)
    return records


def _decode_cost(codec: KVCodec, cfg, context: int) -> dict:
    """Bits per element stored and read by a decode step at ``context`` (all layers)."""
    shape = (cfg.num_kv_heads, cfg.head_dim)
    return {
        "bits_per_element": codec.bits_per_element(*shape, context, cfg.num_layers),
        "decode_read_bits_per_element": codec.decode_read_bits_per_element(*shape, context, cfg.num_layers),
        "transient_bytes_per_token": codec.transient_bytes_per_token(*shape, cfg.num_layers),
    }


def token_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(1, targets[:, None])[:, 0]


def chunk_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean next-token NLL (nats) of each ``SE_CHUNK``-token chunk: ``log_probs [T, V]``,
    ``targets [T]``; ``T`` must be a multiple of the chunk (equal weights)."""
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    size = math.gcd(SE_CHUNK, nll.numel())
    return [float(part.mean()) for part in nll.split(size)]


def _record(name: str, codec: KVCodec, tally: CodecTally, ref_nll: list[float], ref_buckets: "PositionTally",
            model: LlamaForward, settings: QualitySettings, text: Path, num_windows: int) -> dict:
    cfg = model.config
    bits = codec.bits_per_element(cfg.num_kv_heads, cfg.head_dim, settings.context, cfg.num_layers)
    diffs = torch.tensor(tally.chunk_nll) - torch.tensor(ref_nll)
    mean_diff = float(diffs.mean())
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    ppl_ref = math.exp(sum(ref_nll) / len(ref_nll))
    ppl = math.exp(sum(tally.chunk_nll) / len(tally.chunk_nll))
    attn = [math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(tally.err_sq, tally.ref_sq)]
    evaluated = num_windows * settings.context
    return {
        "codec": name,
        "suite": "long",
        "path": "ruler",
        "bytes_per_token": bits * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim / 8,
        "ratio_vs_bf16": 16.0 / bits,
        **_decode_cost(codec, cfg, settings.context),
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "delta_ppl_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "delta_ppl_se_pct": 100.0 * math.exp(mean_diff) * se,
        "kl": tally.kl_sum / evaluated,
        "delta_ppl_pct_by_position": tally.buckets.delta_ppl_pct(ref_buckets),
        "kl_by_position": tally.buckets.kl(),
        "attn_rel_err_mean": sum(attn) / len(attn),
        "attn_rel_err": attn,
        "tokens": evaluated,
        "windows": num_windows,
        "model": cfg.name,
        "text": str(text),
        "context": settings.context,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": settings.command,
    }


POSITION_BUCKETS = ((0, 64), (64, 256), (256, 1024), (1024, None))


def bucket_name(bucket: tuple[int, int | None]) -> str:
    low, high = bucket
    return f"{low}-{high - 1}" if high is not None else f"{low}+"


@dataclass
class PositionTally:
    """Sums of next-token NLL and KL per position bucket (position of the predicted token's
    context end, 0-based within the window)."""

    nll: dict[str, float] = field(default_factory=dict)
    kl_sum: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, nll: torch.Tensor, kl: torch.Tensor) -> None:
        for bucket in POSITION_BUCKETS:
            low, high = bucket
            part = slice(low, high)
            if nll[part].numel() == 0:
                continue
            name = bucket_name(bucket)
            self.nll[name] = self.nll.get(name, 0.0) + float(nll[part].sum())
            self.kl_sum[name] = self.kl_sum.get(name, 0.0) + float(kl[part].sum())
            self.count[name] = self.count.get(name, 0) + nll[part].numel()

    def delta_ppl_pct(self, ref: "PositionTally") -> dict[str, float]:
        return {name: 100.0 * (math.exp((self.nll[name] - ref.nll[name]) / self.count[name]) - 1.0)
                for name in self.count}

    def kl(self) -> dict[str, float]:
        return {name: self.kl_sum[name] / self.count[name] for name in self.count}
