// seqkv::write_transform_slots — code new tokens' K/V into transform-format page slots.
//
// Same algorithm as the Triton kernel (vllm_seqkv/kernels/write.py), written plainly,
// float32 throughout, with the per-element math of transform_format.cuh:
//   r = x - (prev @ W + b)   (cross-layer streams)
//   z = (r - mean) @ basis,  code = #{cuts < z},  bit-pack at start/nbits,
//   store at pages[slot // bs, h, slot % bs]  (slot -1: skipped).
// Launch: grid [T, H], one block per token-head, blockDim = D (one thread per component, then
// one per output byte). Shared memory: 2 D floats (residual row, codes) = 2 KiB at D = 256;
// registers: a few scalars per thread (each z is a D-long dot product from global/L1).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "torch_cuda_compat.cuh"
#include "transform_args.h"
#include "transform_format.cuh"

namespace seqkv {
namespace transform {
namespace {

// One stream of one token-head: residual -> z -> codes -> bytes. Every thread of the block calls it.
template <typename scalar_t>
__device__ void encode_stream(const scalar_t* x_row, const float* prev_k_row, const float* prev_v_row,
                              const StreamTables& s, int h, int heads, int dim, float* residual,
                              int* codes, uint8_t* slot) {
  const int c = threadIdx.x;  // blockDim.x == dim
  const int hd = heads * dim;
  float r = static_cast<float>(x_row[c]);
  if (s.has_pred) r -= predict_element(prev_k_row, prev_v_row, s.pred_w, s.pred_b, hd, h * dim + c);
  residual[c] = r;
  __syncthreads();
  const int hc = h * dim + c;
  const float z = component_z(residual, s.mean + h * dim, s.basis + static_cast<int64_t>(h) * dim * dim, c, dim);
  codes[c] = quantize(s.cuts + s.level_start[hc], s.nbits[hc], z);
  __syncthreads();
  for (int j = c; j < s.nbytes; j += blockDim.x) {
    slot[s.offset + j] = pack_byte(codes, s.start + h * dim, s.nbits + h * dim, dim, j);
  }
  __syncthreads();  // residual/codes are reused by the next stream
}

template <typename scalar_t, typename index_t>
__global__ void write_transform_kernel(const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                       const index_t* __restrict__ slot_mapping, uint8_t* __restrict__ pages,
                                       const float* __restrict__ prev_k, const float* __restrict__ prev_v,
                                       StreamTables ks, StreamTables vs, int heads, int dim, int block_size,
                                       int64_t stride_kt, int64_t stride_kh, int64_t stride_vt, int64_t stride_vh,
                                       int64_t stride_pb, int64_t stride_ph, int64_t stride_pt) {
  extern __shared__ float smem[];
  float* residual = smem;                                 // [D]
  int* codes = reinterpret_cast<int*>(smem + dim);        // [D]
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t slot_id = static_cast<int64_t>(slot_mapping[t]);
  if (slot_id < 0) return;  // whole block exits together: no barrier is skipped by part of it
  uint8_t* slot = pages + (slot_id / block_size) * stride_pb + h * stride_ph + (slot_id % block_size) * stride_pt;
  const int64_t prev_row = static_cast<int64_t>(t) * heads * dim;
  const float* pk = prev_k ? prev_k + prev_row : nullptr;
  const float* pv = prev_v ? prev_v + prev_row : nullptr;
  encode_stream(key + t * stride_kt + h * stride_kh, pk, pv, ks, h, heads, dim, residual, codes, slot);
  encode_stream(value + t * stride_vt + h * stride_vh, pk, pv, vs, h, heads, dim, residual, codes, slot);
}

void write_transform_slots(const at::Tensor& key_in, const at::Tensor& value_in, const at::Tensor& slot_mapping,
                           at::Tensor& pages, const std::optional<at::Tensor>& prev_k,
                           const std::optional<at::Tensor>& prev_v, at::TensorList k_tables,
                           at::TensorList v_tables, at::IntArrayRef k_format, at::IntArrayRef v_format) {
  TORCH_CHECK(pages.is_cuda(), "pages must be a CUDA tensor");
  check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(key_in.dim() == 3 && key_in.size(1) == heads && is_float(key_in) && key_in.stride(2) == 1 &&
                  key_in.device() == pages.device(),
              "key must be float [T, H, D] (last dim contiguous) on the pages' device, H = pages.size(1)");
  const int64_t tokens = key_in.size(0), dim = key_in.size(2);
  check_head_dim(dim);
  TORCH_CHECK(value_in.sizes() == key_in.sizes() && is_float(value_in) && value_in.stride(2) == 1 &&
                  value_in.device() == pages.device(), "value must match key");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens && slot_mapping.is_contiguous() &&
                  slot_mapping.device() == pages.device(), "slot_mapping must be contiguous [T]");
  const StreamTables ks = stream_tables(k_tables, k_format, pages, heads, dim);
  const StreamTables vs = stream_tables(v_tables, v_format, pages, heads, dim);
  const bool has_prev = check_previous(prev_k, prev_v, ks.has_pred || vs.has_pred, tokens * heads * dim, pages);
  if (tokens == 0) return;
  // one dtype for both streams (a mixed pair is read as float32), previous rows as float32
  const bool same = key_in.scalar_type() == value_in.scalar_type();
  const at::Tensor key = same ? key_in : key_in.to(at::kFloat);
  const at::Tensor value = same ? value_in : value_in.to(at::kFloat);
  at::Tensor pk, pv;
  if (has_prev) {
    pk = prev_k->to(at::kFloat).contiguous();
    pv = prev_v->to(at::kFloat).contiguous();
  }
  const c10::DeviceGuard guard(pages.device());
  const cudaStream_t stream = current_stream();
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(heads));
  const size_t smem = 2 * dim * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "seqkv_write_transform", [&] {
    using kv_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "seqkv_write_transform_index", [&] {
      write_transform_kernel<kv_t, index_t><<<grid, static_cast<unsigned>(dim), smem, stream>>>(
          key.data_ptr<kv_t>(), value.data_ptr<kv_t>(), slot_mapping.data_ptr<index_t>(), pages.data_ptr<uint8_t>(),
          has_prev ? pk.data_ptr<float>() : nullptr, has_prev ? pv.data_ptr<float>() : nullptr, ks, vs,
          static_cast<int>(heads), static_cast<int>(dim), static_cast<int>(block_size), key.stride(0),
          key.stride(1), value.stride(0), value.stride(1), pages.stride(0), pages.stride(1), pages.stride(2));
    });
  });
  SEQKV_CHECK_LAUNCH();
}

}  // namespace
}  // namespace transform

TORCH_LIBRARY_IMPL(seqkv, CUDA, m) { m.impl("write_transform_slots", &transform::write_transform_slots); }

}  // namespace seqkv
