"""Lossless cold-tier coder that models the hot code's *symbols*, not its bytes.

:class:`~vllm_seqkv.plt.entropy.ColdCodec` models slot bytes as two nibbles per byte column;
on the transform presets (``seqkv-*``) a slot holds tightly packed quantizer codes whose
boundaries do not align with bytes, so it gains ~2 %. :class:`CodeModelCodec` (codec id 4)
unpacks each slot into what the hot codec actually wrote and codes those symbols
(``constriction`` ANS), one model per (layer, symbol):

* **transform codes** (:class:`~vllm_seqkv.codec.transform.TransformCodec`, possibly inside a
  :class:`~vllm_seqkv.codec.crosslayer.CrossLayerCodec`): one Lloyd-Max code of ``bits[h, c]``
  bits per (stream, head, component). A code is coded under a categorical whose context is a
  linear prediction from the codes of the token-head groups already decoded in the same
  token and layer (stages: K head 0, K head 1, ..., V head 0, ...; the transform decorrelates
  the components *within* a group, not across heads or between K and V). The prediction is
  exact integer arithmetic (fixed-point levels and weights, ``int64``), quantized into
  ``bins`` classes, and each (symbol, class) has an integer frequency table fitted offline,
  so encoder and decoder see identical probabilities on any machine (no floating point
  ever reaches the probability tables at coding time).
* **token-table ids** (:class:`~vllm_seqkv.codec.token_table.TokenTableCodec`, layer 0): the
  int32 row id of the first (stream, head) under a unigram model over the vocabulary, every
  other id as a flag "same as the first" (the ids of all heads and of K and V are the same
  token), and the id itself only where the flag says no.
* **everything else** (slot padding up to the common page width, fields of codecs it does not
  know such as the rotation presets' norms): one 256-ary byte model per (layer, byte column).

Models are static per block (a 16-token block is too short to adapt 256-ary tables); the
prior comes from training blocks (:meth:`CodeModelCodec.fit`); without training data
(:meth:`CodeModelCodec.structural`) codes are uniform (their raw width), padding is expected
to be zero and ids uniform over the vocabulary. A block the model cannot shrink is stored as is.

Payload: ``mode (1 byte) | tag[:4] | ANS words (coded) or the raw bytes (stored)``; a payload
of another model, a truncated or otherwise damaged one raises ``ValueError``.
Records are ``[layer, token, head, slot_bytes]`` uint8 (what the connector saves), any number
of tokens.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import constriction
import numpy as np

_CAT = constriction.stream.model.Categorical(perfect=False)
_STORED, _CODED = 0, 1
_HEADER = 5  # mode byte + 4 tag bytes
_LEVEL_FRAC = 10  # fixed-point fraction bits of the normalized levels
_WEIGHT_FRAC = 12  # ... of the predictor weights (mu is in units of 2**-22)
_TABLE_TOTAL = 1 << 16  # integer frequencies per table row (min 1 per symbol)


# ---- layout: what a slot holds, derived from the hot codec ---------------------------------
@dataclass
class LayerLayout:
    """Symbols of one layer's token row (``heads * slot_bytes`` bytes; bit ``8*b + i`` is bit
    ``i`` of row byte ``b``).

    ``code_pos [n, 8]``/``code_width [n]``: bit positions (LSB first) and width of each
    transform code; ``code_levels [n, 256]``: its quantizer's reconstruction levels (first
    ``2**width`` used); ``code_stage [n]``: its (stream, head) group, coded in order.
    ``id_offsets``: row byte offsets of int32 token-table ids (``vocab`` rows).
    ``extra``: row byte offsets coded as plain bytes (padding, unknown fields).
    """

    row_bytes: int
    code_pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 8), np.int64))
    code_width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    code_levels: np.ndarray = field(default_factory=lambda: np.zeros((0, 256), np.float64))
    code_stage: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    id_offsets: list[int] = field(default_factory=list)
    vocab: int = 0
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def check(self) -> None:
        """Every bit of the row is covered by exactly one symbol (so decoding rebuilds it)."""
        cover = np.zeros(self.row_bytes * 8, np.int64)
        for j, w in enumerate(self.code_width):
            np.add.at(cover, self.code_pos[j, :w], 1)
        for off in self.id_offsets:
            cover[off * 8:(off + 4) * 8] += 1
        for off in self.extra:
            cover[off * 8:(off + 1) * 8] += 1
        if not (cover == 1).all():
            raise ValueError("slot layout does not cover every bit of the row exactly once")

    def digest(self, h) -> None:
        for a in (np.int64(self.row_bytes), self.code_pos, self.code_width, self.code_stage,
                  np.asarray(self.id_offsets, np.int64), np.int64(self.vocab), self.extra):
            h.update(np.ascontiguousarray(a, np.int64).tobytes())


def layer_layout(key, value, heads: int, head_dim: int, slot_bytes: int | None = None) -> LayerLayout:
    """The symbols of one layer from its stream codecs (``KVCodec.codecs_for_layer``);
    ``slot_bytes``: the common (padded) slot width of the pages (default: this layer's)."""
    from vllm_seqkv.codec.base import SlotLayout
    from vllm_seqkv.codec.crosslayer import CrossLayerCodec
    from vllm_seqkv.codec.token_table import TokenTableCodec
    from vllm_seqkv.codec.transform import TransformCodec

    lay = SlotLayout(key, value, heads, head_dim)
    width = lay.slot_bytes if slot_bytes is None else int(slot_bytes)
    if width < lay.slot_bytes:
        raise ValueError(f"slot_bytes {width} < the layer's {lay.slot_bytes}")
    out = LayerLayout(row_bytes=heads * width)
    pos, wid, lev, stage, extra, ids = [], [], [], [], [], []
    covered = np.zeros(width, bool)
    offset = 0
    # NOTE: SlotLayout._fields is the field order of the slot (K fields, then V)
    for s, (codec, specs) in enumerate(zip((key, value), lay._fields)):
        inner = codec.inner if isinstance(codec, CrossLayerCodec) else codec
        nbytes = sum(n for _, _, n, _ in specs)
        if isinstance(inner, TransformCodec) and [n for n, *_ in specs] == ["codes"]:
            t = inner.transform
            comp, plane = inner._comp.numpy(), inner._plane.numpy()
            bits = t.bits.numpy()
            levels = t.levels.double().numpy()
            for h in range(heads):
                base = (h * width + offset) * 8
                for c in np.argsort(-bits[h], kind="stable"):
                    w = int(bits[h, c])
                    if w == 0:
                        continue
                    where = np.flatnonzero(comp[h] == c)
                    p = np.zeros(8, np.int64)
                    p[plane[h, where]] = base + where
                    pos.append(p)
                    wid.append(w)
                    lev.append(levels[h, c])
                    stage.append(s * heads + h)
            covered[offset:offset + nbytes] = True
        elif isinstance(inner, TokenTableCodec) and [(n, d) for n, d, *_ in specs] == [("ids", _int32())]:
            for h in range(heads):
                ids.append(h * width + offset)
            out.vocab = max(out.vocab, int(inner.table.shape[0]))
            covered[offset:offset + nbytes] = True
        offset += nbytes
    for h in range(heads):
        extra.extend(h * width + b for b in np.flatnonzero(~covered))
    if pos:
        out.code_pos, out.code_width = np.stack(pos), np.asarray(wid, np.int64)
        out.code_levels, out.code_stage = np.stack(lev), np.asarray(stage, np.int64)
    out.id_offsets = sorted(ids)
    out.extra = np.asarray(sorted(extra), np.int64)
    out.check()
    return out


def kv_layouts(kv, num_layers: int, heads: int, head_dim: int,
               slot_bytes: int | None = None) -> list[LayerLayout]:
    """Layouts of every layer of a :class:`~vllm_seqkv.codec.base.KVCodec` (pages padded to the
    widest layer's slot unless ``slot_bytes`` is given)."""
    from vllm_seqkv.codec.base import SlotLayout

    if slot_bytes is None:
        slot_bytes = max(SlotLayout(*kv.codecs_for_layer(layer), heads, head_dim).slot_bytes
                         for layer in range(num_layers))
    return [layer_layout(*kv.codecs_for_layer(layer), heads, head_dim, slot_bytes)
            for layer in range(num_layers)]


def _int32():
    import torch

    return torch.int32


# ---- per-layer model -----------------------------------------------------------------------
class _LayerModel:
    """Integer model of one layer; see the module docstring."""

    def __init__(self, layout: LayerLayout, lut: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                 bin_lo: np.ndarray, bin_w: np.ndarray, tables: np.ndarray, vocab_counts: np.ndarray,
                 same_counts: np.ndarray, extra_counts: np.ndarray):
        self.layout = layout
        n = len(layout.code_width)
        self.lut = np.asarray(lut, np.int64).reshape(n, 256)
        self.weight = np.asarray(weight, np.int64).reshape(n, n)
        self.bias = np.asarray(bias, np.int64).reshape(n)
        self.bin_lo = np.asarray(bin_lo, np.int64).reshape(n)
        self.bin_w = np.asarray(bin_w, np.int64).reshape(n)
        self.tables = np.asarray(tables, np.int64)  # [n, bins, 256]
        self.bins = self.tables.shape[1] if n else 1
        self.vocab_counts = np.asarray(vocab_counts, np.int64)
        self.same_counts = np.asarray(same_counts, np.int64).reshape(-1, 2)
        self.extra_counts = np.asarray(extra_counts, np.int64).reshape(len(layout.extra), 256)
        if (np.any(self.tables[..., :1] < 1) or np.any(self.vocab_counts < 1)
                or np.any(self.same_counts < 1) or np.any(self.extra_counts < 1)):
            raise ValueError("model frequencies must be >= 1")
        w = layout.code_width
        self.pow2 = np.where(np.arange(8)[None, :] < w[:, None], 1 << np.arange(8)[None, :], 0)
        # decode order: stages, then widths within a stage; prediction uses earlier stages only
        self.groups = []
        for s in np.unique(layout.code_stage):
            for width in np.unique(w[layout.code_stage == s]):
                idx = np.flatnonzero((layout.code_stage == s) & (w == width))
                self.groups.append((int(width), idx, self.tables[idx][:, :, :1 << width].astype(np.float64)))
        self.vocab_model = (constriction.stream.model.Categorical(
            self.vocab_counts.astype(np.float64), perfect=False) if len(self.vocab_counts) else None)

    def arrays(self) -> list[np.ndarray]:
        return [self.lut, self.weight, self.bias, self.bin_lo, self.bin_w, self.tables,
                self.vocab_counts, self.same_counts, self.extra_counts]

    # -- symbols of a [T, row_bytes] layer --
    def codes(self, rows: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(rows, axis=-1, bitorder="little").astype(np.int64)  # [T, 8*row]
        return (bits[:, self.layout.code_pos] * self.pow2).sum(-1)  # [T, n]

    def contexts(self, codes: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Bins ``[T, len(idx)]`` of symbols ``idx`` from the (already known) codes."""
        u = np.take_along_axis(self.lut[None], codes[:, :, None], 2)[:, :, 0]  # [T, n]
        mu = u @ self.weight[idx].T + self.bias[idx]  # int64: exact in any order
        return np.clip((mu - self.bin_lo[idx]) // self.bin_w[idx], 0, self.bins - 1)

    def encode_parts(self, rows: np.ndarray, parts: list) -> bool:
        """Append (symbols, model, probs) in decode order; False if not representable."""
        lay = self.layout
        tokens = rows.shape[0]
        if lay.id_offsets:
            cols = np.asarray([[o + i for i in range(4)] for o in lay.id_offsets])
            ids = rows[:, cols].copy().view("<i4")[..., 0]  # [T, n_ids]
            if ids.min() < 0 or ids.max() >= lay.vocab:
                return False
            same = (ids[:, 1:] == ids[:, :1]).astype(np.int32)
            parts.append((ids[:, 0].astype(np.int32), self.vocab_model, None))
            if same.size:
                parts.append((same.ravel(), _CAT,
                              np.broadcast_to(self.same_counts[None], (tokens,) + self.same_counts.shape)
                              .reshape(-1, 2).astype(np.float64)))
                other = ids[:, 1:][same == 0]
                if other.size:
                    parts.append((other.astype(np.int32), self.vocab_model, None))
        if len(lay.extra):
            syms = rows[:, lay.extra].astype(np.int32)
            parts.append((syms.ravel(), _CAT, np.broadcast_to(
                self.extra_counts[None], (tokens,) + self.extra_counts.shape).reshape(-1, 256)
                .astype(np.float64)))
        if len(lay.code_width):
            codes = self.codes(rows)
            bins = self.contexts(codes, np.arange(len(lay.code_width)))
            for width, idx, table in self.groups:
                probs = table[np.arange(len(idx))[None, :], bins[:, idx]]  # [T, m, 2**w]
                parts.append((codes[:, idx].astype(np.int32).ravel(), _CAT, probs.reshape(-1, 1 << width)))
        return True

    def decode_rows(self, dec, tokens: int) -> np.ndarray:
        lay = self.layout
        rows = np.zeros((tokens, lay.row_bytes), np.uint8)
        if lay.id_offsets:
            first = np.asarray(dec.decode(self.vocab_model, tokens), np.int64)
            ids = np.repeat(first[:, None], len(lay.id_offsets), 1)
            if len(lay.id_offsets) > 1:
                probs = np.broadcast_to(self.same_counts[None], (tokens,) + self.same_counts.shape)
                same = np.asarray(dec.decode(_CAT, probs.reshape(-1, 2).astype(np.float64)),
                                  np.int64).reshape(tokens, -1)
                k = int((same == 0).sum())
                if k:
                    rest = ids[:, 1:]
                    rest[same == 0] = np.asarray(dec.decode(self.vocab_model, k), np.int64)
            raw = ids.astype("<i4").view(np.uint8).reshape(tokens, len(lay.id_offsets), 4)
            for i, o in enumerate(lay.id_offsets):
                rows[:, o:o + 4] = raw[:, i]
        if len(lay.extra):
            probs = np.broadcast_to(self.extra_counts[None], (tokens,) + self.extra_counts.shape)
            rows[:, lay.extra] = np.asarray(
                dec.decode(_CAT, probs.reshape(-1, 256).astype(np.float64)), np.int64).reshape(tokens, -1)
        n = len(lay.code_width)
        if n:
            codes = np.zeros((tokens, n), np.int64)
            for width, idx, table in self.groups:
                bins = self.contexts(codes, idx)  # only earlier stages have nonzero weights
                probs = table[np.arange(len(idx))[None, :], bins]
                codes[:, idx] = np.asarray(dec.decode(_CAT, probs.reshape(-1, 1 << width)),
                                           np.int64).reshape(tokens, len(idx))
            bits = np.zeros((tokens, lay.row_bytes * 8), np.uint8)
            planes = (codes[:, :, None] >> np.arange(8)) & 1  # [T, n, 8]
            valid = self.pow2 > 0
            bits[:, lay.code_pos[valid]] = planes[:, valid]
            packed = np.packbits(bits, axis=-1, bitorder="little")
            rows |= packed  # code bits are disjoint from ids/extra bytes (layout.check)
        return rows


# ---- the codec -----------------------------------------------------------------------------
class CodeModelCodec:
    """Lossless coder of hot-code block records ``[layer, token, head, slot_bytes]``."""

    codec_id = 4

    def __init__(self, models: list[_LayerModel], heads: int, slot_bytes: int):
        self.models = models
        self.heads, self.slot_bytes = int(heads), int(slot_bytes)
        self.row_bytes = self.heads * self.slot_bytes
        h = hashlib.blake2b(digest_size=8, person=b"seqkv-codemodel1")
        h.update(np.asarray([len(models), heads, slot_bytes], np.int64).tobytes())
        for m in models:
            if m.layout.row_bytes != self.row_bytes:
                raise ValueError("every layer's row must be heads * slot_bytes bytes")
            m.layout.digest(h)
            for a in m.arrays():
                h.update(np.int64(a.size).tobytes() + np.ascontiguousarray(a, np.int64).tobytes())
        self.tag = h.digest()

    @property
    def record_row_bytes(self) -> int:
        """Bytes of one token (all layers)."""
        return len(self.models) * self.row_bytes

    # -- construction --
    @classmethod
    def structural(cls, layouts: list[LayerLayout], heads: int, slot_bytes: int) -> "CodeModelCodec":
        """No training data: codes uniform, padding/unknown bytes expected zero, ids uniform."""
        models = []
        for lay in layouts:
            n = len(lay.code_width)
            tables = np.ones((n, 1, 256), np.int64)
            extra = np.ones((len(lay.extra), 256), np.int64)
            extra[:, 0] = _TABLE_TOTAL
            models.append(_LayerModel(
                lay, _lut(lay, np.ones(n)), np.zeros((n, n)), np.zeros(n), np.zeros(n),
                np.ones(n), tables, np.ones(lay.vocab, np.int64),
                np.tile([1, 255], (max(len(lay.id_offsets) - 1, 0), 1)), extra))
        return cls(models, heads, slot_bytes)

    @classmethod
    def fit(cls, layouts: list[LayerLayout], samples: list[bytes], heads: int, slot_bytes: int,
            bins: int = 16, ridge: float = 1e-2, stages: bool = True) -> "CodeModelCodec":
        """Fit every model from training block records (``samples``, each
        ``[layer, token, head, slot_bytes]``). ``stages=False``: no prediction (order-0 per
        symbol); ``bins``: classes of the linear prediction."""
        row = heads * slot_bytes
        rows_per_token = len(layouts) * row
        data = np.concatenate([np.frombuffer(s, np.uint8).reshape(len(layouts), -1, row)
                               for s in samples], axis=1)  # [L, N, row]
        if data.shape[1] * rows_per_token != sum(map(len, samples)):
            raise ValueError("samples are not whole [layer, token, head, slot] records")
        models = []
        for layer, lay in enumerate(layouts):
            models.append(_fit_layer(lay, data[layer], bins, ridge, stages))
        return cls(models, heads, slot_bytes)

    @classmethod
    def for_kv_codec(cls, kv, num_layers: int, heads: int, head_dim: int, slot_bytes: int | None = None,
                     samples: list[bytes] | None = None, **kw) -> "CodeModelCodec":
        layouts = kv_layouts(kv, num_layers, heads, head_dim, slot_bytes)
        width = layouts[0].row_bytes // heads
        if samples:
            return cls.fit(layouts, samples, heads, width, **kw)
        return cls.structural(layouts, heads, width)

    def save_prior(self, path: Path) -> None:
        """The fitted model (layouts + integer tables), for :meth:`load_prior`."""
        arrays = {"meta": np.asarray([len(self.models), self.heads, self.slot_bytes], np.int64)}
        for i, m in enumerate(self.models):
            lay = m.layout
            arrays |= {f"{i}.code_pos": lay.code_pos, f"{i}.code_width": lay.code_width,
                       f"{i}.code_levels": lay.code_levels, f"{i}.code_stage": lay.code_stage,
                       f"{i}.id_offsets": np.asarray(lay.id_offsets, np.int64),
                       f"{i}.vocab": np.int64(lay.vocab), f"{i}.extra": lay.extra}
            for name, a in zip(_ARRAYS, m.arrays()):
                arrays[f"{i}.{name}"] = a
        np.savez_compressed(path, **arrays)

    @classmethod
    def load_prior(cls, path: Path) -> "CodeModelCodec":
        z = np.load(path)
        layers, heads, slot = (int(x) for x in z["meta"])
        models = []
        for i in range(layers):
            lay = LayerLayout(heads * slot, z[f"{i}.code_pos"], z[f"{i}.code_width"],
                              z[f"{i}.code_levels"], z[f"{i}.code_stage"],
                              [int(x) for x in z[f"{i}.id_offsets"]], int(z[f"{i}.vocab"]), z[f"{i}.extra"])
            lay.check()
            models.append(_LayerModel(lay, *(z[f"{i}.{name}"] for name in _ARRAYS)))
        return cls(models, heads, slot)

    # -- coding --
    def _tokens(self, raw_len: int) -> int:
        if raw_len % self.record_row_bytes:
            raise ValueError(f"{raw_len} bytes is not a whole number of tokens of "
                             f"{len(self.models)} layers x {self.row_bytes} bytes")
        return raw_len // self.record_row_bytes

    def encode(self, data: bytes) -> bytes:
        tokens = self._tokens(len(data))
        head = bytes([_STORED]) + self.tag[:4]
        if tokens == 0:
            return head
        rec = np.frombuffer(data, np.uint8).reshape(len(self.models), tokens, self.row_bytes)
        parts: list = []
        for layer, m in enumerate(self.models):
            if not m.encode_parts(rec[layer], parts):
                return head + bytes(data)
        enc = constriction.stream.stack.AnsCoder()
        for syms, model, probs in reversed(parts):
            if probs is None:
                enc.encode_reverse(syms, model)
            else:
                enc.encode_reverse(syms, model, probs)
        coded = enc.get_compressed().astype("<u4").tobytes()
        if len(coded) >= len(data):  # never expand beyond the 5-byte header
            return head + bytes(data)
        return bytes([_CODED]) + self.tag[:4] + coded

    def decode(self, payload: bytes, raw_len: int) -> bytes:
        tokens = self._tokens(raw_len)
        if len(payload) < _HEADER:
            raise ValueError("code-model payload shorter than its header (truncated)")
        mode, tag, body = payload[0], bytes(payload[1:_HEADER]), payload[_HEADER:]
        if tag != self.tag[:4]:
            raise ValueError("code-model payload was coded under another model/layout (tag mismatch)")
        if mode == _STORED:
            if len(body) != raw_len:
                raise ValueError(f"stored code-model payload has {len(body)} bytes, expected {raw_len}")
            return bytes(body)
        if mode != _CODED:
            raise ValueError(f"unknown code-model payload mode {mode}")
        if len(body) % 4 or not body:
            raise ValueError("code-model payload is not whole 32-bit words (truncated?)")
        dec = constriction.stream.stack.AnsCoder(np.frombuffer(body, "<u4").astype(np.uint32))
        out = np.empty((len(self.models), tokens, self.row_bytes), np.uint8)
        try:
            for layer, m in enumerate(self.models):
                out[layer] = m.decode_rows(dec, tokens)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction on garbage
            raise ValueError(f"corrupt code-model payload: {e}") from e
        if not dec.is_empty():
            raise ValueError("corrupt or truncated code-model payload (coder state not empty)")
        return out.tobytes()


_ARRAYS = ("lut", "weight", "bias", "bin_lo", "bin_w", "tables", "vocab_counts", "same_counts",
           "extra_counts")


# ---- fitting -------------------------------------------------------------------------------
def _lut(lay: LayerLayout, scale: np.ndarray) -> np.ndarray:
    """Fixed-point normalized levels ``[n, 256]`` (zero beyond each code's width)."""
    n = len(lay.code_width)
    used = np.arange(256)[None, :] < (1 << lay.code_width)[:, None]
    lut = np.round(lay.code_levels / scale[:, None] * (1 << _LEVEL_FRAC)) if n else np.zeros((0, 256))
    return np.where(used, lut, 0).astype(np.int64)


def _ncdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (fit time only; the tables are stored as integers)."""
    # Abramowitz & Stegun 7.1.26 for erf (|error| < 1.5e-7)
    z = np.abs(x) / math.sqrt(2)
    t = 1 / (1 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1 - poly * np.exp(-z * z)
    return 0.5 * (1 + np.sign(x) * erf)


def _to_counts(p: np.ndarray) -> np.ndarray:
    p = p / p.sum(-1, keepdims=True)
    return np.maximum(1, np.round(p * _TABLE_TOTAL)).astype(np.int64)


def _fit_layer(lay: LayerLayout, rows: np.ndarray, bins: int, ridge: float, stages: bool) -> _LayerModel:
    tokens = rows.shape[0]
    n = len(lay.code_width)
    # ids: unigram of the first id; how often the others equal it
    vocab_counts = np.zeros(lay.vocab, np.int64)
    same_counts = np.zeros((max(len(lay.id_offsets) - 1, 0), 2), np.int64)
    if lay.id_offsets:
        cols = np.asarray([[o + i for i in range(4)] for o in lay.id_offsets])
        ids = rows[:, cols].copy().view("<i4")[..., 0]
        ok = (ids >= 0) & (ids < lay.vocab)
        vocab_counts = _to_counts(np.bincount(ids[:, 0][ok[:, 0]], minlength=lay.vocab) + 0.05)
        same = ids[:, 1:] == ids[:, :1]
        same_counts = np.stack([(~same).sum(0) + 0.5, same.sum(0) + 0.5], 1)
        same_counts = _to_counts(same_counts)
    extra_counts = np.zeros((len(lay.extra), 256), np.int64)
    if len(lay.extra):
        c = np.zeros((len(lay.extra), 256))
        np.add.at(c, (np.broadcast_to(np.arange(len(lay.extra)), (tokens, len(lay.extra))),
                      rows[:, lay.extra]), 1)
        extra_counts = _to_counts(c + 0.02)
    if n == 0:
        return _LayerModel(lay, np.zeros((0, 256)), np.zeros((0, 0)), np.zeros(0), np.zeros(0),
                           np.ones(0), np.ones((0, 1, 256)), vocab_counts, same_counts, extra_counts)
    w = lay.code_width
    pow2 = np.where(np.arange(8)[None, :] < w[:, None], 1 << np.arange(8)[None, :], 0)
    bits = np.unpackbits(rows, axis=-1, bitorder="little").astype(np.int64)
    codes = (bits[:, lay.code_pos] * pow2).sum(-1)  # [N, n]
    z = np.take_along_axis(lay.code_levels[None], codes[:, :, None], 2)[:, :, 0]
    scale = z.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    lut = _lut(lay, scale)
    u = np.take_along_axis(lut[None], codes[:, :, None], 2)[:, :, 0]  # fixed point
    uf = u / (1 << _LEVEL_FRAC)
    weight = np.zeros((n, n), np.int64)
    bias = np.zeros(n, np.int64)
    unit = 1 << (_LEVEL_FRAC + _WEIGHT_FRAC)
    for j in range(n):
        feats = np.flatnonzero(lay.code_stage < lay.code_stage[j]) if stages else np.zeros(0, np.int64)
        if len(feats):
            x = uf[:, feats]
            xm, ym = x.mean(0), uf[:, j].mean()
            xc = x - xm
            a = xc.T @ xc
            a[np.diag_indices_from(a)] += ridge * tokens
            coef = np.linalg.solve(a, xc.T @ (uf[:, j] - ym))
            weight[j, feats] = np.round(coef * (1 << _WEIGHT_FRAC))
            bias[j] = round((ym - xm @ coef) * unit)
    mu = u @ weight.T + bias  # exactly what the coder computes
    bin_lo = np.zeros(n, np.int64)
    bin_w = np.full(n, 1 << 62, np.int64)
    tables = np.ones((n, bins, 256), np.int64)
    for j in range(n):
        k = 1 << int(w[j])
        levels = lut[j, :k] / (1 << _LEVEL_FRAC)
        cuts = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        marg = np.bincount(codes[:, j], minlength=k) + 0.5
        marg = marg / marg.sum()
        if weight[j].any():
            lo, hi = np.quantile(mu[:, j], [0.005, 0.995])
            bin_lo[j] = int(lo)
            bin_w[j] = max(1, int(math.ceil((hi - lo) / bins)))
        b = np.clip((mu[:, j] - bin_lo[j]) // bin_w[j], 0, bins - 1)
        muf = mu[:, j] / unit
        sigma = max(float(np.sqrt(np.mean((uf[:, j] - muf) ** 2))), 1e-3)
        # per-sample cell probabilities under N(mu, sigma), averaged per bin
        cdf = _ncdf((cuts[None, :] - muf[:, None]) / sigma)
        ps = np.diff(cdf, axis=1)  # [N, k]
        param = np.zeros((bins, k))
        np.add.at(param, b, ps)
        cnt = np.bincount(b, minlength=bins).astype(np.float64)
        emp = np.zeros((bins, k))
        np.add.at(emp, (b, codes[:, j]), 1)
        empty = cnt == 0
        param[~empty] /= cnt[~empty, None]
        param[empty] = marg
        best = None
        for eps in (0.01, 0.03, 0.1, 0.3, 1.0):
            p = (1 - eps) * param + eps * marg
            for beta in (4.0, 16.0, 64.0):
                q = (emp + beta * p) / (cnt[:, None] + beta)
                # leave-one-out likelihood on the training samples (no test peeking)
                loo = (emp[b, codes[:, j]] - 1 + beta * p[b, codes[:, j]]) / (cnt[b] - 1 + beta)
                score = -np.log2(np.maximum(loo, 1e-12)).mean()
                if best is None or score < best[0]:
                    best = (score, q)
        tables[j, :, :k] = _to_counts(best[1])
    return _LayerModel(lay, lut, weight, bias, bin_lo, bin_w, tables, vocab_counts, same_counts,
                       extra_counts)
