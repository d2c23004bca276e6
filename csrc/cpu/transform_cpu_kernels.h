// Kernels of the transform-format CPU ops, compiled once per instruction set: each isa_*.cpp
// defines SEQKV_CPU_NS (and, for AVX2 / AVX-512, ATen's CPU_CAPABILITY macros, so that
// at::vec::Vectorized<float> is 8 or 16 lanes of real SIMD; in the scalar build it is ATen's
// portable array implementation) and includes this file once. Not a public header.
//
// Decode (one query per sequence, non-cross-layer streams):
//   work items = (sequence, chunk of cached positions) x kv head, run by at::parallel_for, so
//   both cores work at batch 1; each item walks its chunk in tiles of kTile positions:
//   pass 1 (keys): codes -> levels z_k in a [D][tile] layout (positions in SIMD lanes); the
//     pre-RoPE key is z_k @ inverse_k + mean_k (pair-block-diagonal inverse: 4 multiply-adds
//     per RoPE pair; otherwise D^2 per position), rotated by the position's cos/sin from the
//     rope table, and scored against the GQA group's queries (lanes = positions, no
//     horizontal sums); scores of the whole chunk are kept;
//   softmax of the chunk (max, exp, sum);
//   pass 2 (values): codes -> levels z_v in a [tile][D] layout, accumulated as sum_j p_j z_v,j
//     (lanes = components); values are never rebuilt.
//   merge (per sequence x query head): log-sum-exp merge of the chunks with the exact own
//   token (position seq_len - 1), inverse_v and mean_v applied once, lse written.
// Reconstruct: per (block, kv head), whole blocks to float32 K (optionally RoPE-rotated) / V; codes
// read W slots at a time by the decode's field reader, values rebuilt with register accumulators.
// Write: per token, components -> codes (binary search over the cuts, transform_format.cuh's
//   quantize) -> bit fields -> the slot.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "../transform_format.cuh"
#include "transform_cpu.h"

namespace seqkv {
namespace cpu {
namespace SEQKV_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int VS = Vec::size();
constexpr int W = kTile;
static_assert(W % VS == 0, "tile must be a whole number of vectors");
constexpr int NV = W / VS;  // vectors per tile row
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kParallelPositionHeads = 1024;  // decode: below, one thread (see decode_attention)
constexpr int64_t kMergeRowsPerThread = 32;       // decode: query rows merged per thread at least

// f.template operator()<i>() for i = 0 .. N-1, unrolled at compile time. Register arrays of the
// hot loops (sums per query head) are indexed only through it: GCC 12 keeps an array in
// registers when every index is a constant, and otherwise stores it to the stack in every
// iteration (measured: six 64-byte stores per key pair in score_pairs).
template <int N, class F>
__attribute__((always_inline)) inline void unrolled(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f.template operator()<I>(), ...); }(std::make_integer_sequence<int, N>{});
}

// Ablations of the fused RoPE-pair decode, for benchmarks/cpu_decode_ablation.py only (it builds
// with -DSEQKV_ABLATE_<PART>): the part is skipped, the results are garbage and only the time of
// what is left is read. None is defined in a normal build.
#ifdef SEQKV_ABLATE_SCORES
constexpr bool kAblateScores = true;  // the key reads, rebuild and scores of pass 1
#else
constexpr bool kAblateScores = false;
#endif
#ifdef SEQKV_ABLATE_VALUES
constexpr bool kAblateValues = true;  // the value pass
#else
constexpr bool kAblateValues = false;
#endif
#ifdef SEQKV_ABLATE_PAGE_READS
constexpr bool kAblatePageReads = true;  // pass 1's slot addressing, word loads and transposes (tiles left stale)
#else
constexpr bool kAblatePageReads = false;
#endif
#ifdef SEQKV_ABLATE_TRANSPOSE
constexpr bool kAblateTranspose = true;  // the 16 x 16 word transposes of pass 1
#else
constexpr bool kAblateTranspose = false;
#endif
#ifdef SEQKV_ABLATE_HEAD_FMAS
constexpr bool kAblateHeadFmas = true;  // the value pass' multiply-adds of every query head but one
#else
constexpr bool kAblateHeadFmas = false;
#endif

// Levels of every component of one stream for W slots, positions in lanes: z[c * W + t].
inline void extract_lanes(const uint8_t* const* slots, const Stream& s, int h, int dim, float* z) {
  const int64_t hd = static_cast<int64_t>(h) * dim;
  const int32_t* byte = s.byte + hd;
  const int32_t* extra = s.extra + hd;
  const int32_t* shift = s.shift + hd;
  const int32_t* mask = s.mask + hd;
  const int32_t* first = s.level_start + hd;
  for (int t = 0; t < W; ++t) {
    const uint8_t* p = slots[t];
    for (int c = 0; c < dim; ++c) {
      const int i = byte[c];
      const int word = p[i] | (p[i + extra[c]] << 8);
      z[c * W + t] = s.levels[first[c] + ((word >> shift[c]) & mask[c])];
    }
  }
}

// rows[n][D] (in place): z @ inverse + mean, vectorized over the output channel.
inline void rebuild_rows(float* rows, int n, const float* inverse, const float* mean, int dim, float* tmp) {
  for (int t = 0; t < n; ++t) {
    float* z = rows + static_cast<int64_t>(t) * dim;
    for (int d = 0; d < dim; d += VS) Vec::loadu(mean + d).store(tmp + d);
    for (int c = 0; c < dim; ++c) {
      const Vec zc(z[c]);
      const float* inv = inverse + static_cast<int64_t>(c) * dim;
      for (int d = 0; d < dim; d += VS) at::vec::fmadd(zc, Vec::loadu(inv + d), Vec::loadu(tmp + d)).store(tmp + d);
    }
    std::memcpy(z, tmp, sizeof(float) * dim);
  }
}

// out = init + x @ matrix (x [D], matrix [D][D] row-major, init [D] or nullptr for zeros): one
// multiply-add per row of the matrix in order, with the D / VS sums in registers (a loop that
// keeps them in memory pays a load and a store per multiply-add). out may be x.
template <int NVD>
inline void row_times_matrix(const float* x, const float* matrix, const float* init, float* out) {
  constexpr int D = NVD * VS;
#if defined(CPU_CAPABILITY_AVX512)
  // raw vectors: GCC 12 keeps an array of at::vec::Vectorized in memory even with constant indices
  __m512 acc[NVD];  // indexed through unrolled<> only (see there)
  unrolled<NVD>([&]<int u>() { acc[u] = init == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(init + u * VS); });
  for (int c = 0; c < D; ++c) {
    const __m512 xc = _mm512_set1_ps(x[c]);
    const float* row = matrix + static_cast<int64_t>(c) * D;
    unrolled<NVD>([&]<int u>() { acc[u] = _mm512_fmadd_ps(xc, _mm512_loadu_ps(row + u * VS), acc[u]); });
  }
  unrolled<NVD>([&]<int u>() { _mm512_storeu_ps(out + u * VS, acc[u]); });
#else
  Vec acc[NVD];
  unrolled<NVD>([&]<int u>() { acc[u] = init == nullptr ? Vec(0.f) : Vec::loadu(init + u * VS); });
  for (int c = 0; c < D; ++c) {
    const Vec xc(x[c]);
    const float* row = matrix + static_cast<int64_t>(c) * D;
    unrolled<NVD>([&]<int u>() { acc[u] = at::vec::fmadd(xc, Vec::loadu(row + u * VS), acc[u]); });
  }
  unrolled<NVD>([&]<int u>() { acc[u].store(out + u * VS); });
#endif
}

// row_times_matrix for a runtime dim: false when dim / VS is not one of the compiled counts.
inline bool row_times_matrix_fast(const float* x, const float* matrix, const float* init, float* out, int dim) {
  switch (dim / VS) {
    case 2: if (dim == 2 * VS) return row_times_matrix<2>(x, matrix, init, out), true; break;
    case 4: if (dim == 4 * VS) return row_times_matrix<4>(x, matrix, init, out), true; break;
    case 8: if (dim == 8 * VS) return row_times_matrix<8>(x, matrix, init, out), true; break;
    case 16: if (dim == 16 * VS) return row_times_matrix<16>(x, matrix, init, out), true; break;
    default: break;
  }
  return false;
}

// rows[t] = z_t @ inverse + mean for the n rows of z [n][dim], in place.
inline void rebuild_rows_fast(float* rows, int n, const float* inverse, const float* mean, int dim, float* tmp) {
  for (int t = 0; t < n; ++t) {
    float* z = rows + static_cast<int64_t>(t) * dim;
    if (!row_times_matrix_fast(z, inverse, mean, z, dim)) rebuild_rows(z, 1, inverse, mean, dim, tmp);
  }
}

// rows[n][D] (in place): pre-RoPE keys from levels with a pair-block-diagonal inverse.
inline void rebuild_rows_pairs(float* rows, int n, const PairBlocks& pb, int h, const float* mean, int dim) {
  const int half = dim / 2;
  const int64_t off = static_cast<int64_t>(h) * half;
  const float *a = pb.a + off, *b = pb.b + off, *c = pb.c + off, *d = pb.d + off;
  for (int t = 0; t < n; ++t) {
    float* z = rows + static_cast<int64_t>(t) * dim;
    for (int j = 0; j < half; j += VS) {
      const Vec lo = Vec::loadu(z + j), hi = Vec::loadu(z + half + j);
      const Vec k_lo = at::vec::fmadd(lo, Vec::loadu(a + j), at::vec::fmadd(hi, Vec::loadu(b + j), Vec::loadu(mean + j)));
      const Vec k_hi =
          at::vec::fmadd(lo, Vec::loadu(c + j), at::vec::fmadd(hi, Vec::loadu(d + j), Vec::loadu(mean + half + j)));
      k_lo.store(z + j);
      k_hi.store(z + half + j);
    }
  }
}

struct Item {
  int b;
  int64_t lo, hi;  // cached positions [lo, hi) of sequence b
};

// Slot pointers of the W positions of the tile at p0 (head h's pages of item.b): lanes outside
// [item.lo, item.hi) point at a slot of the item (read, then masked), never past it.
inline void locate_tile(const DecodeArgs& a, const Item& item, const uint8_t* head_pages, const int64_t* bt,
                        int64_t p0, const uint8_t** out) {
  const int bs = a.block_size;
  const int64_t lo = std::max(p0, item.lo), hi = std::min(p0 + W, item.hi);
  int64_t blk = lo / bs, off = lo % bs;
  const uint8_t* base = head_pages + bt[blk] * a.stride_pb;
  for (int64_t p = p0; p < lo; ++p) out[p - p0] = base + off * a.stride_pt;
  for (int64_t p = lo; p < hi; ++p) {
    out[p - p0] = base + off * a.stride_pt;
    if (++off == bs && p + 1 < hi) {
      off = 0;
      base = head_pages + bt[++blk] * a.stride_pb;
    }
  }
  for (int64_t p = hi; p < p0 + W; ++p) out[p - p0] = out[hi - 1 - p0];
}

// The G query rows q [G][D] rotated by R(p0)^T (rope_row: the table's row p0) into qrot.
inline void rotate_queries(const float* q, const float* rope_row, int G, int D, float* qrot) {
  const int half = D / 2;
  for (int g = 0; g < G; ++g) {
    const float* qg = q + static_cast<int64_t>(g) * D;
    float* dst = qrot + static_cast<int64_t>(g) * D;
    for (int j = 0; j < half; j += VS) {
      const Vec c = Vec::loadu(rope_row + j), sv = Vec::loadu(rope_row + half + j);
      const Vec lo = Vec::loadu(qg + j), hi = Vec::loadu(qg + half + j);
      at::vec::fmadd(lo, c, hi * sv).store(dst + j);
      (hi * c - lo * sv).store(dst + half + j);
    }
  }
}

// Softmax of an item's scores (G rows of stride span, `padded` positions; masked lanes hold -inf
// and get weight 0), in place; per query head [max, sum] into part (rows of D + 2).
inline void softmax_item(float* sc, int64_t span, int G, int64_t padded, int D, float* part) {
  for (int g = 0; g < G; ++g) {
    float* sg = sc + g * span;
    Vec vmax(kNegInf);
    for (int64_t i = 0; i < padded; i += VS) vmax = at::vec::maximum(vmax, Vec::loadu(sg + i));
    float lanes[VS];
    vmax.store(lanes);
    float top = kNegInf;
    for (int i = 0; i < VS; ++i) top = std::max(top, lanes[i]);
    const Vec vtop(top);
    Vec total(0.f);
    for (int64_t i = 0; i < padded; i += VS) {
      const Vec p = (Vec::loadu(sg + i) - vtop).exp();
      p.store(sg + i);
      total = total + p;
    }
    total.store(lanes);
    float sum = 0.f;
    for (int i = 0; i < VS; ++i) sum += lanes[i];
    part[g * (D + 2)] = top;
    part[g * (D + 2) + 1] = sum;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// In place: r[i] lane j <- r[j] lane i (16 x 16 int32).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The stream's 32-bit words of the W slots (masked row loads: never past a slot), transposed to
// one vector per word (positions in lanes): words[word * W + t].
inline void load_word_range(const uint8_t* const* slots, int first_word, int num_words, int32_t* words) {
  for (int w0 = 0; w0 < num_words; w0 += 16) {
    const int nw = std::min(16, num_words - w0);
    const __mmask16 m = static_cast<__mmask16>((1u << nw) - 1u);
    const int word = first_word + w0;
    __m512 r[16];
    for (int t = 0; t < W; ++t) r[t] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, slots[t] + 4 * word));
    if (!kAblateTranspose) transpose16(r);
    for (int i = 0; i < nw; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(words + (word + i) * W), r[i]);
  }
}

inline void load_words(const uint8_t* const* slots, const Stream& s, int32_t* words) {
  load_word_range(slots, s.first_word, s.num_words, words);
}

// Levels of one component for the W slots whose words load_words gave.
// Hot loops keep field and lut live; mask, first and lv are read on the >4-bit paths only.
struct ComponentReader {
  const FieldDesc* field;
  const int32_t *mask, *first;
  const float *lv, *lut;
  const int32_t* words;
  ComponentReader(const Stream& s, int h, int dim, const int32_t* w) : words(w) {
    const int64_t hd = static_cast<int64_t>(h) * dim;
    field = s.field + hd;
    mask = s.mask + hd;
    first = s.level_start + hd;
    lv = s.levels;
    lut = s.lut16 + hd * 16;
  }
  inline __m512 operator()(int c) const { return at(c, words); }
  __attribute__((always_inline)) inline __m512 at(int c, const int32_t* tile_words) const {
    const FieldDesc& f = field[c];
    const int32_t* src = tile_words + f.row;
    const int sh = f.shift;
    __m512i code = _mm512_srl_epi32(_mm512_loadu_si512(src), _mm_cvtsi32_si128(sh));
    if (f.span) code = _mm512_or_si512(code, _mm512_sll_epi32(_mm512_loadu_si512(src + W), _mm_cvtsi32_si128(32 - sh)));
    // NOTE: no mask below 7 bits: permutexvar reads 4 index bits (the lut16 table repeats the
    // levels of a narrower code), permutex2var 5, and bit 5 is tested for 6-bit codes
    const int bits = f.bits;
    if (bits <= 4) return _mm512_permutexvar_ps(code, _mm512_loadu_ps(lut + c * 16));
    const float* table = lv + first[c];
    if (bits == 5) return _mm512_permutex2var_ps(_mm512_loadu_ps(table), code, _mm512_loadu_ps(table + 16));
    if (bits == 6) {  // two 32-entry halves, picked by bit 5
      const __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(table), code, _mm512_loadu_ps(table + 16));
      const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(table + 32), code, _mm512_loadu_ps(table + 48));
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(code, _mm512_set1_epi32(32)), lo, hi);
    }
    return _mm512_i32gather_ps(_mm512_and_si512(code, _mm512_set1_epi32(mask[c])), table, 4);
  }
};
#endif

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// In place: r[i] lane j <- r[j] lane i (8 x 8 int32).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The AVX2 build's load_words: the stream's 32-bit words of the W slots (masked row loads: never
// past a slot), transposed 8 x 8 to one row per word (positions in lanes): words[word * W + t].
inline void load_words_avx2(const uint8_t* const* slots, const Stream& s, int32_t* words) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int w0 = 0; w0 < s.num_words; w0 += 8) {
    const int nw = std::min(8, s.num_words - w0);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nw), lane);
    const int word = s.first_word + w0;
    for (int t0 = 0; t0 < W; t0 += 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t)
        r[t] = _mm256_castsi256_ps(_mm256_maskload_epi32(reinterpret_cast<const int*>(slots[t0 + t] + 4 * word), m));
      transpose8(r);
      for (int i = 0; i < nw; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(words + (word + i) * W + t0), r[i]);
    }
  }
}

// The AVX2 build's ComponentReader: levels of component c for the W slots whose words
// load_words_avx2 gave, 8 lanes at a time (a 3-bit register permute of lut16 for codes up to 3
// bits, two and a blend on bit 3 for 4 bits, a gather above).
struct ComponentReader8 {
  const FieldDesc* field;
  const int32_t *mask, *first;
  const float *lv, *lut;
  ComponentReader8(const Stream& s, int h, int dim) {
    const int64_t hd = static_cast<int64_t>(h) * dim;
    field = s.field + hd;
    mask = s.mask + hd;
    first = s.level_start + hd;
    lv = s.levels;
    lut = s.lut16 + hd * 16;
  }
  inline void read(int c, const int32_t* words, float* out) const {
    const FieldDesc& f = field[c];
    const int32_t* src = words + f.row;
    const __m256i sh = _mm256_set1_epi32(f.shift);
    const int bits = f.bits;
    const float* table = lut + c * 16;
    for (int t0 = 0; t0 < W; t0 += 8) {
      __m256i code = _mm256_srlv_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + t0)), sh);
      if (f.span)
        code = _mm256_or_si256(code, _mm256_sllv_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + W + t0)),
                                                       _mm256_sub_epi32(_mm256_set1_epi32(32), sh)));
      __m256 v;
      if (bits <= 3) {
        v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), code);
      } else if (bits == 4) {
        const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), code);
        const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), code);
        v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
      } else {
        v = _mm256_i32gather_ps(lv + first[c], _mm256_and_si256(code, _mm256_set1_epi32(mask[c])), 4);
      }
      _mm256_storeu_ps(out + t0, v);
    }
  }
};
#endif

// Levels of every component of one stream for W slots, positions in lanes: z[c * W + t].
// words: scratch of tile_words(slot bytes) int32.
inline void extract_tile(const uint8_t* const* slots, const Stream& s, int h, int dim, float* z, int32_t* words) {
#if defined(CPU_CAPABILITY_AVX512)
  load_words(slots, s, words);
  const ComponentReader read(s, h, dim, words);
  for (int c = 0; c < dim; ++c) _mm512_storeu_ps(z + c * W, read(c));
#elif defined(CPU_CAPABILITY_AVX2)
  load_words_avx2(slots, s, words);
  const ComponentReader8 read(s, h, dim);
  for (int c = 0; c < dim; ++c) read.read(c, words, z + c * W);
#else
  (void)words;
  extract_lanes(slots, s, h, dim, z);
#endif
}

constexpr int kMaxValueTiles = 4;    // tiles of value levels accumulated per pass over acc
constexpr int kValueGroupTiles = 8;  // AVX-512: tiles whose words stay in L1 during one component sweep

// int32 per tile in DecodeScratch::tiles: every word of the slot (+ one past: a field's second
// word) for W positions; 16-word transposes may write up to 15 words past the last one.
inline int64_t tile_stride(int slot_bytes) { return static_cast<int64_t>((slot_bytes + 3) / 4 + 17) * W; }

// int32 of one tile's words for extract_tile (every word of the slot, one past, 8- or 16-word
// transposes' padding).
inline size_t tile_words(int slot_bytes) { return static_cast<size_t>(slot_bytes / 4 + 18) * W; }

// Bytes of a slot: the K and V streams' extent.
inline int slot_bytes_of(const Stream& k, const Stream& v) { return std::max(k.offset + k.nbytes, v.offset + v.nbytes); }

// Scratch aligned to cache lines: a 64-byte vector load that straddles two lines costs two.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

struct DecodeScratch {
  AlignedVector<float> scores, zk, key, qrot, acc, zv;
  AlignedVector<int32_t> words, vwords, tiles;
  DecodeScratch(int group, int64_t span, int dim, int slot_bytes)
      : scores(static_cast<size_t>(group) * span),
        zk(static_cast<size_t>(dim) * W),
        key(static_cast<size_t>(dim) * W),
        qrot(static_cast<size_t>(2) * group * dim),
        acc(static_cast<size_t>(group) * dim * W),
        zv(static_cast<size_t>(kMaxValueTiles) * dim * W),
        words(kMaxValueTiles * tile_words(slot_bytes)),
#if defined(CPU_CAPABILITY_AVX512)
        vwords(kValueGroupTiles * tile_words(slot_bytes)),
        tiles(static_cast<size_t>(span / W + 1) * tile_stride(slot_bytes))
#else
        vwords()
#endif
  {
  }
};

// This thread's DecodeScratch for one call's geometry, kept between calls (a decode step calls the
// op once per layer with the same geometry; allocating and zeroing it each time cost more than a
// short context's work).
inline DecodeScratch& thread_scratch(int group, int64_t span, int dim, int slot_bytes) {
  struct Kept {
    int group = -1, dim = -1, slot_bytes = -1;
    int64_t span = -1;
    std::unique_ptr<DecodeScratch> scratch;
  };
  thread_local Kept kept;
  if (!kept.scratch || kept.group != group || kept.span != span || kept.dim != dim || kept.slot_bytes != slot_bytes) {
    kept.scratch = std::make_unique<DecodeScratch>(group, span, dim, slot_bytes);
    kept.group = group;
    kept.span = span;
    kept.dim = dim;
    kept.slot_bytes = slot_bytes;
  }
  return *kept.scratch;
}

// Tile geometry shared by the items of one call (built by the op layer, see DecodeArgs): RoPE
// rotations of the W in-tile offsets ([D/2][W] cos and sin of rope rows 0..W-1); a position p0 + t
// is rotated as R(p0 + t) = R(p0) R(t): keys by R(t), the queries by R(p0)^T once per tile.
struct TileRope {
  const float* cos;
  const float* sin;
  // pair-diagonal keys: per head and pair [6][W]: R(t) B_j (m00, m01, m10, m11) and R(t) mean
  const float* pair_blocks;
};

// Scores of NG query heads (rows of q, stride D) against the tile's keys [D][W] -> dst rows
// (stride span), scaled; register accumulators.
template <int NG>
inline void score_heads(const float* q, const float* key, int dim, float scale, float* dst, int64_t span) {
#if defined(CPU_CAPABILITY_AVX512)  // NV == 1; raw vectors as in row_times_matrix
  __m512 acc[NG];  // indexed through unrolled<> only (see there)
  unrolled<NG>([&]<int i>() { acc[i] = _mm512_setzero_ps(); });
  for (int d = 0; d < dim; ++d) {
    const __m512 k = _mm512_loadu_ps(key + d * W);
    unrolled<NG>([&]<int i>() { acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * dim + d]), k, acc[i]); });
  }
  const __m512 vs = _mm512_set1_ps(scale);
  unrolled<NG>([&]<int i>() { _mm512_storeu_ps(dst + i * span, _mm512_mul_ps(acc[i], vs)); });
#else
  Vec acc[NG][NV];
  unrolled<NG>([&]<int i>() { unrolled<NV>([&]<int u>() { acc[i][u] = Vec(0.f); }); });
  for (int d = 0; d < dim; ++d) {
    unrolled<NV>([&]<int u>() {
      const Vec k = Vec::loadu(key + d * W + u * VS);
      unrolled<NG>([&]<int i>() { acc[i][u] = at::vec::fmadd(Vec(q[i * dim + d]), k, acc[i][u]); });
    });
  }
  const Vec vs(scale);
  unrolled<NG>([&]<int i>() { unrolled<NV>([&]<int u>() { (acc[i][u] * vs).store(dst + i * span + u * VS); }); });
#endif
}

// ag[c][t] += sum over NT tiles i of p[i * W + t] * zv[i][c][t] (ag: one query head's [D][W]).
template <int NT>
inline void accumulate_values(const float* p, const float* zv, float* ag, int dim) {
  Vec pv[NT][NV];
  for (int i = 0; i < NT; ++i)
    for (int u = 0; u < NV; ++u) pv[i][u] = Vec::loadu(p + i * W + u * VS);
  for (int c = 0; c < dim; ++c) {
    for (int u = 0; u < NV; ++u) {
      float* dst = ag + c * W + u * VS;
      Vec r = Vec::loadu(dst);
      for (int i = 0; i < NT; ++i) r = at::vec::fmadd(pv[i][u], Vec::loadu(zv + (static_cast<int64_t>(i) * dim + c) * W + u * VS), r);
      r.store(dst);
    }
  }
}


#if defined(CPU_CAPABILITY_AVX512)

// Value level sums of NG query heads over ntiles tiles, component-outer with the sums in
// registers (4 components x NG heads), added lane-wise into acc[g][c][t] (stride dim * W per
// head); words of tile i at words + i * stride, probabilities of head g at p + g * span.
template <int NG>
__attribute__((noinline)) void value_sums(const ComponentReader& read, const int32_t* words, int64_t stride, int ntiles, const float* p,
                       int64_t span, int dim, float* acc) {
  for (int c0 = 0; c0 < dim; c0 += 4) {
    __m512 r[4][NG];
    unrolled<4>([&]<int cc>() { unrolled<NG>([&]<int g>() { r[cc][g] = _mm512_setzero_ps(); }); });
    for (int i = 0; i < ntiles; ++i) {
      const int32_t* tile_words = words + i * stride;
      __m512 pv[NG];
      unrolled<NG>([&]<int g>() { pv[g] = _mm512_loadu_ps(p + g * span + i * W); });
      unrolled<4>([&]<int cc>() {
        const __m512 z = read.at(c0 + cc, tile_words);
        unrolled<kAblateHeadFmas ? 1 : NG>([&]<int g>() { r[cc][g] = _mm512_fmadd_ps(pv[g], z, r[cc][g]); });
      });
    }
    unrolled<4>([&]<int cc>() {
      unrolled<NG>([&]<int g>() {
        float* dst = acc + (static_cast<int64_t>(g) * dim + c0 + cc) * W;
        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), r[cc][g]));
      });
    });
  }
}
// Scores of NG query heads (rows of q, stride D; already rotated by R(p0)^T) against the W keys
// whose words are at tile_words, rebuilt pair by pair in registers from the precomposed blocks
// m [half][6][W] (R(t) B_j and R(t) mean): no key row is stored.
template <int NG>
__attribute__((noinline)) void score_pairs(const ComponentReader& read, const int32_t* tile_words, const float* m, const float* q,
                        int dim, float scale, float* dst, int64_t span) {
  const int half = dim / 2;
  // two sums per head (the pair's lo and hi halves): one multiply-add per sum and pair, so the
  // loop is not bound by the multiply-add latency of a single chain
  __m512 acc_lo[NG], acc_hi[NG];
  unrolled<NG>([&]<int g>() { acc_lo[g] = acc_hi[g] = _mm512_setzero_ps(); });
  for (int j = 0; j < half; ++j) {
    const float* mj = m + j * 6 * W;
    const __m512 lo = read.at(j, tile_words), hi = read.at(j + half, tile_words);
    const __m512 k_lo = _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + W), _mm512_loadu_ps(mj + 4 * W)));
    const __m512 k_hi =
        _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj + 2 * W), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + 3 * W), _mm512_loadu_ps(mj + 5 * W)));
    unrolled<NG>([&]<int g>() {
      acc_lo[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * dim + j]), k_lo, acc_lo[g]);
      acc_hi[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * dim + j + half]), k_hi, acc_hi[g]);
    });
  }
  const __m512 vs = _mm512_set1_ps(scale);
  unrolled<NG>([&]<int g>() {
    _mm512_storeu_ps(dst + g * span, _mm512_mul_ps(_mm512_add_ps(acc_lo[g], acc_hi[g]), vs));
  });
}

// score_pairs for two tiles at once (words at tw0 / tw1, queries rotated for each at q0 / q1,
// scores to dst0 / dst1): the pair blocks m and each component's field and level table are
// read once for both tiles (they do not depend on the tile), halving those loads per key.
template <int NG>
__attribute__((noinline)) void score_pairs2(const ComponentReader& read, const int32_t* tw0, const int32_t* tw1,
                                            const float* m, const float* q0, const float* q1, int dim, float scale,
                                            float* dst0, float* dst1, int64_t span) {
  const int half = dim / 2;
  __m512 acc0[NG], acc1[NG];  // one sum per tile and head: 2 NG chains hide the latency
  unrolled<NG>([&]<int g>() { acc0[g] = acc1[g] = _mm512_setzero_ps(); });
  for (int j = 0; j < half; ++j) {
    const float* mj = m + j * 6 * W;
    const __m512 m0 = _mm512_loadu_ps(mj), m1 = _mm512_loadu_ps(mj + W), m2 = _mm512_loadu_ps(mj + 2 * W);
    const __m512 m3 = _mm512_loadu_ps(mj + 3 * W), m4 = _mm512_loadu_ps(mj + 4 * W), m5 = _mm512_loadu_ps(mj + 5 * W);
    const __m512 lo0 = read.at(j, tw0), hi0 = read.at(j + half, tw0);
    const __m512 lo1 = read.at(j, tw1), hi1 = read.at(j + half, tw1);
    const __m512 k_lo0 = _mm512_fmadd_ps(lo0, m0, _mm512_fmadd_ps(hi0, m1, m4));
    const __m512 k_hi0 = _mm512_fmadd_ps(lo0, m2, _mm512_fmadd_ps(hi0, m3, m5));
    const __m512 k_lo1 = _mm512_fmadd_ps(lo1, m0, _mm512_fmadd_ps(hi1, m1, m4));
    const __m512 k_hi1 = _mm512_fmadd_ps(lo1, m2, _mm512_fmadd_ps(hi1, m3, m5));
    unrolled<NG>([&]<int g>() {
      acc0[g] = _mm512_fmadd_ps(_mm512_set1_ps(q0[g * dim + j]), k_lo0, acc0[g]);
      acc1[g] = _mm512_fmadd_ps(_mm512_set1_ps(q1[g * dim + j]), k_lo1, acc1[g]);
      acc0[g] = _mm512_fmadd_ps(_mm512_set1_ps(q0[g * dim + j + half]), k_hi0, acc0[g]);
      acc1[g] = _mm512_fmadd_ps(_mm512_set1_ps(q1[g * dim + j + half]), k_hi1, acc1[g]);
    });
  }
  const __m512 vs = _mm512_set1_ps(scale);
  unrolled<NG>([&]<int g>() {
    _mm512_storeu_ps(dst0 + g * span, _mm512_mul_ps(acc0[g], vs));
    _mm512_storeu_ps(dst1 + g * span, _mm512_mul_ps(acc1[g], vs));
  });
}

// The W keys of a tile (rotated, as score_pairs builds them) written out as key [D][W].
inline void rebuild_pair_keys(const ComponentReader& read, const int32_t* tile_words, const float* m, int dim,
                              float* key) {
  const int half = dim / 2;
  for (int j = 0; j < half; ++j) {
    const float* mj = m + j * 6 * W;
    const __m512 lo = read.at(j, tile_words), hi = read.at(j + half, tile_words);
    _mm512_storeu_ps(key + j * W, _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + W), _mm512_loadu_ps(mj + 4 * W))));
    _mm512_storeu_ps(key + (j + half) * W,
                     _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj + 2 * W), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + 3 * W), _mm512_loadu_ps(mj + 5 * W))));
  }
}

// Scores of all G query heads (rows of q, stride D) against key [D][W], 8 heads per pass.
inline void score_all_heads(const float* q, const float* key, int dim, int G, float scale, float* dst, int64_t span) {
  int g = 0;
  for (; g + 8 <= G; g += 8) score_heads<8>(q + g * dim, key, dim, scale, dst + g * span, span);
  for (; g + 4 <= G; g += 4) score_heads<4>(q + g * dim, key, dim, scale, dst + g * span, span);
  for (; g < G; ++g) score_heads<1>(q + g * dim, key, dim, scale, dst + g * span, span);
}

// value_sums from levels already read: zv [ntiles][D][W].
template <int NG>
inline void level_sums(const float* zv, int ntiles, const float* p, int64_t span, int dim, float* acc) {
  for (int c0 = 0; c0 < dim; c0 += 4) {
    __m512 r[4][NG];  // indexed through unrolled<> only (see there)
    unrolled<4>([&]<int cc>() { unrolled<NG>([&]<int g>() { r[cc][g] = _mm512_setzero_ps(); }); });
    for (int i = 0; i < ntiles; ++i) {
      __m512 pv[NG];
      unrolled<NG>([&]<int g>() { pv[g] = _mm512_loadu_ps(p + g * span + i * W); });
      unrolled<4>([&]<int cc>() {
        const __m512 z = _mm512_loadu_ps(zv + (static_cast<int64_t>(i) * dim + c0 + cc) * W);
        unrolled<NG>([&]<int g>() { r[cc][g] = _mm512_fmadd_ps(pv[g], z, r[cc][g]); });
      });
    }
    unrolled<4>([&]<int cc>() {
      unrolled<NG>([&]<int g>() {
        float* dst = acc + (static_cast<int64_t>(g) * dim + c0 + cc) * W;
        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), r[cc][g]));
      });
    });
  }
}

template <int NG>
inline void score_pairs_group(const ComponentReader& read, const int32_t* tw, const float* m, const float* q, int dim,
                              float scale, float* dst, int64_t span, int n) {
  switch (n) {
    case 1: return score_pairs<1>(read, tw, m, q, dim, scale, dst, span);
    case 2: return score_pairs<2>(read, tw, m, q, dim, scale, dst, span);
    case 3: return score_pairs<3>(read, tw, m, q, dim, scale, dst, span);
    case 4: return score_pairs<4>(read, tw, m, q, dim, scale, dst, span);
    case 5: return score_pairs<5>(read, tw, m, q, dim, scale, dst, span);
    case 6: return score_pairs<6>(read, tw, m, q, dim, scale, dst, span);
    case 7: return score_pairs<7>(read, tw, m, q, dim, scale, dst, span);
    default: return score_pairs<8>(read, tw, m, q, dim, scale, dst, span);
  }
}

inline void score_pairs2_group(const ComponentReader& read, const int32_t* tw0, const int32_t* tw1, const float* m,
                               const float* q0, const float* q1, int dim, float scale, float* dst0, float* dst1,
                               int64_t span, int n) {
  switch (n) {
    case 1: return score_pairs2<1>(read, tw0, tw1, m, q0, q1, dim, scale, dst0, dst1, span);
    case 2: return score_pairs2<2>(read, tw0, tw1, m, q0, q1, dim, scale, dst0, dst1, span);
    case 3: return score_pairs2<3>(read, tw0, tw1, m, q0, q1, dim, scale, dst0, dst1, span);
    default: return score_pairs2<4>(read, tw0, tw1, m, q0, q1, dim, scale, dst0, dst1, span);
  }
}

// decode_item for RoPE-pair keys with RoPE (the default presets' path), AVX-512: each tile's slot
// words (K and V streams together) are loaded and transposed once in pass 1 and kept for the
// value pass; keys are rebuilt and scored in registers.
void decode_item_pairs512(const DecodeArgs& a, const Item& item, int h, int64_t span, const TileRope& tr,
                          DecodeScratch& s, float* part);
#endif

// One (item, kv head): writes per query head of the group [max, sum, acc[D]] into part.
void decode_item(const DecodeArgs& a, const Item& item, int h, int64_t span, const TileRope& tr, DecodeScratch& s,
                 float* part) {
  const int D = a.dim, half = D / 2, G = a.q_heads / a.heads;
  const float* q = a.query + (static_cast<int64_t>(item.b) * a.q_heads + static_cast<int64_t>(h) * G) * D;
  const int64_t* bt = a.block_table + item.b * a.stride_bt;
  const uint8_t* head_pages = a.pages + h * a.stride_ph;
  const float* mean_k = a.k.mean + static_cast<int64_t>(h) * D;
  const float* inv_k = a.k.inverse + static_cast<int64_t>(h) * D * D;
  const bool pairs = a.pairs.a != nullptr;
  const int64_t poff = static_cast<int64_t>(h) * half;
  const float *pa = pairs ? a.pairs.a + poff : nullptr, *pb = pairs ? a.pairs.b + poff : nullptr;
  const float *pc = pairs ? a.pairs.c + poff : nullptr, *pd = pairs ? a.pairs.d + poff : nullptr;
  const float* rcos = tr.cos;
  const float* rsin = tr.sin;
  const bool rope = a.rope != nullptr;
  float* zk = s.zk.data();
  float* key = s.key.data();
  float* sc = s.scores.data();
  float* qrot = s.qrot.data();
  int32_t* words = s.words.data();
  const int64_t first = item.lo / W * W;  // tiles are aligned to W positions
  const uint8_t* slots[W];

  auto locate = [&](int64_t p0, const uint8_t** out) { locate_tile(a, item, head_pages, bt, p0, out); };

  // ---- pass 1: scores of the item's positions
  for (int64_t p0 = first; p0 < item.hi; p0 += W) {
    locate(p0, slots);
#if defined(CPU_CAPABILITY_AVX512)
    if (pairs && rope) {  // fused: levels read straight into the precomposed pair blocks
      load_words(slots, a.k, words);
      const ComponentReader read(a.k, h, D, words);
      const float* m = tr.pair_blocks + static_cast<int64_t>(h) * half * 6 * W;
      for (int j = 0; j < half; ++j) {
        const float* mj = m + j * 6 * W;
        const __m512 lo = read(j), hi = read(j + half);
        _mm512_storeu_ps(key + j * W, _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + W), _mm512_loadu_ps(mj + 4 * W))));
        _mm512_storeu_ps(key + (j + half) * W, _mm512_fmadd_ps(lo, _mm512_loadu_ps(mj + 2 * W), _mm512_fmadd_ps(hi, _mm512_loadu_ps(mj + 3 * W), _mm512_loadu_ps(mj + 5 * W))));
      }
    } else
#endif
    {
    extract_tile(slots, a.k, h, D, zk, words);
    if (pairs && rope) {  // rotated key pair = (R(t) B_j) z + R(t) mean, precomposed per lane
      const float* m = tr.pair_blocks + static_cast<int64_t>(h) * half * 6 * W;
      for (int j = 0; j < half; ++j) {
        const float* mj = m + j * 6 * W;
        for (int u = 0; u < W; u += VS) {
          const Vec lo = Vec::loadu(zk + j * W + u), hi = Vec::loadu(zk + (j + half) * W + u);
          at::vec::fmadd(lo, Vec::loadu(mj + u), at::vec::fmadd(hi, Vec::loadu(mj + W + u), Vec::loadu(mj + 4 * W + u)))
              .store(key + j * W + u);
          at::vec::fmadd(lo, Vec::loadu(mj + 2 * W + u), at::vec::fmadd(hi, Vec::loadu(mj + 3 * W + u), Vec::loadu(mj + 5 * W + u)))
              .store(key + (j + half) * W + u);
        }
      }
    } else if (pairs) {  // pre-RoPE key pair from its 2x2 block
      for (int j = 0; j < half; ++j) {
        const Vec va(pa[j]), vb(pb[j]), vc(pc[j]), vd(pd[j]), m_lo(mean_k[j]), m_hi(mean_k[j + half]);
        for (int u = 0; u < W; u += VS) {
          const Vec lo = Vec::loadu(zk + j * W + u), hi = Vec::loadu(zk + (j + half) * W + u);
          const Vec k_lo = at::vec::fmadd(lo, va, at::vec::fmadd(hi, vb, m_lo));
          const Vec k_hi = at::vec::fmadd(lo, vc, at::vec::fmadd(hi, vd, m_hi));
          if (rope) {
            const Vec c = Vec::loadu(rcos + j * W + u), sv = Vec::loadu(rsin + j * W + u);
            (k_lo * c - k_hi * sv).store(key + j * W + u);
            at::vec::fmadd(k_hi, c, k_lo * sv).store(key + (j + half) * W + u);
          } else {
            k_lo.store(key + j * W + u);
            k_hi.store(key + (j + half) * W + u);
          }
        }
      }
    } else {
      for (int d = 0; d < D; ++d) {
        const Vec m(mean_k[d]);
        for (int u = 0; u < W; u += VS) m.store(key + d * W + u);
      }
      for (int c = 0; c < D; ++c) {
        Vec zc[NV];
        for (int u = 0; u < NV; ++u) zc[u] = Vec::loadu(zk + c * W + u * VS);
        const float* inv = inv_k + static_cast<int64_t>(c) * D;
        for (int d = 0; d < D; ++d) {
          const Vec w(inv[d]);
          for (int u = 0; u < NV; ++u) {
            float* dst = key + d * W + u * VS;
            at::vec::fmadd(zc[u], w, Vec::loadu(dst)).store(dst);
          }
        }
      }
      if (rope) {
        for (int j = 0; j < half; ++j) {
          for (int u = 0; u < W; u += VS) {
            const Vec c = Vec::loadu(rcos + j * W + u), sv = Vec::loadu(rsin + j * W + u);
            const Vec lo = Vec::loadu(key + j * W + u), hi = Vec::loadu(key + (j + half) * W + u);
            (lo * c - hi * sv).store(key + j * W + u);
            at::vec::fmadd(hi, c, lo * sv).store(key + (j + half) * W + u);
          }
        }
      }
    }
    }
    const float* qs = q;
    if (rope) {  // queries by R(p0)^T
      rotate_queries(q, a.rope + p0 * D, G, D, qrot);
      qs = qrot;
    }
    float* dst = sc + (p0 - first);
    int g = 0;
    for (; g + 4 <= G; g += 4) score_heads<4>(qs + g * D, key, D, a.scale, dst + g * span, span);
    switch (G - g) {
      case 3: score_heads<3>(qs + g * D, key, D, a.scale, dst + g * span, span); break;
      case 2: score_heads<2>(qs + g * D, key, D, a.scale, dst + g * span, span); break;
      case 1: score_heads<1>(qs + g * D, key, D, a.scale, dst + g * span, span); break;
      default: break;
    }
    const int64_t lo_lane = std::max<int64_t>(item.lo - p0, 0), hi_lane = std::min<int64_t>(item.hi - p0, W);
    if (lo_lane > 0 || hi_lane < W) {
      for (int gg = 0; gg < G; ++gg) {
        for (int64_t t = 0; t < lo_lane; ++t) dst[gg * span + t] = kNegInf;
        for (int64_t t = hi_lane; t < W; ++t) dst[gg * span + t] = kNegInf;
      }
    }
  }

  // ---- softmax of the item
  const int64_t padded = (item.hi - first + W - 1) / W * W;
  softmax_item(sc, span, G, padded, D, part);

  bool values_done = false;
#if defined(CPU_CAPABILITY_AVX512)
  {  // ---- pass 2: level sums of the values, component-outer over groups of tiles
    float* acc = s.acc.data();
    std::fill(acc, acc + static_cast<int64_t>(G) * D * W, 0.f);
    const int ntiles = static_cast<int>(padded / W);
    const int64_t stride = static_cast<int64_t>(s.vwords.size()) / kValueGroupTiles;
    int32_t* vwords = s.vwords.data();
    const ComponentReader read(a.v, h, D, vwords);
    for (int i0 = 0; i0 < ntiles; i0 += kValueGroupTiles) {
      const int n = std::min(kValueGroupTiles, ntiles - i0);
      for (int i = 0; i < n; ++i) {
        locate(first + static_cast<int64_t>(i0 + i) * W, slots);
        load_words(slots, a.v, vwords + i * stride);
      }
      const float* p = sc + static_cast<int64_t>(i0) * W;
      int g = 0;
      for (; g + 4 <= G; g += 4) value_sums<4>(read, vwords, stride, n, p + g * span, span, D, acc + g * D * W);
      switch (G - g) {
        case 3: value_sums<3>(read, vwords, stride, n, p + g * span, span, D, acc + g * D * W); break;
        case 2: value_sums<2>(read, vwords, stride, n, p + g * span, span, D, acc + g * D * W); break;
        case 1: value_sums<1>(read, vwords, stride, n, p + g * span, span, D, acc + g * D * W); break;
        default: break;
      }
    }
    values_done = true;
  }
#endif
  if (!values_done) {  // portable builds
    // ---- pass 2: level sums of the values, lane-wise acc[g][c][t] (reduced at the end),
    // nvt tiles of levels per pass over acc (tiles past the item: weight 0, levels left finite)
    float* acc = s.acc.data();
    float* zv = s.zv.data();
    const int nvt = D * W * 4 * 4 <= 16384 ? 4 : D * W * 4 * 2 <= 16384 ? 2 : 1;  // <= 16 KiB of levels
    std::fill(acc, acc + static_cast<int64_t>(G) * D * W, 0.f);
    for (int g = 0; g < G; ++g) std::fill(sc + g * span + padded, sc + g * span + padded + nvt * W, 0.f);
    for (int64_t p0 = first; p0 < item.hi; p0 += static_cast<int64_t>(nvt) * W) {
      const int n = static_cast<int>(std::min<int64_t>(nvt, (item.hi - p0 + W - 1) / W));
      for (int i = 0; i < n; ++i) {
        locate(p0 + static_cast<int64_t>(i) * W, slots);
        extract_tile(slots, a.v, h, D, zv + static_cast<int64_t>(i) * D * W, words);
      }
      for (int g = 0; g < G; ++g) {
        const float* pg = sc + g * span + (p0 - first);
        float* ag = acc + static_cast<int64_t>(g) * D * W;
        if (nvt == 4) {
          accumulate_values<4>(pg, zv, ag, D);
        } else if (nvt == 2) {
          accumulate_values<2>(pg, zv, ag, D);
        } else {
          accumulate_values<1>(pg, zv, ag, D);
        }
      }
    }
  }
  const float* acc_all = s.acc.data();
  for (int g = 0; g < G; ++g) {
    float* out = part + g * (D + 2) + 2;
    const float* ag = acc_all + static_cast<int64_t>(g) * D * W;
    for (int c = 0; c < D; ++c) {
      Vec r = Vec::loadu(ag + c * W);
      for (int u = 1; u < NV; ++u) r = r + Vec::loadu(ag + c * W + u * VS);
      float lanes[VS];
      r.store(lanes);
      float sum = 0.f;
      for (int i = 0; i < VS; ++i) sum += lanes[i];
      out[c] = sum;
    }
  }
}


#if defined(CPU_CAPABILITY_AVX512)
void decode_item_pairs512(const DecodeArgs& a, const Item& item, int h, int64_t span, const TileRope& tr,
                          DecodeScratch& s, float* part) {
  const int D = a.dim, half = D / 2, G = a.q_heads / a.heads;
  const float* q = a.query + (static_cast<int64_t>(item.b) * a.q_heads + static_cast<int64_t>(h) * G) * D;
  const int64_t* bt = a.block_table + item.b * a.stride_bt;
  const uint8_t* head_pages = a.pages + h * a.stride_ph;
  const float* m = tr.pair_blocks + static_cast<int64_t>(h) * half * 6 * W;
  float* sc = s.scores.data();
  float* qrot = s.qrot.data();
  float* key = s.key.data();
  int32_t* tiles = s.tiles.data();
  const int slot_bytes = slot_bytes_of(a.k, a.v);
  const int64_t stride = tile_stride(slot_bytes);
  const int first_word = std::min(a.k.first_word, a.v.first_word);
  const int num_words = std::max(a.k.first_word + a.k.num_words, a.v.first_word + a.v.num_words) - first_word;
  const int64_t first = item.lo / W * W;
  const int ntiles = static_cast<int>((item.hi - first + W - 1) / W);
  const uint8_t* slots[W];
  const ComponentReader read_k(a.k, h, D, nullptr);

  // ---- pass 1: words of every tile (kept), scores of the item's positions; the next tile's slot
  // rows are prefetched while this one is scored (a block's rows are contiguous, but the next
  // block of a sequence is anywhere in the pages)
  // lanes of tile i outside the item's positions [lo, hi): scores -inf
  auto mask_tile = [&](int i, float* dst) {
    const int64_t p0 = first + static_cast<int64_t>(i) * W;
    const int64_t lo_lane = std::max(p0, item.lo) - p0, hi_lane = std::min(p0 + W, item.hi) - p0;
    if (lo_lane > 0 || hi_lane < W) {
      for (int g = 0; g < G; ++g) {
        for (int64_t t = 0; t < lo_lane; ++t) dst[g * span + t] = kNegInf;
        for (int64_t t = hi_lane; t < W; ++t) dst[g * span + t] = kNegInf;
      }
    }
  };
  const uint8_t* next[W];
  if (!kAblatePageReads) locate_tile(a, item, head_pages, bt, first, next);
  const int line_first = 4 * first_word / 64 * 64, line_end = 4 * (first_word + num_words);
  for (int i = 0; i < ntiles; ++i) {
    const int64_t p0 = first + static_cast<int64_t>(i) * W;
    int32_t* tw = tiles + i * stride;
    if (!kAblatePageReads) {
      std::copy(next, next + W, slots);
      if (i + 1 < ntiles) {
        locate_tile(a, item, head_pages, bt, p0 + W, next);
        for (int t = 0; t < W; ++t)
          for (int off = line_first; off < line_end; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next[t] + off), _MM_HINT_T0);
      }
      load_word_range(slots, first_word, num_words, tw);
    }
    // queries by R(p0)^T; two tiles' rotations kept: with G <= 4 tiles are scored in pairs
    float* qr = qrot + (i & 1) * G * D;
    rotate_queries(q, a.rope + p0 * D, G, D, qr);
    float* dst = sc + (p0 - first);
    if (kAblateScores) {
      for (int g = 0; g < G; ++g) std::fill(dst + g * span, dst + g * span + W, 0.f);
    } else if (G <= 4 && (i & 1) == 0 && i + 1 < ntiles) {
      continue;  // scored with the next tile (its masks too)
    } else if (G <= 4 && (i & 1) == 1) {
      score_pairs2_group(read_k, tiles + (i - 1) * stride, tw, m, qrot, qr, D, a.scale, dst - W, dst, span, G);
      mask_tile(i - 1, dst - W);
    } else if (G <= 8) {
      score_pairs_group<8>(read_k, tw, m, qr, D, a.scale, dst, span, G);
    } else {  // wide groups (a shared prefix's queries): the tile's keys rebuilt once, then scored
      rebuild_pair_keys(read_k, tw, m, D, key);
      score_all_heads(qr, key, D, G, a.scale, dst, span);
    }
    mask_tile(i, dst);
  }

  // ---- softmax of the item
  softmax_item(sc, span, G, static_cast<int64_t>(ntiles) * W, D, part);

  // ---- pass 2: level sums of the values from the kept words, component-outer over groups of tiles
  float* acc = s.acc.data();
  float* zv = s.zv.data();
  std::fill(acc, acc + static_cast<int64_t>(G) * D * W, 0.f);
  const ComponentReader read_v(a.v, h, D, nullptr);
  for (int i0 = 0; i0 < ntiles; i0 += kValueGroupTiles) {
    const int n = std::min(kValueGroupTiles, ntiles - i0);
    const int32_t* tw = tiles + i0 * stride;
    const float* p = sc + static_cast<int64_t>(i0) * W;
    if (G > 4) {  // wide groups: the tiles' value levels read once, then summed for every head
      for (int i = i0; i < i0 + n; i += kMaxValueTiles) {
        const int nl = std::min(kMaxValueTiles, i0 + n - i);
        for (int k = 0; k < nl; ++k)
          for (int c = 0; c < D; ++c) _mm512_storeu_ps(zv + (static_cast<int64_t>(k) * D + c) * W, read_v.at(c, tiles + (i + k) * stride));
        const float* pl = sc + static_cast<int64_t>(i) * W;
        int g = 0;
        for (; g + 4 <= G; g += 4) level_sums<4>(zv, nl, pl + g * span, span, D, acc + g * D * W);
        switch (G - g) {
          case 3: level_sums<3>(zv, nl, pl + g * span, span, D, acc + g * D * W); break;
          case 2: level_sums<2>(zv, nl, pl + g * span, span, D, acc + g * D * W); break;
          case 1: level_sums<1>(zv, nl, pl + g * span, span, D, acc + g * D * W); break;
          default: break;
        }
      }
      continue;
    }
    if (kAblateValues) continue;
    int g = 0;
    for (; g + 4 <= G; g += 4) value_sums<4>(read_v, tw, stride, n, p + g * span, span, D, acc + g * D * W);
    switch (G - g) {
      case 3: value_sums<3>(read_v, tw, stride, n, p + g * span, span, D, acc + g * D * W); break;
      case 2: value_sums<2>(read_v, tw, stride, n, p + g * span, span, D, acc + g * D * W); break;
      case 1: value_sums<1>(read_v, tw, stride, n, p + g * span, span, D, acc + g * D * W); break;
      default: break;
    }
  }
  for (int g = 0; g < G; ++g) {
    float* out = part + g * (D + 2) + 2;
    const float* ag = acc + static_cast<int64_t>(g) * D * W;
    for (int c = 0; c < D; ++c) out[c] = _mm512_reduce_add_ps(_mm512_loadu_ps(ag + c * W));
  }
}
#endif
}  // namespace

int vector_width() { return VS; }

void decode_attention(const DecodeArgs& a) {
  const int B = a.batch, H = a.heads, Hq = a.q_heads, D = a.dim, G = Hq / H;
  std::vector<int64_t> first(B + 1, 0);
  int64_t total = 0, longest = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t cached = std::max<int64_t>(a.seq_lens[b] - 1, 0);
    const int64_t lo = std::min(a.skip_first, cached);
    total += cached - lo;
    longest = std::max(longest, cached - lo);
  }
  int64_t chunk;
  if (a.num_splits > 0) {
    chunk = (longest + a.num_splits - 1) / a.num_splits;
  } else {
    const int64_t workers = 4 * std::max(1, at::get_num_threads());
    chunk = std::min<int64_t>(std::max<int64_t>((total * H + workers - 1) / workers, 128), 512);
  }
  chunk = std::max<int64_t>((chunk + W - 1) / W * W, W);
  std::vector<Item> items;
  for (int b = 0; b < B; ++b) {  // chunk boundaries at multiples of chunk: tiles stay aligned
    first[b] = static_cast<int64_t>(items.size());
    const int64_t cached = std::max<int64_t>(a.seq_lens[b] - 1, 0);
    const int64_t lo = std::min(a.skip_first, cached);
    for (int64_t c0 = lo / chunk * chunk; lo < cached && c0 < cached; c0 += chunk)
      items.push_back(Item{b, std::max(c0, lo), std::min(c0 + chunk, cached)});  // never empty
  }
  first[B] = static_cast<int64_t>(items.size());
  const TileRope tr{a.tile_cos, a.tile_sin, a.tile_pairs};
  const int64_t row = D + 2;
  const int64_t span = chunk + 5 * W;  // a chunk, its alignment and the value pass' padding tiles
  const int slot_bytes = slot_bytes_of(a.k, a.v);
  AlignedVector<float> part(items.size() * H * G * row);
  const int64_t tasks = static_cast<int64_t>(items.size()) * H;
  // a call with little work runs on the calling thread: waking the others costs more (~5 us
  // measured with 2 threads at 64 positions x 3 KV heads; 2 threads pay from ~768 position-heads)
  const int64_t grain = total * H < kParallelPositionHeads ? std::max<int64_t>(tasks, 1) : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    DecodeScratch& scratch = thread_scratch(G, span, D, slot_bytes);
    for (int64_t task = begin; task < end; ++task) {
      float* out = part.data() + task * G * row;
#if defined(CPU_CAPABILITY_AVX512)
      if (a.pairs.a != nullptr && a.rope != nullptr) {
        decode_item_pairs512(a, items[task / H], static_cast<int>(task % H), span, tr, scratch, out);
        continue;
      }
#endif
      decode_item(a, items[task / H], static_cast<int>(task % H), span, tr, scratch, out);
    }
  });

  at::parallel_for(0, static_cast<int64_t>(B) * Hq, kMergeRowsPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> maxes, sums, accz(D), cached(D), mean(D);
    for (int64_t r = begin; r < end; ++r) {
      const int b = static_cast<int>(r / Hq), hq = static_cast<int>(r % Hq), h = hq / G, g = hq % G;
      const float* q = a.query + r * D;
      // no own token (a shared prefix's pass): its weight is exp(-inf) = 0
      const float* own_k = a.own_k == nullptr ? nullptr : a.own_k + (static_cast<int64_t>(b) * H + h) * D;
      const float* own_v = a.own_v == nullptr ? nullptr : a.own_v + (static_cast<int64_t>(b) * H + h) * D;
      float own_score = kNegInf;
      if (own_k != nullptr) {
        own_score = 0.f;
        for (int d = 0; d < D; ++d) own_score += q[d] * own_k[d];
        own_score *= a.scale;
      }
      maxes.clear();
      sums.clear();
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const float* p = part.data() + ((i * H + h) * G + g) * row;
        maxes.push_back(p[0]);
        sums.push_back(p[1]);
      }
      // exact sink rows: merged as splits of one position each (their values added below)
      const int sinks = a.sink_k == nullptr ? 0 : static_cast<int>(std::min<int64_t>(a.sinks, a.seq_lens[b] - 1));
      const int64_t num_splits = static_cast<int64_t>(maxes.size());
      for (int i = 0; i < sinks; ++i) {
        const float* sk = a.sink_k + ((static_cast<int64_t>(b) * a.sinks + i) * H + h) * D;
        float score = 0.f;
        for (int d = 0; d < D; ++d) score += q[d] * sk[d];
        maxes.push_back(score * a.scale);
        sums.push_back(1.f);
      }
      const auto m = transform::merge_splits(maxes.data(), sums.data(), static_cast<int>(maxes.size()), own_score);
      std::fill(accz.begin(), accz.end(), 0.f);
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const float* p = part.data() + ((i * H + h) * G + g) * row;
        const Vec w(transform::split_weight(m, p[0]));
        for (int c = 0; c < D; c += VS) at::vec::fmadd(w, Vec::loadu(p + 2 + c), Vec::loadu(accz.data() + c)).store(accz.data() + c);
      }
      const float* inv_v = a.v.inverse + static_cast<int64_t>(h) * D * D;
      const float* mean_v = a.v.mean + static_cast<int64_t>(h) * D;
      float pages_mass = 0.f;  // m.mass counts the sinks too; mean_v weighs the pages' rows only
      for (int64_t i = 0; i < num_splits; ++i) pages_mass += transform::split_weight(m, maxes[i]) * sums[i];
      const Vec mass(pages_mass);
      for (int d = 0; d < D; d += VS) (Vec::loadu(mean_v + d) * mass).store(mean.data() + d);
      // cached = accz @ inverse + mass mean (accz: scratch of the fallback)
      if (!row_times_matrix_fast(accz.data(), inv_v, mean.data(), cached.data(), D)) {
        std::copy(accz.begin(), accz.end(), cached.begin());
        rebuild_rows(cached.data(), 1, inv_v, mean.data(), D, accz.data());
      }
      for (int i = 0; i < sinks; ++i) {  // the exact sink values
        const Vec w(transform::split_weight(m, maxes[num_splits + i]));
        const float* sv = a.sink_v + ((static_cast<int64_t>(b) * a.sinks + i) * H + h) * D;
        for (int d = 0; d < D; d += VS) at::vec::fmadd(w, Vec::loadu(sv + d), Vec::loadu(cached.data() + d)).store(cached.data() + d);
      }
      float* out = a.out + r * D;
      for (int d = 0; d < D; ++d) out[d] = transform::merged_output(m, cached[d], own_v == nullptr ? 0.f : own_v[d]);
      a.lse[r] = transform::merged_lse(m);
    }
  });
}

namespace {
// Levels of both streams of the block's bs slots as rows [bs][D], W slots at a time through
// extract_tile (the decode's vectorized field reader), transposed from its [D][W] layout.
inline void extract_block_rows(const uint8_t* block, int64_t stride_pt, int bs, const Stream& k, const Stream& v, int h,
                               int dim, float* zk, float* zv, float* tile, int32_t* words) {
  const uint8_t* slots[W];
  for (int s0 = 0; s0 < bs; s0 += W) {
    const int n = std::min(W, bs - s0);
    for (int t = 0; t < W; ++t) slots[t] = block + (s0 + std::min(t, n - 1)) * stride_pt;
    for (int stream = 0; stream < 2; ++stream) {
      extract_tile(slots, stream == 0 ? k : v, h, dim, tile, words);
      float* rows = (stream == 0 ? zk : zv) + static_cast<int64_t>(s0) * dim;
      for (int t = 0; t < n; ++t)
        for (int c = 0; c < dim; ++c) rows[static_cast<int64_t>(t) * dim + c] = tile[c * W + t];
    }
  }
}
}  // namespace

void reconstruct(const ReconstructArgs& a) {
  const int H = a.heads, D = a.dim, bs = a.block_size, half = D / 2;
  const int slot_bytes = slot_bytes_of(a.k, a.v);
  at::parallel_for(0, a.num_ids * H, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<float> zk(static_cast<size_t>(bs) * D), zv(static_cast<size_t>(bs) * D), tmp(D), tile(D * W);
    AlignedVector<int32_t> words(tile_words(slot_bytes));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / H;
      const int h = static_cast<int>(task % H);
      const int64_t id = a.block_ids[m];
      auto out_row = [&](float* base, int s) { return base + ((m * bs + s) * H + h) * D; };
      if (id < 0) {
        for (int s = 0; s < bs; ++s) {
          std::fill(out_row(a.key, s), out_row(a.key, s) + D, 0.f);
          std::fill(out_row(a.value, s), out_row(a.value, s) + D, 0.f);
        }
        continue;
      }
      extract_block_rows(a.pages + id * a.stride_pb + h * a.stride_ph, a.stride_pt, bs, a.k, a.v, h, D, zk.data(),
                         zv.data(), tile.data(), words.data());
      const float* mean_k = a.k.mean + static_cast<int64_t>(h) * D;
      if (a.pairs.a != nullptr) {
        rebuild_rows_pairs(zk.data(), bs, a.pairs, h, mean_k, D);
      } else {
        rebuild_rows_fast(zk.data(), bs, a.k.inverse + static_cast<int64_t>(h) * D * D, mean_k, D, tmp.data());
      }
      rebuild_rows_fast(zv.data(), bs, a.v.inverse + static_cast<int64_t>(h) * D * D,
                        a.v.mean + static_cast<int64_t>(h) * D, D, tmp.data());
      for (int s = 0; s < bs; ++s) {
        float* krow = zk.data() + static_cast<int64_t>(s) * D;
        if (a.rope != nullptr) {
          const float* rope_row = a.rope + (a.block_positions[m] + s) * D;
          int j = 0;
          for (; j + VS <= half; j += VS) {
            const Vec c = Vec::loadu(rope_row + j), sn = Vec::loadu(rope_row + half + j);
            const Vec lo = Vec::loadu(krow + j), hi = Vec::loadu(krow + half + j);
            (lo * c - hi * sn).store(krow + j);
            (hi * c + lo * sn).store(krow + half + j);
          }
          for (; j < half; ++j) transform::rope_pair(krow, rope_row, j, D);
        }
        std::memcpy(out_row(a.key, s), krow, sizeof(float) * D);
        std::memcpy(out_row(a.value, s), zv.data() + static_cast<int64_t>(s) * D, sizeof(float) * D);
      }
    }
  });
}

namespace {
// transform::quantize (the number of the component's 2**bits - 1 ascending cuts strictly below
// z; NaN: 0) by vector compares for codes up to 6 bits: its loads do not depend on each other,
// so a write meeting cold tables waits for them together instead of one per binary-search step.
inline int quantize_fast(const float* cuts, int bits, float z) {
#if defined(CPU_CAPABILITY_AVX512)
  if (bits <= 6) {
    const int n = (1 << bits) - 1;
    const __m512 zv = _mm512_set1_ps(z);
    int code = 0;
    for (int i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
      code += __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, cuts + i), zv, _CMP_LT_OQ));
    }
    return code;
  }
#endif
  return transform::quantize(cuts, bits, z);
}

// Codes of one token-head's stream packed into its slot bytes.
inline void pack_stream(const float* z, const Stream& s, int h, int dim, uint8_t* slot, uint8_t* buf) {
  const int64_t hd = static_cast<int64_t>(h) * dim;
  std::memset(buf, 0, s.nbytes + 1);
  for (int c = 0; c < dim; ++c) {
    const int bits = s.nbits[hd + c];
    if (bits <= 0) continue;
    const int code = quantize_fast(s.cuts + s.level_start[hd + c], bits, z[c]);
    const int start = s.start[hd + c];
    const uint32_t v = static_cast<uint32_t>(code) << (start & 7);
    buf[start >> 3] |= static_cast<uint8_t>(v & 0xFFu);
    buf[(start >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
  }
  std::memcpy(slot + s.offset, buf, s.nbytes);
}
}  // namespace

// z = (x - mean) @ basis of one token-head (basis [D, D] of its head): float32 multiply-adds in
// order of d, lanes over the components.
inline void project(const float* x, const float* mean, const float* basis, int dim, float* centred, float* z) {
  for (int d = 0; d < dim; ++d) centred[d] = x[d] - mean[d];
  if (row_times_matrix_fast(centred, basis, nullptr, z, dim)) return;  // the same multiply-adds, in registers
  for (int e = 0; e < dim; e += VS) Vec(0.f).store(z + e);
  for (int d = 0; d < dim; ++d) {
    const Vec xd(centred[d]);
    const float* row = basis + static_cast<int64_t>(d) * dim;
    for (int e = 0; e < dim; e += VS) at::vec::fmadd(xd, Vec::loadu(row + e), Vec::loadu(z + e)).store(z + e);
  }
}

// project for a key basis that only mixes RoPE pairs (blocks [4][D/2] of one head, see
// WriteArgs): z_j = c_j' b[j'][j] + (c_j b[j][j]), z_j' = c_j' b[j'][j'] + (c_j b[j][j']), the
// product in parentheses rounded first: the full product's multiply-adds in order of d, whose
// other terms add exact zeros, so the same components (up to the sign of a zero).
inline void project_pairs(const float* x, const float* mean, const float* blocks, int dim, float* z) {
  const int half = dim / 2;
  const float *b_ll = blocks, *b_lh = blocks + half, *b_hl = blocks + 2 * half, *b_hh = blocks + 3 * half;
  int j = 0;
  for (; j + VS <= half; j += VS) {
    const Vec lo = Vec::loadu(x + j) - Vec::loadu(mean + j);
    const Vec hi = Vec::loadu(x + half + j) - Vec::loadu(mean + half + j);
    at::vec::fmadd(hi, Vec::loadu(b_hl + j), lo * Vec::loadu(b_ll + j)).store(z + j);
    at::vec::fmadd(hi, Vec::loadu(b_hh + j), lo * Vec::loadu(b_lh + j)).store(z + half + j);
  }
  for (; j < half; ++j) {
    const float lo = x[j] - mean[j], hi = x[half + j] - mean[half + j];
    const float p_l = lo * b_ll[j], p_h = lo * b_lh[j];
    z[j] = std::fma(hi, b_hl[j], p_l);
    z[half + j] = std::fma(hi, b_hh[j], p_h);
  }
}

void write_slots(const WriteArgs& a) {
  const int H = a.heads, D = a.dim;
  const bool project_here = a.zk == nullptr;
  at::parallel_for(0, a.tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(std::max(a.k.nbytes, a.v.nbytes) + 2);
    std::vector<float> centred(D), zk(project_here ? D : 0), zv(project_here ? D : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = a.slot_mapping[t];
      if (slot < 0) continue;
      const int64_t blk = slot / a.block_size, off = slot % a.block_size;
      for (int h = 0; h < H; ++h) {
        uint8_t* dst = a.pages + blk * a.stride_pb + h * a.stride_ph + off * a.stride_pt;
        const int64_t row = (t * H + h) * D;
        if (project_here) {
          const int64_t hd = static_cast<int64_t>(h) * D;
          if (a.k_basis_pairs != nullptr)
            project_pairs(a.xk + row, a.k.mean + hd, a.k_basis_pairs + hd * 2, D, zk.data());
          else
            project(a.xk + row, a.k.mean + hd, a.k.basis + hd * D, D, centred.data(), zk.data());
          project(a.xv + row, a.v.mean + hd, a.v.basis + hd * D, D, centred.data(), zv.data());
          pack_stream(zk.data(), a.k, h, D, dst, buf.data());
          pack_stream(zv.data(), a.v, h, D, dst, buf.data());
        } else {
          pack_stream(a.zk + row, a.k, h, D, dst, buf.data());
          pack_stream(a.zv + row, a.v, h, D, dst, buf.data());
        }
      }
    }
  });
}

}  // namespace SEQKV_CPU_NS
}  // namespace cpu
}  // namespace seqkv
