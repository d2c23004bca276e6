// Host-side argument handling of the transform-format ops, shared by the CUDA ops
// (write.cu, decode.cu) and the CPU host test
// (tests/kernels/transform_host.cpp), so both read the op arguments the same way.
//
// Schemas (registered in registration.cpp; the host test registers the same strings under the
// namespace seqkv_host):
//   write_transform_slots(key, value, slot_mapping, pages!, prev_k?, prev_v?, k_tables, v_tables,
//                         k_format, v_format) -> ()
//   transform_decode_attention(query, own_k, own_v, pages, block_table, seq_lens, rope?, prev_k?,
//                              prev_v?, k_tables, v_tables, k_format, v_format, scale, num_splits,
//                              skip_first) -> (out, lse)
// A stream's tables: [start, nbits, level_start, levels, cuts, basis, inverse, mean, pred_w, pred_b] (see
// StreamTables in transform_format.cuh; vllm_seqkv/kernels/cuda_ops.py stream_tables);
// a stream's format: [offset, nbytes, has_pred].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "transform_format.cuh"
#include "transform_schema.h"


namespace seqkv {
namespace transform {

inline void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype,
                        std::initializer_list<int64_t> shape, const at::Tensor& pages) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == pages.device(),
              "transform table ", name, " must be a contiguous ", dtype, " tensor on the pages' device");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "transform table ", name, ": expected shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

// The tensors of one stream -> StreamTables (pointers into them), with shape/dtype/device checks.
inline StreamTables stream_tables(at::TensorList t, at::IntArrayRef format, const at::Tensor& pages,
                                  int64_t heads, int64_t dim) {
  TORCH_CHECK(t.size() == 10, "a stream's tables are [start, nbits, level_start, levels, cuts, basis, "
              "inverse, mean, pred_w, pred_b], got ", t.size(), " tensors");
  TORCH_CHECK(format.size() == 3, "a stream's format is [offset, nbytes, has_pred]");
  const bool has_pred = format[2] != 0;
  check_table(t[0], "start", at::kInt, {heads, dim}, pages);
  check_table(t[1], "nbits", at::kInt, {heads, dim}, pages);
  check_table(t[2], "level_start", at::kInt, {heads, dim}, pages);
  // packed levels/cuts: at least one entry per component (a 0-bit one has one level); that each
  // component's 2**nbits entries fit is checked where the tables are read on the host (CPU
  // ops) and guaranteed by the params builder (vllm_seqkv/kernels/params.py) on a GPU
  const int64_t entries = t[3].numel();
  TORCH_CHECK(t[3].dim() == 1 && entries >= heads * dim, "transform table levels must be packed 1-D with at "
              "least H * D = ", heads * dim, " entries, got ", t[3].sizes());
  check_table(t[3], "levels", at::kFloat, {entries}, pages);
  check_table(t[4], "cuts", at::kFloat, {entries}, pages);
  check_table(t[5], "basis", at::kFloat, {heads, dim, dim}, pages);
  check_table(t[6], "inverse", at::kFloat, {heads, dim, dim}, pages);
  check_table(t[7], "mean", at::kFloat, {heads, dim}, pages);
  if (has_pred) {
    check_table(t[8], "pred_w", at::kFloat, {2 * heads * dim, heads * dim}, pages);
    check_table(t[9], "pred_b", at::kFloat, {heads * dim}, pages);
  } else {
    TORCH_CHECK(t[8].device() == pages.device() && t[9].device() == pages.device(),
                "pred_w/pred_b must be on the pages' device");
  }
  const int64_t slot_bytes = pages.size(3);
  TORCH_CHECK(format[0] >= 0 && format[1] > 0 && format[0] + format[1] <= slot_bytes,
              "stream [offset ", format[0], ", nbytes ", format[1], "] does not fit a ", slot_bytes, "-byte slot");
  return StreamTables{t[0].data_ptr<int32_t>(), t[1].data_ptr<int32_t>(), t[2].data_ptr<int32_t>(),
                      t[3].data_ptr<float>(),   t[4].data_ptr<float>(),   t[5].data_ptr<float>(),
                      t[6].data_ptr<float>(),   t[7].data_ptr<float>(),
                      has_pred ? t[8].data_ptr<float>() : nullptr, has_pred ? t[9].data_ptr<float>() : nullptr,
                      static_cast<int>(format[0]), static_cast<int>(format[1]), has_pred};
}

inline void check_pages(const at::Tensor& pages) {
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 4 && pages.stride(3) == 1,
              "pages must be uint8 [num_blocks, num_kv_heads, block_size, slot_bytes], last dim contiguous");
}

inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_head_dim(int64_t dim) {
  TORCH_CHECK(dim >= 32 && dim <= 256 && dim % 32 == 0, "head_dim must be a multiple of 32 in [32, 256], got ", dim);
}

// prev_k / prev_v: both or neither; when given: contiguous float [rows..., H, D] of `numel` elements.
inline bool check_previous(const std::optional<at::Tensor>& prev_k, const std::optional<at::Tensor>& prev_v,
                           bool needed, int64_t numel, const at::Tensor& pages) {
  const bool given = prev_k.has_value() && prev_k->defined();
  TORCH_CHECK(given == (prev_v.has_value() && prev_v->defined()), "pass both prev_k and prev_v or neither");
  TORCH_CHECK(!needed || given, "this layer is cross-layer predicted: prev_k/prev_v (the layer below's "
              "reconstruction) are required");
  if (!given) return false;
  for (const auto* t : {&*prev_k, &*prev_v}) {
    TORCH_CHECK(is_float(*t) && t->is_contiguous() && t->device() == pages.device() && t->numel() == numel,
                "prev_k/prev_v must be contiguous float tensors of ", numel, " elements on the pages' device");
  }
  TORCH_CHECK(prev_k->scalar_type() == prev_v->scalar_type(), "prev_k and prev_v must have one dtype");
  return true;
}

}  // namespace transform
}  // namespace seqkv
