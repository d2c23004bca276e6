"""Lossless entropy codes for the cold tiers, on ``constriction`` (no hand-written coder).

* :class:`ColdCodec` - hot-code bytes (the uint8 slots of :class:`~vllm_seqkv.codec.base.SlotLayout`)
  -> an ANS stream. Each byte is split in two nibbles; the high nibble is coded under a
  categorical model per byte column, the low nibble under a model per (column, high nibble),
  i.e. a full per-column byte distribution. Models start from a prior fitted offline on
  training blocks (:meth:`ColdCodec.fit`; uniform when absent) and adapt per chunk of rows
  (counts of the chunks already coded), so encoder and decoder see identical integer counts.
  A block the model cannot shrink is stored as is (one mode byte), so coding never expands.
* :class:`TokenCoder` - token ids range-coded under the model's own next-token distribution
  (transformers, fp32, CPU). Encoder and decoder run the same incremental forward (one token
  per step with the KV cache) so they see bit-identical probabilities on one machine; the
  blob layer checks a digest of the decoded ids, so a mismatch is a miss, never wrong ids.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import constriction
import numpy as np

_CAT = constriction.stream.model.Categorical(perfect=False)
_STORED, _CODED = b"\x00", b"\x01"  # first payload byte of a ColdCodec stream


def _nibbles(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (raw >> 4).astype(np.int32), (raw & 15).astype(np.int32)


class ColdCodec:
    """Per-column adaptive nibble model; ``columns`` = bytes per row (e.g. heads*slot_bytes)."""

    codec_id = 1

    def __init__(self, columns: int = 1, prior_hi: np.ndarray | None = None,
                 prior_lo: np.ndarray | None = None, chunk_rows: int = 16, increment: int = 2):
        self.columns = columns
        self.chunk_rows = chunk_rows
        self.increment = increment
        self.prior_hi = (np.ones((columns, 16), np.int64) if prior_hi is None
                         else np.asarray(prior_hi, np.int64))
        self.prior_lo = (np.ones((columns, 16, 16), np.int64) if prior_lo is None
                         else np.asarray(prior_lo, np.int64))
        if self.prior_hi.shape != (columns, 16) or self.prior_lo.shape != (columns, 16, 16):
            raise ValueError("prior shapes do not match columns")
        h = hashlib.blake2b(digest_size=8, person=b"coldcodec-v2")
        for a in (np.int64(columns), np.int64(chunk_rows), np.int64(increment),
                  self.prior_hi, self.prior_lo):
            h.update(np.ascontiguousarray(a).tobytes())
        self.tag = h.digest()  # identifies the model; stored in every blob header

    # ---- prior ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: list[bytes], columns: int, weight: int = 256, **kw) -> "ColdCodec":
        """Prior from training blocks: smoothed column frequencies worth ``weight`` rows."""
        hi_c = np.zeros((columns, 16), np.float64)
        lo_c = np.zeros((columns, 16, 16), np.float64)
        for s in samples:
            raw = np.frombuffer(s, np.uint8).reshape(-1, columns)
            hi, lo = _nibbles(raw)
            col = np.broadcast_to(np.arange(columns), hi.shape)
            np.add.at(hi_c, (col, hi), 1)
            np.add.at(lo_c, (col, hi, lo), 1)
        inc = kw.get("increment", 2)
        scale = weight * inc

        def smooth(c):
            f = (c + 0.5) / (c + 0.5).sum(-1, keepdims=True)
            return np.maximum(1, np.round(f * scale)).astype(np.int64)

        return cls(columns, smooth(hi_c), smooth(lo_c), **kw)

    def save_prior(self, path: Path) -> None:
        np.savez(path, columns=self.columns, hi=self.prior_hi, lo=self.prior_lo,
                 chunk_rows=self.chunk_rows, increment=self.increment)

    @classmethod
    def load_prior(cls, path: Path) -> "ColdCodec":
        z = np.load(path)
        return cls(int(z["columns"]), z["hi"], z["lo"], int(z["chunk_rows"]), int(z["increment"]))

    # ---- coding ---------------------------------------------------------------------------
    def _rows(self, raw_len: int) -> int:
        if raw_len % self.columns:
            raise ValueError(f"{raw_len} bytes is not a whole number of {self.columns}-byte rows")
        return raw_len // self.columns

    def encode(self, data: bytes) -> bytes:
        raw = np.frombuffer(data, np.uint8).reshape(self._rows(len(data)), self.columns)
        hi, lo = _nibbles(raw)
        cols = np.arange(self.columns)
        st_hi, st_lo = self.prior_hi.copy(), self.prior_lo.copy()
        syms, probs = [], []
        for r0 in range(0, raw.shape[0], self.chunk_rows):
            h, low = hi[r0:r0 + self.chunk_rows], lo[r0:r0 + self.chunk_rows]
            colg = np.broadcast_to(cols, h.shape)
            syms.append(h.ravel())
            probs.append(st_hi[colg.ravel()])
            syms.append(low.ravel())
            probs.append(st_lo[colg.ravel(), h.ravel()])
            np.add.at(st_hi, (colg, h), self.increment)
            np.add.at(st_lo, (colg, h, low), self.increment)
        enc = constriction.stream.stack.AnsCoder()
        if syms:
            enc.encode_reverse(np.concatenate(syms).astype(np.int32), _CAT,
                               np.concatenate(probs).astype(np.float64))
        coded = enc.get_compressed().astype("<u4").tobytes()
        if len(coded) >= len(data):  # incompressible (e.g. tightly packed codes): never expand
            return _STORED + bytes(data)
        return _CODED + coded

    def decode(self, payload: bytes, raw_len: int) -> bytes:
        mode, payload = payload[:1], payload[1:]
        if mode == _STORED:
            if len(payload) != raw_len:
                raise ValueError("stored payload length mismatch")
            return bytes(payload)
        if mode != _CODED:
            raise ValueError("unknown cold-codec payload mode")
        rows = self._rows(raw_len)
        dec = constriction.stream.stack.AnsCoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        cols = np.arange(self.columns)
        st_hi, st_lo = self.prior_hi.copy(), self.prior_lo.copy()
        out = np.empty((rows, self.columns), np.uint8)
        for r0 in range(0, rows, self.chunk_rows):
            n = min(self.chunk_rows, rows - r0)
            colg = np.broadcast_to(cols, (n, self.columns))
            h = np.asarray(dec.decode(_CAT, st_hi[colg.ravel()].astype(np.float64)),
                           np.int64).reshape(n, self.columns)
            low = np.asarray(dec.decode(_CAT, st_lo[colg.ravel(), h.ravel()].astype(np.float64)),
                             np.int64).reshape(n, self.columns)
            out[r0:r0 + n] = (h << 4 | low).astype(np.uint8)
            np.add.at(st_hi, (colg, h), self.increment)
            np.add.at(st_lo, (colg, h, low), self.increment)
        return out.tobytes()


class RawCodec:
    """Identity (no entropy coding) - for comparison and for tiers that take any bytes."""

    codec_id = 0
    tag = b"\0" * 8

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, payload: bytes, raw_len: int) -> bytes:
        if len(payload) != raw_len:
            raise ValueError("raw payload length mismatch")
        return bytes(payload)


class TokenCoder:
    """Token ids <-> range-coded bits under a causal LM's next-token distribution."""

    codec_id = 2

    def __init__(self, model_dir: Path, max_tokens: int = 4096):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.config
        self.vocab = cfg.vocab_size
        self.bos = cfg.bos_token_id
        self.max_tokens = max_tokens
        h = hashlib.blake2b(digest_size=8)
        h.update((Path(model_dir) / "config.json").read_bytes())
        for p in list(self.model.parameters())[:3]:
            h.update(p.detach().numpy().tobytes()[:4096])
        self.tag = h.digest()

    def _steps(self):
        """Generator: yields next-token probabilities (float64), receives the actual token."""
        torch = self.torch
        cache = None
        tok = self.bos
        with torch.inference_mode():
            while True:
                if tok is None:  # no BOS: first token uniform
                    probs = np.ones(self.vocab, np.float64)
                else:
                    out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=cache,
                                     use_cache=True)
                    cache = out.past_key_values
                    probs = torch.softmax(out.logits[0, -1].double(), -1).numpy()
                tok = yield probs

    def encode(self, ids) -> bytes:
        ids = [int(t) for t in ids]
        if len(ids) > self.max_tokens:
            raise ValueError("too many tokens for one token-tier blob")
        enc = constriction.stream.queue.RangeEncoder()
        gen = self._steps()
        probs = next(gen)
        for i, t in enumerate(ids):
            enc.encode(np.array([t], np.int32), _CAT, probs[None, :])
            if i + 1 < len(ids):
                probs = gen.send(t)
        gen.close()
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, payload: bytes, n: int) -> list[int]:
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        gen = self._steps()
        probs = next(gen)
        ids = []
        for i in range(n):
            t = int(dec.decode(_CAT, probs[None, :])[0])
            ids.append(t)
            if i + 1 < n:
                probs = gen.send(t)
        gen.close()
        return ids

    def cross_entropy_bits(self, ids) -> tuple[float, np.ndarray]:
        """Model cross-entropy in bits/token from one batched forward, and per-token ln p."""
        torch = self.torch
        x = ([self.bos] if self.bos is not None else []) + [int(t) for t in ids]
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([x])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        if self.bos is not None:
            tok_lp = lp[:-1].gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
        else:
            tok_lp = np.concatenate([[-math.log(self.vocab)],
                                     lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()])
        return float(-tok_lp.mean() / math.log(2)), tok_lp


class SplitCodec:
    """The first ``head_len`` bytes through ``head`` (e.g. :class:`ColdCodec`), the rest raw.

    For blobs that carry a small side record after the page bytes (the connector appends the
    exact sink K/V of a block). Payload: ``u64 coded head length | coded head | tail``. The
    blob layer checks the digest of the whole decoded record.
    """

    codec_id = 3

    def __init__(self, head, head_len: int):
        self.head = head
        self.head_len = int(head_len)
        h = hashlib.blake2b(digest_size=8)
        h.update(bytes([head.codec_id]) + head.tag + self.head_len.to_bytes(8, "little"))
        self.tag = h.digest()

    def encode(self, data: bytes) -> bytes:
        if len(data) < self.head_len:
            raise ValueError(f"{len(data)} bytes < head of {self.head_len}")
        coded = self.head.encode(bytes(data[:self.head_len]))
        return len(coded).to_bytes(8, "little") + coded + bytes(data[self.head_len:])

    def decode(self, payload: bytes, raw_len: int) -> bytes:
        n = int.from_bytes(payload[:8], "little")
        if raw_len < self.head_len or 8 + n > len(payload):
            raise ValueError("split payload shorter than its header says")
        tail = payload[8 + n:]
        if self.head_len + len(tail) != raw_len:
            raise ValueError("split payload length mismatch")
        return self.head.decode(payload[8:8 + n], self.head_len) + bytes(tail)
