// seqkv::write_slots — quantize rotated unit vectors and bit-pack them into page slots.
//
// The predictor/norm/rotation run in torch (vllm_seqkv/kernels/write_slots.py rotate_stream);
// this op does what the Triton write kernel does: Lloyd-Max thresholds, bit packing, scatter.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "slot_format.cuh"
#include "../torch_cuda_compat.cuh"

namespace seqkv {
namespace {

StreamFormat to_format(at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 5, "stream format must be [bits_a, bits_b, norm_off, off_a, off_b]");
  return StreamFormat{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                      static_cast<int>(v[3]), static_cast<int>(v[4])};
}

// One thread per output byte of one half of one stream.
__device__ void pack_half(const float* unit, const float* bounds, int first_coord, int bits,
                          int nbytes, uint8_t* field) {
  for (int j = threadIdx.x; j < nbytes; j += blockDim.x) {
    int byte = 0;
    for (int k = 0; k < 8; ++k) {
      const int bit = j * 8 + k;
      const float u = unit[first_coord + bit / bits];
      int code = 0;
      for (int level = 0; level < (1 << bits) - 1; ++level) code += u > bounds[level];
      byte |= ((code >> (bit % bits)) & 1) << k;
    }
    field[j] = static_cast<uint8_t>(byte);
  }
}

__device__ void write_stream(const float* unit, const uint8_t* norm, const float* bounds,
                             int head_dim, const StreamFormat& f, uint8_t* slot) {
  if (threadIdx.x < 2) slot[f.norm_off + threadIdx.x] = norm[threadIdx.x];
  pack_half(unit, bounds, 0, f.bits_a, head_dim / 2 * f.bits_a / 8, slot + f.off_a);
  pack_half(unit, bounds + (1 << f.bits_a) - 1, head_dim / 2, f.bits_b,
            head_dim / 2 * f.bits_b / 8, slot + f.off_b);
}

template <typename index_t>
__global__ void write_slots_kernel(const float* __restrict__ unit_k, const uint8_t* __restrict__ norm_k,
                                   const float* __restrict__ unit_v, const uint8_t* __restrict__ norm_v,
                                   const index_t* __restrict__ slot_mapping, uint8_t* __restrict__ pages,
                                   const float* __restrict__ bounds_k, const float* __restrict__ bounds_v,
                                   int num_heads, int head_dim, int block_size, int64_t stride_pb,
                                   int64_t stride_ph, int64_t stride_pt, StreamFormat kf, StreamFormat vf) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t slot_id = static_cast<int64_t>(slot_mapping[t]);
  if (slot_id < 0) return;
  uint8_t* slot = pages + (slot_id / block_size) * stride_pb + h * stride_ph +
                  (slot_id % block_size) * stride_pt;
  const int64_t row = static_cast<int64_t>(t) * num_heads + h;
  write_stream(unit_k + row * head_dim, norm_k + row * 2, bounds_k, head_dim, kf, slot);
  write_stream(unit_v + row * head_dim, norm_v + row * 2, bounds_v, head_dim, vf, slot);
}

void write_slots(const at::Tensor& unit_k, const at::Tensor& norm_k, const at::Tensor& unit_v,
                 const at::Tensor& norm_v, const at::Tensor& slot_mapping, at::Tensor& pages,
                 const at::Tensor& bounds_k, const at::Tensor& bounds_v, at::IntArrayRef k_format,
                 at::IntArrayRef v_format) {
  TORCH_CHECK(pages.is_cuda() && pages.scalar_type() == at::kByte && pages.dim() == 4,
              "pages must be a CUDA uint8 [num_blocks, num_kv_heads, block_size, slot_bytes] tensor");
  TORCH_CHECK(pages.stride(3) == 1, "pages: last dimension must be contiguous");
  TORCH_CHECK(unit_k.scalar_type() == at::kFloat && unit_k.is_contiguous() && unit_k.dim() == 3,
              "unit_k must be contiguous float32 [T, H, D]");
  TORCH_CHECK(unit_v.sizes() == unit_k.sizes() && unit_v.scalar_type() == at::kFloat &&
                  unit_v.is_contiguous(), "unit_v must match unit_k");
  TORCH_CHECK(norm_k.scalar_type() == at::kHalf && norm_k.is_contiguous() &&
                  norm_k.numel() == unit_k.size(0) * unit_k.size(1), "norm_k must be contiguous fp16 [T, H(, 1)]");
  TORCH_CHECK(norm_v.scalar_type() == at::kHalf && norm_v.is_contiguous() && norm_v.numel() == norm_k.numel(),
              "norm_v must match norm_k");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == unit_k.size(0) && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous [T]");
  TORCH_CHECK(unit_k.size(1) == pages.size(1), "head count of K/V and pages differ");
  TORCH_CHECK(bounds_k.scalar_type() == at::kFloat && bounds_v.scalar_type() == at::kFloat,
              "boundaries must be float32");
  const int tokens = unit_k.size(0), heads = unit_k.size(1), head_dim = unit_k.size(2);
  if (tokens == 0) return;
  const c10::DeviceGuard guard(pages.device());
  const cudaStream_t stream = current_stream();
  const dim3 grid(tokens, heads);
  AT_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "seqkv_write_slots", [&] {
    write_slots_kernel<index_t><<<grid, 64, 0, stream>>>(
        unit_k.data_ptr<float>(), reinterpret_cast<const uint8_t*>(norm_k.data_ptr()),
        unit_v.data_ptr<float>(), reinterpret_cast<const uint8_t*>(norm_v.data_ptr()),
        slot_mapping.data_ptr<index_t>(), pages.data_ptr<uint8_t>(), bounds_k.data_ptr<float>(),
        bounds_v.data_ptr<float>(), heads, head_dim, pages.size(2), pages.stride(0),
        pages.stride(1), pages.stride(2), to_format(k_format), to_format(v_format));
  });
  SEQKV_CHECK_LAUNCH();
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkv, CUDA, m) { m.impl("write_slots", &write_slots); }

}  // namespace seqkv
