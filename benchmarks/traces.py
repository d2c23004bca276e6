"""Synthetic multi-session request traces for prefix-cache policies.

Workload mix (each request = (salt, token ids)):
* shared system prompts (Zipf popularity) + multi-turn chats that grow turn by turn;
* few-shot prompts: a shared template of examples + a unique query;
* RAG: system prompt + k retrieved documents from a Zipf-popular pool (documents overlap
  across requests) + a question;
* one-off prompts (no reuse).
Sessions are interleaved (several open at once) so recency alone is a weak signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TraceConfig:
    requests: int = 2000
    vocab: int = 4096
    tenants: int = 2
    system_prompts: int = 6
    system_len: tuple[int, int] = (200, 600)
    fewshot_templates: int = 4
    fewshot_len: tuple[int, int] = (300, 800)
    docs: int = 60
    doc_len: tuple[int, int] = (150, 500)
    docs_per_rag: int = 3
    zipf: float = 1.2
    turn_len: tuple[int, int] = (20, 120)
    open_sessions: int = 24
    mix: tuple[float, float, float, float] = (0.45, 0.2, 0.25, 0.10)  # chat, fewshot, rag, oneoff
    seed: int = 0


def _zipf_pick(rng, n, a):
    w = 1.0 / np.arange(1, n + 1) ** a
    return int(rng.choice(n, p=w / w.sum()))


def generate(cfg: TraceConfig = TraceConfig()) -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(cfg.seed)

    def seq(lo_hi):
        return rng.integers(3, cfg.vocab, size=int(rng.integers(*lo_hi))).tolist()

    tenants = [f"tenant{i}" for i in range(cfg.tenants)]
    systems = {t: [seq(cfg.system_len) for _ in range(cfg.system_prompts)] for t in tenants}
    fewshot = {t: [seq(cfg.fewshot_len) for _ in range(cfg.fewshot_templates)] for t in tenants}
    docs = [seq(cfg.doc_len) for _ in range(cfg.docs)]
    sessions: list[dict] = []
    out = []
    while len(out) < cfg.requests:
        if len(sessions) < cfg.open_sessions:
            tenant = tenants[int(rng.integers(cfg.tenants))]
            kind = rng.choice(4, p=np.asarray(cfg.mix) / sum(cfg.mix))
            sys_p = systems[tenant][_zipf_pick(rng, cfg.system_prompts, cfg.zipf)]
            if kind == 0:
                sessions.append({"salt": tenant, "ctx": sys_p + seq(cfg.turn_len),
                                 "turns": int(rng.integers(2, 9))})
            elif kind == 1:
                sessions.append({"salt": tenant, "turns": 1, "ctx":
                                 fewshot[tenant][_zipf_pick(rng, cfg.fewshot_templates, cfg.zipf)]
                                 + seq(cfg.turn_len)})
            elif kind == 2:
                picks = [_zipf_pick(rng, cfg.docs, cfg.zipf) for _ in range(cfg.docs_per_rag)]
                ctx = list(sys_p)
                for d in picks:
                    ctx += docs[d]
                sessions.append({"salt": tenant, "ctx": ctx + seq(cfg.turn_len),
                                 "turns": int(rng.integers(1, 3))})
            else:
                sessions.append({"salt": tenant, "ctx": seq((300, 1200)), "turns": 1})
            continue
        i = int(rng.integers(len(sessions)))
        s = sessions[i]
        out.append((s["salt"], list(s["ctx"])))
        s["turns"] -= 1
        if s["turns"] <= 0:
            sessions.pop(i)
        else:  # the assistant's answer and the next user turn extend the context
            s["ctx"] = s["ctx"] + seq(cfg.turn_len) + seq(cfg.turn_len)
    return out
