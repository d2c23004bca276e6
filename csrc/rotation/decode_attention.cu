// seqkv::paged_decode_attention — one query token per sequence over compressed pages.
//
// Same algorithm as the Triton kernel (vllm_seqkv/kernels/decode_attention.py), written
// plainly: keys are scored in the rotated domain (q' = H S (q / w) / sqrt(D), q.k =
// n (q'.c) + q.mean), values are summed in the rotated domain and rotated back once.
// Launches: rotate_queries [B*Hq], decode_partial [splits, Hq, B] (one query head, one chunk
// of context per block), decode_reduce [B*Hq] (merge chunks + exact own token + rotate back).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "slot_format.cuh"
#include "../torch_cuda_compat.cuh"

namespace seqkv {
namespace {

constexpr int kPartialThreads = 128;
constexpr int kMaxChunkTokens = 2048;  // scores + value norms in shared memory: 16 KiB
constexpr int kTargetChunkTokens = 512;
constexpr float kNegBig = -1.0e30f;

StreamFormat to_format(at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 5, "stream format must be [bits_a, bits_b, norm_off, off_a, off_b]");
  return StreamFormat{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]),
                      static_cast<int>(v[3]), static_cast<int>(v[4])};
}

// Reduction over a power-of-two block; every thread gets the result.
__device__ float block_reduce(float v, float* scratch, bool take_max) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float other = scratch[threadIdx.x + s];
      scratch[threadIdx.x] = take_max ? fmaxf(scratch[threadIdx.x], other) : scratch[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();
  return result;
}

// One block per (sequence, query head), head_dim threads.
template <typename scalar_t>
__global__ void rotate_queries_kernel(const scalar_t* __restrict__ query, int64_t stride_qb,
                                      int64_t stride_qh, const float* __restrict__ signs,
                                      const float* __restrict__ weight, const float* __restrict__ mean,
                                      float* __restrict__ q_rot, float* __restrict__ q_mu,
                                      int num_q_heads, int group) {
  extern __shared__ float smem[];  // [D] scaled query, [D] scratch
  const int D = blockDim.x, d = threadIdx.x;
  const int b = blockIdx.x / num_q_heads, hq = blockIdx.x % num_q_heads, kvh = hq / group;
  const float q = static_cast<float>(query[b * stride_qb + hq * stride_qh + d]);
  smem[d] = q * signs[d] / weight[kvh * D + d];
  __syncthreads();
  float acc = 0.f;
  for (int e = 0; e < D; ++e) acc += hadamard_entry(d, e) * smem[e];
  q_rot[static_cast<int64_t>(blockIdx.x) * D + d] = acc * rsqrtf(static_cast<float>(D));
  const float mu = block_reduce(q * mean[kvh * D + d], smem + D, false);
  if (d == 0) q_mu[blockIdx.x] = mu;
}

template <typename index_t>
__global__ void decode_partial_kernel(const float* __restrict__ q_rot, const float* __restrict__ q_mu,
                                      const uint8_t* __restrict__ pages, const index_t* __restrict__ block_table,
                                      const index_t* __restrict__ seq_lens,
                                      const float* __restrict__ codebook_k, const float* __restrict__ codebook_v,
                                      float* __restrict__ acc_out, float* __restrict__ max_out,
                                      float* __restrict__ sum_out, int64_t stride_pb, int64_t stride_ph,
                                      int64_t stride_pt, int64_t stride_bt, int block_size, int head_dim,
                                      int group, int chunk_tokens, float scale, StreamFormat kf,
                                      StreamFormat vf) {
  extern __shared__ float smem[];
  float* q_local = smem;                        // [D]
  float* weights = q_local + head_dim;          // [chunk] scores, then p_j * value norm
  float* scratch = weights + chunk_tokens;      // [threads]
  const int split = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const int num_q_heads = gridDim.y, num_splits = gridDim.x, kvh = hq / group;
  const int64_t row = static_cast<int64_t>(b) * num_q_heads + hq;
  const int cached_len = static_cast<int>(seq_lens[b]) - 1;  // last position = exact own token
  const int start = split * chunk_tokens;
  const int end = min(start + chunk_tokens, cached_len);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_local[d] = q_rot[row * head_dim + d];
  const float mu = q_mu[row];
  __syncthreads();

  auto slot_of = [&](int j) {
    const int64_t block = static_cast<int64_t>(block_table[b * stride_bt + j / block_size]);
    return pages + block * stride_pb + kvh * stride_ph + (j % block_size) * stride_pt;
  };
  float local_max = kNegBig;
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) {
    const uint8_t* slot = slot_of(j);
    float dot = 0.f;
    for (int d = 0; d < head_dim; ++d) dot += q_local[d] * codebook_k[codebook_index(slot, d, head_dim, kf)];
    const float score = (load_norm(slot, kf) * dot + mu) * scale;
    weights[j - start] = score;
    local_max = fmaxf(local_max, score);
  }
  const float top = block_reduce(local_max, scratch, true);
  float local_sum = 0.f;
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) {
    const float p = __expf(weights[j - start] - top);
    local_sum += p;
    weights[j - start] = p * load_norm(slot_of(j), vf);
  }
  const float total = block_reduce(local_sum, scratch, false);  // also orders the writes above
  const int64_t state = row * num_splits + split;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int j = start; j < end; ++j) acc += weights[j - start] * codebook_v[codebook_index(slot_of(j), d, head_dim, vf)];
    acc_out[state * head_dim + d] = acc;
  }
  if (threadIdx.x == 0) {
    max_out[state] = top;
    sum_out[state] = total;
  }
}

// One block per (sequence, query head), head_dim threads.
template <typename scalar_t>
__global__ void decode_reduce_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ own_k,
                                     const scalar_t* __restrict__ own_v, scalar_t* __restrict__ out,
                                     const float* __restrict__ acc, const float* __restrict__ split_max,
                                     const float* __restrict__ split_sum, const float* __restrict__ signs,
                                     const float* __restrict__ weight, const float* __restrict__ mean,
                                     int64_t stride_qb, int64_t stride_qh, int64_t stride_kb, int64_t stride_kh,
                                     int64_t stride_vb, int64_t stride_vh, int64_t stride_ob, int64_t stride_oh,
                                     int num_q_heads, int group, int num_splits, float scale) {
  extern __shared__ float smem[];  // [D] rotated sum, [D] scratch
  const int D = blockDim.x, d = threadIdx.x;
  const int b = blockIdx.x / num_q_heads, hq = blockIdx.x % num_q_heads, kvh = hq / group;
  const float q = static_cast<float>(query[b * stride_qb + hq * stride_qh + d]);
  const float own_score = block_reduce(q * static_cast<float>(own_k[b * stride_kb + kvh * stride_kh + d]),
                                       smem + D, false) * scale;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * num_splits;
  float top = own_score;
  for (int s = 0; s < num_splits; ++s) top = fmaxf(top, split_max[first + s]);
  float rotated = 0.f, cached_mass = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float w = __expf(split_max[first + s] - top);
    rotated += w * acc[(first + s) * D + d];
    cached_mass += w * split_sum[first + s];
  }
  smem[d] = rotated;
  __syncthreads();
  float back = 0.f;
  for (int e = 0; e < D; ++e) back += hadamard_entry(d, e) * smem[e];
  const float own_weight = __expf(own_score - top);
  const float cached = back * rsqrtf(static_cast<float>(D)) * signs[d] / weight[kvh * D + d] +
                       mean[kvh * D + d] * cached_mass;
  const float own = static_cast<float>(own_v[b * stride_vb + kvh * stride_vh + d]);
  out[b * stride_ob + hq * stride_oh + d] = static_cast<scalar_t>((cached + own_weight * own) / (cached_mass + own_weight));
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& pages) {
  TORCH_CHECK(t.device() == pages.device() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 tensor on the pages' device");
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& own_k, const at::Tensor& own_v,
                                  const at::Tensor& pages, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, const at::Tensor& codebook_k,
                                  const at::Tensor& signs_k, const at::Tensor& weight_k, const at::Tensor& mean_k,
                                  const at::Tensor& codebook_v, const at::Tensor& signs_v,
                                  const at::Tensor& weight_v, const at::Tensor& mean_v, at::IntArrayRef k_format,
                                  at::IntArrayRef v_format, double scale, int64_t num_splits) {
  TORCH_CHECK(pages.is_cuda() && pages.scalar_type() == at::kByte && pages.dim() == 4 && pages.stride(3) == 1,
              "pages must be a CUDA uint8 [num_blocks, num_kv_heads, block_size, slot_bytes] tensor");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [B, Hq, D] with contiguous last dim");
  const int64_t batch = query.size(0), q_heads = query.size(1), head_dim = query.size(2);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(head_dim >= 32 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0,
              "head_dim must be a power of two in [32, 256], got ", head_dim);
  TORCH_CHECK(q_heads % heads == 0, "query heads must be a multiple of kv heads");
  for (const auto* t : {&own_k, &own_v}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({batch, heads, head_dim}) && t->stride(2) == 1 &&
                    t->scalar_type() == query.scalar_type() && t->device() == pages.device(),
                "own_k/own_v must be [B, H, D] in query's dtype on the pages' device");
  }
  TORCH_CHECK(query.device() == pages.device(), "query must be on the pages' device");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch && block_table.stride(1) == 1 &&
                  block_table.device() == pages.device(), "block_table must be [B, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch && seq_lens.is_contiguous() &&
                  seq_lens.scalar_type() == block_table.scalar_type(), "seq_lens must be [B], block_table's dtype");
  check_param(codebook_k, "codebook_k", pages);
  check_param(signs_k, "signs_k", pages);
  check_param(weight_k, "weight_k", pages);
  check_param(mean_k, "mean_k", pages);
  check_param(codebook_v, "codebook_v", pages);
  check_param(signs_v, "signs_v", pages);
  check_param(weight_v, "weight_v", pages);
  check_param(mean_v, "mean_v", pages);
  auto out = at::empty_like(query);
  if (batch == 0) return out;

  const int64_t max_tokens = block_table.size(1) * block_size;
  int64_t splits = num_splits > 0 ? num_splits : (max_tokens + kTargetChunkTokens - 1) / kTargetChunkTokens;
  splits = std::max<int64_t>(splits, (max_tokens + kMaxChunkTokens - 1) / kMaxChunkTokens);
  splits = std::max<int64_t>(splits, 1);
  const int64_t chunk = (max_tokens + splits - 1) / splits;
  const auto f32 = query.options().dtype(at::kFloat);
  auto q_rot = at::empty({batch, q_heads, head_dim}, f32);
  auto q_mu = at::empty({batch, q_heads}, f32);
  auto acc = at::empty({batch, q_heads, splits, head_dim}, f32);
  auto split_max = at::empty({batch, q_heads, splits}, f32);
  auto split_sum = at::empty({batch, q_heads, splits}, f32);
  const int group = static_cast<int>(q_heads / heads);
  const c10::DeviceGuard guard(pages.device());
  const cudaStream_t stream = current_stream();
  const int rows = static_cast<int>(batch * q_heads);
  const size_t head_smem = 2 * head_dim * sizeof(float);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqkv_rotate_queries", [&] {
    rotate_queries_kernel<scalar_t><<<rows, head_dim, head_smem, stream>>>(
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1), signs_k.data_ptr<float>(),
        weight_k.data_ptr<float>(), mean_k.data_ptr<float>(), q_rot.data_ptr<float>(), q_mu.data_ptr<float>(),
        static_cast<int>(q_heads), group);
  });
  SEQKV_CHECK_LAUNCH();
  const dim3 grid(splits, q_heads, batch);
  const size_t partial_smem = (head_dim + chunk + kPartialThreads) * sizeof(float);
  AT_DISPATCH_INDEX_TYPES(block_table.scalar_type(), "seqkv_decode_partial", [&] {
    decode_partial_kernel<index_t><<<grid, kPartialThreads, partial_smem, stream>>>(
        q_rot.data_ptr<float>(), q_mu.data_ptr<float>(), pages.data_ptr<uint8_t>(),
        block_table.data_ptr<index_t>(), seq_lens.data_ptr<index_t>(), codebook_k.data_ptr<float>(),
        codebook_v.data_ptr<float>(), acc.data_ptr<float>(), split_max.data_ptr<float>(),
        split_sum.data_ptr<float>(), pages.stride(0), pages.stride(1), pages.stride(2), block_table.stride(0),
        static_cast<int>(block_size), static_cast<int>(head_dim), group, static_cast<int>(chunk),
        static_cast<float>(scale), to_format(k_format), to_format(v_format));
  });
  SEQKV_CHECK_LAUNCH();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqkv_decode_reduce", [&] {
    decode_reduce_kernel<scalar_t><<<rows, head_dim, head_smem, stream>>>(
        query.data_ptr<scalar_t>(), own_k.data_ptr<scalar_t>(), own_v.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), acc.data_ptr<float>(), split_max.data_ptr<float>(), split_sum.data_ptr<float>(),
        signs_v.data_ptr<float>(), weight_v.data_ptr<float>(), mean_v.data_ptr<float>(), query.stride(0),
        query.stride(1), own_k.stride(0), own_k.stride(1), own_v.stride(0), own_v.stride(1), out.stride(0),
        out.stride(1), static_cast<int>(q_heads), group, static_cast<int>(splits), static_cast<float>(scale));
  });
  SEQKV_CHECK_LAUNCH();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkv, CUDA, m) { m.impl("paged_decode_attention", &paged_decode_attention); }

}  // namespace seqkv
