// Schemas of the seqkv CUDA ops (implementations: rotation/write_slots.cu,
// rotation/decode_attention.cu for the rotation format; write.cu, decode.cu for the transform
// format) and the
// Python module vllm_seqkv._C: importing it registers the ops under torch.ops.seqkv.
// A rotation stream format is [bits_a, bits_b, norm_off, off_a, off_b] (see rotation/slot_format.cuh);
// the transform ops' schemas are in transform_schema.h, their tables and formats in transform_args.h.
// Only light headers (torch/library.h, Python.h): no pybind11, so it compiles in seconds.
#include <Python.h>
#include <torch/library.h>

#include "transform_schema.h"

TORCH_LIBRARY(seqkv, m) {
  m.def(
      "write_slots(Tensor unit_k, Tensor norm_k, Tensor unit_v, Tensor norm_v, Tensor slot_mapping, "
      "Tensor(a!) pages, Tensor bounds_k, Tensor bounds_v, int[] k_format, int[] v_format) -> ()");
  m.def(
      "paged_decode_attention(Tensor query, Tensor own_k, Tensor own_v, Tensor pages, "
      "Tensor block_table, Tensor seq_lens, Tensor codebook_k, Tensor signs_k, Tensor weight_k, "
      "Tensor mean_k, Tensor codebook_v, Tensor signs_v, Tensor weight_v, Tensor mean_v, "
      "int[] k_format, int[] v_format, float scale, int num_splits) -> Tensor");
  m.def(SEQKV_WRITE_TRANSFORM_SCHEMA);
  m.def(SEQKV_TRANSFORM_DECODE_SCHEMA);
}

// An empty Python module named _C (the build names the extension vllm_seqkv._C).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "seqkv CUDA ops (torch.ops.seqkv)", -1, nullptr};
  return PyModule_Create(&module);
}
