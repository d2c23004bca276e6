// seqkv::transform_decode_attention — one query token per sequence over transform-format pages.
//
// Same algorithm as the Triton kernel (vllm_seqkv/kernels/decode.py), written plainly
// with float32 math (CUDA cores, no tensor cores) and the per-element functions of
// transform_format.cuh:
//   keys:   levels -> z_k @ inverse_k + mean_k (+ [prev_k, prev_v] @ W_k + b_k) -> RoPE at the
//           position (rope table, optional) -> scores against the GQA group's queries;
//   values: never rebuilt: the block accumulates sum_j p_j z_v,j (and, cross-layer,
//           sum_j p_j pred_v,j); the reduce applies inverse_v and mean_v once per query head.
// Cached positions [skip_first, seq_len - 1) are read; seq_len - 1 is the exact own token.
//
// Launches:
//   transform_decode_partial_kernel  grid [splits, H_kv, B], kPartialThreads threads: one GQA
//     group over one chunk of context, kTile positions per step (online softmax); writes the
//     level sum, prediction sum, max and sum of each (query head, split).
//   transform_decode_reduce_kernel   grid [B * Hq], D threads: merges the splits, applies
//     inverse_v / mean_v, adds the own token, writes out and lse.
// Shared memory of the partial kernel (floats): G*D queries, 2*kTile*D level / key rows,
// G*kTile probabilities, G*D (x2 when values are cross-layer) accumulators, 3*G softmax state,
// plus the key's D x D inverse when it fits the device's per-block opt-in limit (D = 128:
// 64 KiB + ~29 KiB at G = 8; otherwise the inverse is read from global memory / L1).
// Registers: scalars only (every thread walks index ranges of the shared buffers).
// Cost per token-head: D^2 MACs for the key (+ 2 H D^2 per predicted stream), 2 D per query
// head. No GPU time has been measured for these kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "torch_cuda_compat.cuh"
#include "transform_args.h"
#include "transform_format.cuh"

namespace seqkv {
namespace transform {
namespace {

constexpr int kPartialThreads = 128;
constexpr int kTile = kDecodeTile;
constexpr size_t kDefaultSmem = 48 * 1024;

// Sum over the block (any blockDim <= 1024); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  int width = 1;
  while (width < static_cast<int>(blockDim.x)) width <<= 1;
  for (int s = width / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s && static_cast<int>(threadIdx.x) + s < static_cast<int>(blockDim.x)) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();
  return result;
}

struct PartialSmem {
  size_t inverse, rest;  // bytes
};

PartialSmem partial_smem(int dim, int group, bool v_pred) {
  const size_t floats = static_cast<size_t>(group) * dim * (v_pred ? 3 : 2) + 2 * kTile * dim +
                        static_cast<size_t>(group) * kTile + 3 * group;
  return PartialSmem{static_cast<size_t>(dim) * dim * sizeof(float), floats * sizeof(float)};
}

template <typename prev_t, typename index_t>
__global__ void transform_decode_partial_kernel(
    const float* __restrict__ query, const uint8_t* __restrict__ pages, const index_t* __restrict__ block_table,
    const index_t* __restrict__ seq_lens, const float* __restrict__ rope, const prev_t* __restrict__ prev_k,
    const prev_t* __restrict__ prev_v, StreamTables ks, StreamTables vs, float* __restrict__ acc_out,
    float* __restrict__ pred_acc_out, float* __restrict__ max_out, float* __restrict__ sum_out, int heads,
    int q_heads, int group, int dim, int block_size, int chunk_tokens, int max_tokens, int64_t stride_pb,
    int64_t stride_ph, int64_t stride_pt, int64_t stride_bt, int64_t prev_rows_per_seq, float scale,
    int skip_first, bool inverse_in_smem) {
  extern __shared__ float smem[];
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, num_splits = gridDim.x;
  const int D = dim, G = group, tid = threadIdx.x, nthreads = blockDim.x;
  const bool v_pred = vs.has_pred;
  float* p = smem;
  float* inverse_s = p;
  if (inverse_in_smem) p += D * D;
  float* q = p;       p += G * D;
  float* zbuf = p;    p += kTile * D;   // levels of kTile rows (keys, then values)
  float* kbuf = p;    p += kTile * D;   // rebuilt keys, then value predictions
  float* probs = p;   p += G * kTile;   // scores, then probabilities
  float* acc = p;     p += G * D;
  float* pacc = p;    if (v_pred) p += G * D;
  float* run_max = p; p += G;
  float* run_sum = p; p += G;
  float* alpha = p;

  const float* inverse_k = ks.inverse + static_cast<int64_t>(kvh) * D * D;
  if (inverse_in_smem) {
    for (int i = tid; i < D * D; i += nthreads) inverse_s[i] = inverse_k[i];
    inverse_k = inverse_s;
  }
  const float* q_src = query + (static_cast<int64_t>(b) * q_heads + kvh * G) * D;
  for (int i = tid; i < G * D; i += nthreads) {
    q[i] = q_src[i];
    acc[i] = 0.f;
    if (v_pred) pacc[i] = 0.f;
  }
  for (int g = tid; g < G; g += nthreads) {
    run_max[g] = kNegBig;
    run_sum[g] = 0.f;
  }
  __syncthreads();

  const int cached_len = static_cast<int>(seq_lens[b]) - 1;  // the last position is the own token
  const int start = max(split * chunk_tokens, skip_first);
  const int end = min(min((split + 1) * chunk_tokens, cached_len), max_tokens);
  const float* mean_k = ks.mean + kvh * D;
  const int hd = heads * D;
  auto slot_of = [&](int pos) {
    const int64_t block = static_cast<int64_t>(block_table[b * stride_bt + pos / block_size]);
    return pages + block * stride_pb + kvh * stride_ph + (pos % block_size) * stride_pt;
  };
  auto prev_row = [&](int pos) { return (static_cast<int64_t>(b) * prev_rows_per_seq + pos) * hd; };

  for (int t0 = start; t0 < end; t0 += kTile) {
    const int n = min(kTile, end - t0);
    for (int i = tid; i < n * D; i += nthreads) zbuf[i] = component_level(ks, slot_of(t0 + i / D), kvh, i % D, D);
    __syncthreads();
    for (int i = tid; i < n * D; i += nthreads) {
      const int j = i / D, d = i % D;
      float k = rebuild_element(zbuf + j * D, inverse_k, mean_k, d, D);
      if (ks.has_pred) {
        const int64_t row = prev_row(t0 + j);
        k += predict_element(prev_k + row, prev_v + row, ks.pred_w, ks.pred_b, hd, kvh * D + d);
      }
      kbuf[i] = k;
    }
    __syncthreads();
    if (rope != nullptr) {
      const int half = D / 2;
      for (int i = tid; i < n * half; i += nthreads) {
        const int j = i / half;
        rope_pair(kbuf + j * D, rope + static_cast<int64_t>(t0 + j) * D, i % half, D);
      }
      __syncthreads();
    }
    for (int i = tid; i < G * n; i += nthreads) {
      const int g = i / n, j = i % n;
      probs[g * kTile + j] = row_dot(q + g * D, kbuf + j * D, D) * scale;
    }
    __syncthreads();
    for (int g = tid; g < G; g += nthreads) alpha[g] = online_softmax_tile(probs + g * kTile, n, run_max[g], run_sum[g]);
    // zbuf was last read before the barrier after the key rebuild, kbuf before the one above
    for (int i = tid; i < n * D; i += nthreads) zbuf[i] = component_level(vs, slot_of(t0 + i / D), kvh, i % D, D);
    if (v_pred) {
      for (int i = tid; i < n * D; i += nthreads) {
        const int64_t row = prev_row(t0 + i / D);
        kbuf[i] = predict_element(prev_k + row, prev_v + row, vs.pred_w, vs.pred_b, hd, kvh * D + i % D);
      }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += nthreads) {
      const int g = i / D, c = i % D;
      const float* pg = probs + g * kTile;
      float a = acc[i] * alpha[g];
      for (int j = 0; j < n; ++j) a += pg[j] * zbuf[j * D + c];
      acc[i] = a;
      if (v_pred) {
        float pa = pacc[i] * alpha[g];
        for (int j = 0; j < n; ++j) pa += pg[j] * kbuf[j * D + c];
        pacc[i] = pa;
      }
    }
    __syncthreads();
  }
  const int64_t first_state = (static_cast<int64_t>(b) * q_heads + kvh * G) * num_splits + split;
  for (int i = tid; i < G * D; i += nthreads) {
    const int g = i / D, c = i % D;
    const int64_t state = first_state + static_cast<int64_t>(g) * num_splits;
    acc_out[state * D + c] = acc[i];
    if (v_pred) pred_acc_out[state * D + c] = pacc[i];
  }
  for (int g = tid; g < G; g += nthreads) {
    const int64_t state = first_state + static_cast<int64_t>(g) * num_splits;
    max_out[state] = run_max[g];
    sum_out[state] = run_sum[g];
  }
}

// One block per (sequence, query head), D threads.
template <typename out_t>
__global__ void transform_decode_reduce_kernel(const float* __restrict__ query, const float* __restrict__ own_k,
                                               const float* __restrict__ own_v, out_t* __restrict__ out,
                                               float* __restrict__ lse, const float* __restrict__ acc,
                                               const float* __restrict__ pred_acc, const float* __restrict__ split_max,
                                               const float* __restrict__ split_sum, const float* __restrict__ inverse_v,
                                               const float* __restrict__ mean_v, int heads, int q_heads, int group,
                                               int num_splits, float scale) {
  extern __shared__ float smem[];  // [D] level sum, [D] scratch
  const int D = blockDim.x, d = threadIdx.x;
  const int64_t row = blockIdx.x;  // b * q_heads + hq
  const int b = static_cast<int>(row / q_heads), kvh = static_cast<int>(row % q_heads) / group;
  const int64_t own = (static_cast<int64_t>(b) * heads + kvh) * D;
  const float own_score = block_sum(query[row * D + d] * own_k[own + d], smem + D) * scale;
  const int64_t first = row * num_splits;
  const SplitMerge m = merge_splits(split_max + first, split_sum + first, num_splits, own_score);
  float level = 0.f, pred = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float w = split_weight(m, split_max[first + s]);
    level += w * acc[(first + s) * D + d];
    if (pred_acc != nullptr) pred += w * pred_acc[(first + s) * D + d];
  }
  smem[d] = level;
  __syncthreads();
  const float cached = inverse_dot(smem, inverse_v + static_cast<int64_t>(kvh) * D * D, d, D) +
                       mean_v[kvh * D + d] * m.mass + pred;
  out[row * D + d] = static_cast<out_t>(merged_output(m, cached, own_v[own + d]));
  if (d == 0) lse[row] = merged_lse(m);
}

std::tuple<at::Tensor, at::Tensor> transform_decode_attention(
    const at::Tensor& query_in, const at::Tensor& own_k_in, const at::Tensor& own_v_in, const at::Tensor& pages,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const std::optional<at::Tensor>& rope,
    const std::optional<at::Tensor>& prev_k, const std::optional<at::Tensor>& prev_v, at::TensorList k_tables,
    at::TensorList v_tables, at::IntArrayRef k_format, at::IntArrayRef v_format, double scale, int64_t num_splits,
    int64_t skip_first) {
  TORCH_CHECK(pages.is_cuda(), "pages must be a CUDA tensor");
  check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(query_in.dim() == 3 && is_float(query_in) && query_in.device() == pages.device(),
              "query must be float [B, Hq, D] on the pages' device");
  const int64_t batch = query_in.size(0), q_heads = query_in.size(1), dim = query_in.size(2);
  check_head_dim(dim);
  TORCH_CHECK(q_heads % heads == 0, "query heads must be a multiple of kv heads");
  for (const auto* t : {&own_k_in, &own_v_in}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({batch, heads, dim}) && is_float(*t) && t->device() == pages.device(),
                "own_k/own_v must be float [B, H, D] on the pages' device");
  }
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch && block_table.stride(1) == 1 &&
                  block_table.device() == pages.device(), "block_table must be [B, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch && seq_lens.is_contiguous() &&
                  seq_lens.scalar_type() == block_table.scalar_type() && seq_lens.device() == pages.device(),
              "seq_lens must be contiguous [B] in block_table's dtype");
  TORCH_CHECK(skip_first >= 0, "skip_first must be >= 0");
  const bool has_rope = rope.has_value() && rope->defined();
  if (has_rope) {
    TORCH_CHECK(rope->dim() == 2 && rope->size(1) == dim && rope->scalar_type() == at::kFloat &&
                    rope->is_contiguous() && rope->device() == pages.device(),
                "rope must be a contiguous float32 [P, D] table on the pages' device");
  }
  const StreamTables ks = stream_tables(k_tables, k_format, pages, heads, dim);
  const StreamTables vs = stream_tables(v_tables, v_format, pages, heads, dim);
  const int64_t max_tokens = block_table.size(1) * block_size;
  const bool has_prev =
      check_previous(prev_k, prev_v, ks.has_pred || vs.has_pred, batch * max_tokens * heads * dim, pages);
  auto out = at::empty(query_in.sizes(), query_in.options());
  auto lse = at::empty({batch, q_heads}, query_in.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};

  const auto query = query_in.to(at::kFloat).contiguous();
  const auto own_k = own_k_in.to(at::kFloat).contiguous();
  const auto own_v = own_v_in.to(at::kFloat).contiguous();
  const int64_t splits = choose_splits(num_splits, batch, heads, max_tokens);
  const int64_t chunk = (max_tokens + splits - 1) / splits;
  const auto f32 = query_in.options().dtype(at::kFloat);
  auto acc = at::empty({batch, q_heads, splits, dim}, f32);
  auto pred_acc = vs.has_pred ? at::empty({batch, q_heads, splits, dim}, f32) : at::Tensor();
  auto split_max = at::empty({batch, q_heads, splits}, f32);
  auto split_sum = at::empty({batch, q_heads, splits}, f32);
  const int group = static_cast<int>(q_heads / heads);

  const c10::DeviceGuard guard(pages.device());
  const cudaStream_t stream = current_stream();
  int optin = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, pages.device().index()) ==
                  cudaSuccess, "cudaDeviceGetAttribute failed");
  const PartialSmem need = partial_smem(static_cast<int>(dim), group, vs.has_pred);
  TORCH_CHECK(need.rest <= static_cast<size_t>(optin), "transform decode: GQA group ", group, " x head_dim ", dim,
              " needs ", need.rest, " bytes of shared memory, the device allows ", optin);
  const bool inverse_in_smem = need.rest + need.inverse <= static_cast<size_t>(optin);
  const size_t partial_bytes = need.rest + (inverse_in_smem ? need.inverse : 0);
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  const at::ScalarType prev_type = has_prev ? prev_k->scalar_type() : at::kFloat;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev_type, "seqkv_transform_decode_partial", [&] {
    using prev_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(block_table.scalar_type(), "seqkv_transform_decode_partial_index", [&] {
      auto kernel = transform_decode_partial_kernel<prev_t, index_t>;
      if (partial_bytes > kDefaultSmem) {
        TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(partial_bytes)) == cudaSuccess,
                    "cudaFuncSetAttribute (dynamic shared memory) failed");
      }
      kernel<<<grid, kPartialThreads, partial_bytes, stream>>>(
          query.data_ptr<float>(), pages.data_ptr<uint8_t>(), block_table.data_ptr<index_t>(),
          seq_lens.data_ptr<index_t>(), has_rope ? rope->data_ptr<float>() : nullptr,
          has_prev ? prev_k->data_ptr<prev_t>() : nullptr, has_prev ? prev_v->data_ptr<prev_t>() : nullptr, ks, vs,
          acc.data_ptr<float>(), vs.has_pred ? pred_acc.data_ptr<float>() : nullptr, split_max.data_ptr<float>(),
          split_sum.data_ptr<float>(), static_cast<int>(heads), static_cast<int>(q_heads), group,
          static_cast<int>(dim), static_cast<int>(block_size), static_cast<int>(chunk),
          static_cast<int>(max_tokens), pages.stride(0), pages.stride(1), pages.stride(2), block_table.stride(0),
          max_tokens, static_cast<float>(scale), static_cast<int>(skip_first), inverse_in_smem);
    });
  });
  SEQKV_CHECK_LAUNCH();
  const size_t reduce_bytes = 2 * dim * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "seqkv_transform_decode_reduce", [&] {
    transform_decode_reduce_kernel<scalar_t><<<static_cast<unsigned>(batch * q_heads), static_cast<unsigned>(dim),
                                               reduce_bytes, stream>>>(
        query.data_ptr<float>(), own_k.data_ptr<float>(), own_v.data_ptr<float>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), acc.data_ptr<float>(), vs.has_pred ? pred_acc.data_ptr<float>() : nullptr,
        split_max.data_ptr<float>(), split_sum.data_ptr<float>(), vs.inverse, vs.mean, static_cast<int>(heads),
        static_cast<int>(q_heads), group, static_cast<int>(splits), static_cast<float>(scale));
  });
  SEQKV_CHECK_LAUNCH();
  return {out, lse};
}

}  // namespace
}  // namespace transform

TORCH_LIBRARY_IMPL(seqkv, CUDA, m) {
  m.impl("transform_decode_attention", &transform::transform_decode_attention);
}

}  // namespace seqkv
