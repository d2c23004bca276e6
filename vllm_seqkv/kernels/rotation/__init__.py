"""Kernels of the rotation slot format (the ``seqkv-3-rot`` ablation: Hadamard rotation +
two-codebook scalar quantization), kept aside from the default format's kernels in
:mod:`vllm_seqkv.kernels`; dispatched through the same table."""
