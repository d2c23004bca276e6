"""The seqkv attention backend that vLLM loads in place of its own when seqkv is selected."""

from __future__ import annotations

import os

from vllm_seqkv.config import from_additional_config
from vllm_seqkv.integration.compat import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    get_current_vllm_config,
    init_logger,
)

logger = init_logger("vllm.seqkv")
ACTIVE_MARKER = "seqkv: attention backend active"


class SeqKVAttentionImpl(CPUAttentionBackendImpl):
    _announced_pids: set[int] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pid = os.getpid()
        if pid not in SeqKVAttentionImpl._announced_pids:
            SeqKVAttentionImpl._announced_pids.add(pid)
            config = from_additional_config(get_current_vllm_config().additional_config)
            logger.info(
                "%s in pid %d (preset %s); KV pages: stock vLLM layout (uncompressed)",
                ACTIVE_MARKER, pid, config.preset,
            )


class SeqKVAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return SeqKVAttentionImpl
