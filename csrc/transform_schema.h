// Schemas of the transform-format ops: registered by registration.cpp (namespace seqkv) and by
// the CPU host test (tests/kernels/transform_host.cpp, namespace seqkv_host), so both check the
// same strings. Arguments: see transform_args.h. No includes: registration.cpp stays light.
#pragma once

#define SEQKV_WRITE_TRANSFORM_SCHEMA                                                                 \
  "write_transform_slots(Tensor key, Tensor value, Tensor slot_mapping, Tensor(a!) pages, "          \
  "Tensor? prev_k, Tensor? prev_v, Tensor[] k_tables, Tensor[] v_tables, int[] k_format, "           \
  "int[] v_format) -> ()"
#define SEQKV_TRANSFORM_DECODE_SCHEMA                                                                \
  "transform_decode_attention(Tensor query, Tensor own_k, Tensor own_v, Tensor pages, "              \
  "Tensor block_table, Tensor seq_lens, Tensor? rope, Tensor? prev_k, Tensor? prev_v, "              \
  "Tensor[] k_tables, Tensor[] v_tables, int[] k_format, int[] v_format, float scale, "              \
  "int num_splits, int skip_first) -> (Tensor, Tensor)"
