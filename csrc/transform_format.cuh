// Per-element math of the transform slot format (seqkv-2/2.5/3/4, seqkv-3-nox), shared by the
// CUDA ops (write.cu, decode.cu) and a plain C++ host test
// (tests/kernels/transform_host.cpp, compiled with g++ on CPU machines).
//
// Every function here is `SEQKV_HD` (__host__ __device__ under nvcc, plain inline otherwise)
// and touches no CUDA or torch API, so the host test runs exactly these functions in serial
// loops and compares them with the codec's torch code. What the host test cannot check is the
// thread/block structure of the kernels (indexing by threadIdx, __syncthreads placement, shared
// memory sizing): that is checked on a GPU only (tests/kernels/test_cuda_ops.py).
//
// Slot format (vllm_seqkv/kernels/params.py): a token-head slot is
// [K bitstream | V bitstream]; in a stream, component c of head h has nbits[h, c] (0..8) bits
// starting at bit start[h, c], little-endian (LSB first) inside and across bytes; so a code
// spans at most 2 bytes. Levels and cuts are packed: component (h, c) owns the 2**nbits[h, c]
// entries from level_start[h, c] on. Decode: x = levels[level_start + code] @ inverse[h] + mean[h]
// (+ prediction), encode: z = (x - prediction - mean[h]) @ basis[h],
// code = #{cuts[level_start + i] < z, i < 2**nbits - 1} (the component's last cut is +inf).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SEQKV_HD __host__ __device__ __forceinline__
#else
#define SEQKV_HD inline
#endif

namespace seqkv {
namespace transform {

constexpr float kNegBig = -1.0e30f;  // finite "minus infinity" for running maxima

// Pointers of one stream's tables (all float32 / int32, contiguous, as TransformStreamParams
// holds them) plus the stream's place in the slot. has_pred: cross-layer predicted stream.
struct StreamTables {
  const int32_t* start;    // [H, D] first bit of each component in the stream
  const int32_t* nbits;    // [H, D] its width, 0..8
  const int32_t* level_start;  // [H, D] first entry of its levels / cuts
  const float* levels;     // [n] decode levels, packed
  const float* cuts;       // [n] decision thresholds, packed like levels
  const float* basis;      // [H, D, D]   encode: z = (x - mean) @ basis
  const float* inverse;    // [H, D, D]   decode: x = z @ inverse + mean
  const float* mean;       // [H, D]
  const float* pred_w;     // [2HD, HD]   prediction = [prev_k, prev_v] (flat) @ pred_w + pred_b
  const float* pred_b;     // [HD]
  int offset;              // byte offset of the stream in the slot
  int nbytes;              // its size in bytes
  bool has_pred;
};

// ---- reading a slot ---------------------------------------------------------------------

// Code of one component from the stream's bytes (`stream` = slot + offset).
SEQKV_HD int unpack_code(const uint8_t* stream, int start, int nbits) {
  const uint8_t* byte = stream + (start >> 3);
  const int shift = start & 7;
  int word = byte[0];
  if (shift + nbits > 8) word |= static_cast<int>(byte[1]) << 8;
  return (word >> shift) & ((1 << nbits) - 1);
}

// Decode level of component c of head h read from a slot.
SEQKV_HD float component_level(const StreamTables& s, const uint8_t* slot, int h, int c, int dim) {
  const int hc = h * dim + c;
  return s.levels[s.level_start[hc] + unpack_code(slot + s.offset, s.start[hc], s.nbits[hc])];
}

// ---- writing a slot ---------------------------------------------------------------------

// Number of decision thresholds strictly below z (the codec's torch.searchsorted, side left):
// binary search over the component's 2**nbits - 1 ascending cuts (`cuts`: its first one), nbits
// steps, reading only those cuts. NaN codes as 0.
SEQKV_HD int quantize(const float* cuts, int nbits, float z) {
  int code = 0;
  for (int half = (1 << nbits) >> 1; half > 0; half >>= 1) {
    if (cuts[code + half - 1] < z) code += half;
  }
  return code;
}

// The bits that a component's code (at bit `start`, `nbits` wide) contributes to byte j of its
// stream (0 when it does not touch that byte). Bits of different components never overlap, so
// a byte is the OR (or sum) of the contributions of all components.
SEQKV_HD uint32_t code_bits_in_byte(int code, int start, int nbits, int j) {
  if (nbits <= 0) return 0u;
  const int lo = start - 8 * j;  // bit of byte j that holds the code's LSB (may be < 0 or >= 8)
  if (lo >= 8 || lo + nbits <= 0) return 0u;
  const uint32_t v = lo >= 0 ? (static_cast<uint32_t>(code) << lo) : (static_cast<uint32_t>(code) >> (-lo));
  return v & 0xFFu;
}

// Byte j of a stream from the codes of its `dim` components (start/nbits of one head).
SEQKV_HD uint8_t pack_byte(const int* codes, const int32_t* start, const int32_t* nbits, int dim, int j) {
  uint32_t byte = 0;
  for (int c = 0; c < dim; ++c) byte |= code_bits_in_byte(codes[c], start[c], nbits[c], j);
  return static_cast<uint8_t>(byte);
}

// z of component c: sum_d (r[d] - mean[d]) * basis[d, c] (r: the residual row, float32).
SEQKV_HD float component_z(const float* r, const float* mean_h, const float* basis_h, int c, int dim) {
  float z = 0.f;
  for (int d = 0; d < dim; ++d) z += (r[d] - mean_h[d]) * basis_h[d * dim + c];
  return z;
}

// ---- rebuilding rows --------------------------------------------------------------------

// Column `col` (0 <= col < H*D, i.e. head col / D, channel col % D) of the cross-layer
// prediction [prev_k, prev_v] @ pred_w + pred_b for one token; prev rows are [H*D].
template <typename T>
SEQKV_HD float predict_element(const T* prev_k_row, const T* prev_v_row, const float* pred_w,
                               const float* pred_b, int hd, int col) {
  float acc = 0.f;
  for (int i = 0; i < hd; ++i) acc += static_cast<float>(prev_k_row[i]) * pred_w[static_cast<int64_t>(i) * hd + col];
  for (int i = 0; i < hd; ++i)
    acc += static_cast<float>(prev_v_row[i]) * pred_w[static_cast<int64_t>(hd + i) * hd + col];
  return acc + pred_b[col];
}

// Channel d of z @ inverse (z: the D levels of one row, inverse_h: [D, D] of one head).
SEQKV_HD float inverse_dot(const float* z, const float* inverse_h, int d, int dim) {
  float acc = 0.f;
  for (int c = 0; c < dim; ++c) acc += z[c] * inverse_h[c * dim + d];
  return acc;
}

// Channel d of a rebuilt row in the coding frame: z @ inverse + mean (+ prediction, added by
// the caller, in this order: the codec's inner decode, then the cross-layer term).
SEQKV_HD float rebuild_element(const float* z, const float* inverse_h, const float* mean_h, int d, int dim) {
  return inverse_dot(z, inverse_h, d, dim) + mean_h[d];
}

// RoPE of channel pair (i, i + D/2) of a row in place; rope_row: a rope_cache row [D]
// (cos of the D/2 frequencies, then their sin). apply_rope: x cos + rotate_half(x) sin.
SEQKV_HD void rope_pair(float* row, const float* rope_row, int i, int dim) {
  const int half = dim / 2;
  const float cos_v = rope_row[i], sin_v = rope_row[half + i];
  const float lo = row[i], hi = row[i + half];
  row[i] = lo * cos_v - hi * sin_v;
  row[i + half] = hi * cos_v + lo * sin_v;
}

// ---- softmax bookkeeping ----------------------------------------------------------------

// a . b over n floats (a query row against a rebuilt key row).
SEQKV_HD float row_dot(const float* a, const float* b, int n) {
  float acc = 0.f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One tile of an online softmax: `scores` [n] become exp(score - new max) in place; updates the
// running max and sum and returns alpha = exp(old max - new max), the factor by which the
// caller rescales its accumulators.
SEQKV_HD float online_softmax_tile(float* scores, int n, float& run_max, float& run_sum) {
  float top = run_max;
  for (int j = 0; j < n; ++j) top = fmaxf(top, scores[j]);
  const float alpha = expf(run_max - top);
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    scores[j] = expf(scores[j] - top);
    sum += scores[j];
  }
  run_sum = run_sum * alpha + sum;
  run_max = top;
  return alpha;
}

// Merge of one (sequence, query head)'s split-K partials (each: max score, sum of exp(score -
// max)) with its exact own token's score, against their common maximum `top`: a partial's
// weight is exp(max - top) (split_weight), `mass` the cached positions' total softmax weight.
struct SplitMerge {
  float top, mass, own_weight;
};

SEQKV_HD SplitMerge merge_splits(const float* split_max, const float* split_sum, int num_splits, float own_score) {
  float top = own_score;
  for (int s = 0; s < num_splits; ++s) top = fmaxf(top, split_max[s]);
  float mass = 0.f;
  for (int s = 0; s < num_splits; ++s) mass += expf(split_max[s] - top) * split_sum[s];
  return SplitMerge{top, mass, expf(own_score - top)};
}

SEQKV_HD float split_weight(const SplitMerge& m, float split_max) { return expf(split_max - m.top); }

// Output channel: (cached weighted value sum + own weight * own value) / total weight.
SEQKV_HD float merged_output(const SplitMerge& m, float cached, float own_v) {
  return (cached + m.own_weight * own_v) / (m.mass + m.own_weight);
}

// Log of the softmax denominator (scores already scaled).
SEQKV_HD float merged_lse(const SplitMerge& m) { return m.top + logf(m.mass + m.own_weight); }

// ---- split-K geometry -------------------------------------------------------------------

constexpr int kDecodeTile = 16;        // context positions per step of a decode split
constexpr int kTargetBlocks = 512;     // enough (B * H_kv * splits) blocks to fill an H100/H200
constexpr int kMinSplitTokens = 64;    // at least this many context tokens per split

// Split count: `requested` when > 0, else enough blocks to fill the GPU with at least
// kMinSplitTokens tokens each (max_tokens: context capacity of a block-table row).
SEQKV_HD int64_t choose_splits(int64_t requested, int64_t batch, int64_t kv_heads, int64_t max_tokens) {
  if (requested > 0) return requested;
  const int64_t programs = batch * kv_heads > 0 ? batch * kv_heads : 1;
  const int64_t wanted = (kTargetBlocks + programs - 1) / programs;
  const int64_t most = (max_tokens + kMinSplitTokens - 1) / kMinSplitTokens;
  const int64_t splits = wanted < most ? wanted : most;
  return splits > 1 ? splits : 1;
}

}  // namespace transform
}  // namespace seqkv
