"""Ruler-only experiment: the chat suite (teacher-forced + free-running) for codecs with the
sequence's current page block read exact (``KVCodec.exact_page_block``), not built in the engine.

    python -m benchmarks.tuning.page_block CODEC[:BLOCK],... PROMPTS MAX_NEW OUT.json
"""

import dataclasses
import json
import sys
from pathlib import Path
import seqkv_fixtures as fixtures
from vllm_seqkv import calibrate
from benchmarks.chat import ChatSettings, prepare
from benchmarks.quality import QualitySettings, _chat_suite
from benchmarks.model import LlamaForward
from vllm_seqkv.codec import make_codec

model_dir = fixtures.smollm2_dir()
model = LlamaForward(model_dir)
codecs = {}
for spec in sys.argv[1].split(","):
    p, _, b = spec.partition(":")
    c = make_codec(p, calibrate.load_for_model(model_dir, p)) if p.startswith("seqkv") else make_codec(p)
    if b:
        c = dataclasses.replace(c, exact_page_block=int(b), name=f"{p}-pb{b}")
    codecs[c.name] = c
s = QualitySettings(model_dir=model_dir, text=Path("x"), calib_text=calibrate.GENERAL_TEXT, context=2048, tokens=0,
                    codecs=list(codecs), calib_tokens=24576, command="chatpb.py",
                    chat=ChatSettings(max_new_tokens=int(sys.argv[3]), samples=1, prompts=int(sys.argv[2])))
state = prepare(model, model_dir, s.chat)
recs = _chat_suite(model, codecs, s, state)
Path(sys.argv[4]).write_text(json.dumps(recs, indent=1))
for r in recs:
    print(f"{r['codec']:22s} bits {r['bits_per_element']:.2f} "
          f"chatTF {r['chat_delta_ppl_pct']:+.2f}±{r['chat_delta_ppl_se_pct']:.2f} "
          f"greedyTF {r.get('chat_greedy_delta_ppl_pct', 0):+.2f} t1TF {r.get('chat_t1_delta_ppl_pct', 0):+.2f} "
          f"kl {r['chat_kl']:.4f} free_g {r['free_greedy_ppl_ratio']:.3f} agree {r['greedy_agreement']:.2f}")
