"""The ruler's chat suite: quality at chat lengths, teacher-forced and free-running.

The suite (``chat_suite.json``, written for this project: 48 single-turn prompts and 12
multi-turn conversations, general knowledge / code / instructions / summaries) is rendered
with the model's chat template. The exact model (fp32 forward, exact cache) writes the
reference answers: one greedy and ``samples`` at temperature 1 with fixed seeds per prompt.

- Teacher-forced: each codec reads the prompt + reference answer through its cache; NLL and
  KL(exact || codec) over the answer tokens (:func:`teacher_forced`).
- Free-running: each codec writes its own answers (greedy, and T=1 with the same seeds);
  the exact model scores them; the ratio of their perplexity to that of the exact model's
  own answers, and greedy agreement before the first divergence (:func:`free_running`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.forward import run_window
from benchmarks.generate import generate
from benchmarks.model import LlamaForward
from benchmarks.vllm_path import agreement  # noqa: F401  (greedy agreement, re-exported)
from vllm_seqkv.codec.base import KVCodec

SUITE_PATH = Path(__file__).with_name("chat_suite.json")
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


@dataclass(frozen=True)
class ChatSettings:
    max_new_tokens: int = 96
    samples: int = 2  # T=1 answers per prompt (seeds base_seed + 1000 * prompt + i)
    prompts: int = 0  # 0: all 60; else the first n of an interleaved single/multi-turn order
    base_seed: int = 0


@dataclass
class Answer:
    """One reference or generated answer: prompt ids ``[P]`` and answer ids (the stop token kept)."""

    prompt_id: str
    prompt: torch.Tensor
    tokens: list[int]
    mode: str  # "greedy" or "t1"
    seed: int | None = None


@dataclass
class Tally:
    """Token-weighted sums over answers (nats)."""

    nll: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    per_answer: list[float] = field(default_factory=list)  # mean NLL of each answer

    def add(self, nll: torch.Tensor, kl: float = 0.0) -> None:
        self.nll += float(nll.sum())
        self.kl += kl
        self.tokens += nll.numel()
        self.per_answer.append(float(nll.mean()))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))


def load_suite(path: Path = SUITE_PATH) -> list[dict]:
    """Conversations in a fixed interleaved order (single-turn, multi-turn, ...), so that a
    prefix of the list keeps both kinds."""
    suite = json.loads(Path(path).read_text())
    single, multi = suite["single_turn"], suite["multi_turn"]
    ratio = max(1, len(single) // max(len(multi), 1))
    order, s, m = [], 0, 0
    while s < len(single) or m < len(multi):
        order += single[s:s + ratio]
        s += ratio
        if m < len(multi):
            order.append(multi[m])
            m += 1
    return order


class ChatFormat:
    """Renders conversations with the model's chat template (ChatML when it has none, as
    SmolLM2's own template) and knows the stop tokens."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        stops = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            stops.add(im_end)
        self.stop_ids = tuple(sorted(i for i in stops if i is not None))

    def prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        if self.has_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = "".join(CHATML.format(**m) for m in messages) + "<|im_start|>assistant\n"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(list(ids), dtype=torch.long)


def prepare(model: LlamaForward, model_dir: Path, settings: ChatSettings) -> dict:
    """The suite's prompts (rendered) and the exact model's reference answers:
    ``{"prompts": [(id, ids)], "reference": [Answer], "stop_ids", "mean_len"}``."""
    fmt = ChatFormat(model_dir)
    suite = load_suite()
    if settings.prompts:
        suite = suite[: settings.prompts]
    prompts = [(c["id"], fmt.prompt_ids(c["messages"])) for c in suite]
    reference = reference_answers(model, prompts, settings, fmt.stop_ids)
    mean_len = sum(a.prompt.numel() + len(a.tokens) for a in reference) / len(reference)
    return {"prompts": prompts, "reference": reference, "stop_ids": fmt.stop_ids, "mean_len": mean_len}


def reference_answers(model: LlamaForward, prompts: list[tuple[str, torch.Tensor]], settings: ChatSettings,
                      stop_ids: tuple[int, ...], codec: KVCodec | None = None) -> list[Answer]:
    """Greedy + ``settings.samples`` T=1 answers per prompt, by the model with ``codec`` in its
    cache (None: the exact model)."""
    ids = [p for _, p in prompts]
    answers = []
    greedy = generate(model, ids, codec, settings.max_new_tokens, stop_ids=stop_ids)
    answers += [Answer(name, p, t, "greedy") for (name, p), t in zip(prompts, greedy)]
    for i in range(settings.samples):
        seeds = [sample_seed(settings, n, i) for n in range(len(prompts))]
        sampled = generate(model, ids, codec, settings.max_new_tokens, temperature=1.0, seeds=seeds,
                           stop_ids=stop_ids)
        answers += [Answer(name, p, t, "t1", s) for (name, p), t, s in zip(prompts, sampled, seeds)]
    return answers


def sample_seed(settings: ChatSettings, prompt_index: int, sample: int) -> int:
    return settings.base_seed + 1000 * prompt_index + sample


def answer_log_probs(model: LlamaForward, answer: Answer, codec: KVCodec | None) -> torch.Tensor:
    """Log-probs ``[A, vocab]`` of the answer's tokens, prompt + answer read through ``codec``."""
    sequence = torch.cat([answer.prompt, torch.tensor(answer.tokens, dtype=torch.long)])
    log_probs = run_window(model, sequence[:-1], codec).log_probs
    return log_probs[answer.prompt.numel() - 1:]


def answer_nll(log_probs: torch.Tensor, answer: Answer) -> torch.Tensor:
    from benchmarks.quality import token_nll

    return token_nll(log_probs, torch.tensor(answer.tokens, dtype=torch.long))


def teacher_forced(model: LlamaForward, answers: list[Answer], codecs: dict[str, KVCodec],
                   progress=None) -> tuple[dict[str, Tally], dict[str, dict[str, Tally]]]:
    """Exact and per-codec tallies over the reference answers, pooled and per mode.

    Returns ``(pooled, by_mode)``: ``pooled[name]`` (``"exact"`` and each codec) and
    ``by_mode[mode][name]``.
    """
    pooled = {name: Tally() for name in ["exact", *codecs]}
    by_mode: dict[str, dict[str, Tally]] = {}
    for answer in answers:
        modes = by_mode.setdefault(answer.mode, {name: Tally() for name in pooled})
        ref = answer_log_probs(model, answer, None)
        nll = answer_nll(ref, answer)
        pooled["exact"].add(nll)
        modes["exact"].add(nll)
        probs = ref.exp()
        for name, codec in codecs.items():
            got = answer_log_probs(model, answer, codec)
            kl = float((probs * (ref - got)).sum())
            nll = answer_nll(got, answer)
            pooled[name].add(nll, kl)
            modes[name].add(nll, kl)
            if progress is not None:
                progress.update()
    return pooled, by_mode


def score_by_exact(model: LlamaForward, answers: list[Answer]) -> dict[str, Tally]:
    """Per mode, the exact model's NLL of each answer (free-running answers' quality)."""
    tallies: dict[str, Tally] = {}
    for answer in answers:
        tallies.setdefault(answer.mode, Tally()).add(answer_nll(answer_log_probs(model, answer, None), answer))
    return tallies


def delta_pct(tally: Tally, ref: Tally) -> tuple[float, float]:
    """Δppl % of ``tally`` vs ``ref`` (same answers) and a paired standard error over answers."""
    delta = 100.0 * (tally.ppl / ref.ppl - 1.0)
    diffs = torch.tensor(tally.per_answer) - torch.tensor(ref.per_answer)
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return delta, 100.0 * (tally.ppl / ref.ppl) * se


def ratio_se(got: Tally, ref: Tally) -> tuple[float, float]:
    """Ratio of perplexities of two sets of answers (not paired token by token: different
    answers) and its standard error from the spread of per-answer mean NLLs."""
    ratio = got.ppl / ref.ppl
    a, b = torch.tensor(got.per_answer), torch.tensor(ref.per_answer)
    var = (a.var() / len(a) if len(a) > 1 else 0.0) + (b.var() / len(b) if len(b) > 1 else 0.0)
    return ratio, float(ratio * math.sqrt(float(var)))
