// seqkv CPU ops over transform-format pages (module vllm_seqkv._cpu; importing it registers them
// under torch.ops.seqkv, CPU dispatch key). Python side: vllm_seqkv/kernels/cpu_ops.py.
//
//   cpu_transform_decode_attention(query, own_k?, own_v?, pages, block_table, seq_lens, rope?,
//       k_tables, v_tables, k_format, v_format, key_pairs?, scale, num_splits, skip_first,
//       sink_k?, sink_v?) -> (out [B, Hq, D] query dtype, lse [B, Hq] float32)
//       (sink_k/sink_v [B, S, H, D]: exact rows of positions 0..S-1, S <= skip_first, merged in;
//       own_k/own_v None: no own token at seq_len - 1, the pass over a shared prefix)
//   cpu_reconstruct_transform_blocks(pages, block_ids, rope?, block_positions?, k_tables,
//       v_tables, k_format, v_format, key_pairs?) -> (K, V) float32 [M * bs, H, D]
//   cpu_write_transform_slots(zk, zv, slot_mapping, pages!, k_tables, v_tables, k_format,
//       v_format) -> ()   (zk/zv: float32 [T, H, D] components, computed by the wrapper with the
//       codec's own einsum so that the bytes equal the codec's)
//   cpu_write_transform_tokens(key, value, slot_mapping, positions, pages!, rope?, k_tables, v_tables,
//       k_format, v_format) -> int64 []: tokens with NaN/inf   (the engine's write from the model's K/V:
//       NaN/inf stored as 0, keys un-rotated by the exact inverse of `rope` (the model's table,
//       magnitude included), components computed in the kernel: the codec's bytes up to a code
//       one away where z lies within float32 rounding of a decision threshold, as the GPU writes)
//   cpu_transform_layer_tables(pages, k_tables, v_tables, k_format, v_format, key_pairs?, rope?) -> int32 [N]:
//       what the ops below derive from a layer's tables (and the decode's rope) independently of the
//       tokens; each op takes it as its last argument `layer_tables` (optional: else built per call)
//   cpu_kernel_isa(wanted) -> active ISA ("avx512" | "avx2" | "scalar"; "" only asks,
//       "auto" picks the best the CPU has)
//
// Tables and formats as the CUDA transform ops take them (transform_args.h: [start, nbits,
// level_start, levels, cuts, basis, inverse, mean, pred_w, pred_b], [offset, nbytes, has_pred]); cross-layer
// predicted streams (has_pred) are refused. key_pairs: float32 [4, H, D/2], the 2x2 blocks
// (a, b, c, d) of a pair-block-diagonal key inverse (see PairBlocks), or None for the general
// path. The kernels run the ISA picked at first use (best supported; SEQKV_CPU_ISA overrides).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "../transform_args.h"
#include "transform_cpu.h"

// -DSEQKV_TIME_OP_PARTS (benchmarks/op_parts_in_engine.py; never in a normal build): the decode
// op and the engine-write op's calls of up to 8 tokens add up their time before the kernel
// (argument checks, layer tables, conversions), in it and after it, and print the means per call
// at exit.
#ifdef SEQKV_TIME_OP_PARTS
#include <chrono>
#include <cstdio>
namespace seqkv_op_parts {
struct Parts {
  const char* name;
  double seconds[3] = {0, 0, 0};
  long calls = 0;
  explicit Parts(const char* n) : name(n) {}
  ~Parts() {
    if (calls == 0) return;
    std::fprintf(stderr, "SEQKV_OP_PARTS {\"op\": \"%s\", \"calls\": %ld, \"entry_us\": %.3f, \"kernel_us\": %.3f, \"exit_us\": %.3f}\n",
                 name, calls, seconds[0] / calls * 1e6, seconds[1] / calls * 1e6, seconds[2] / calls * 1e6);
  }
  void add(double t0, double t1, double t2, double t3) {
    seconds[0] += t1 - t0;
    seconds[1] += t2 - t1;
    seconds[2] += t3 - t2;
    ++calls;
  }
};
inline Parts decode("decode_attention"), write("write_tokens");
inline double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
}  // namespace seqkv_op_parts
#define SEQKV_PART_CLOCK(t) const double t = seqkv_op_parts::now()
#define SEQKV_PARTS_ADD(parts, t0, t1, t2, t3) seqkv_op_parts::parts.add(t0, t1, t2, t3)
#else
#define SEQKV_PART_CLOCK(t)
#define SEQKV_PARTS_ADD(parts, t0, t1, t2, t3)
#endif

namespace seqkv {
namespace cpu {
namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(SEQKV_CPU_PORTABLE_ONLY)
#define SEQKV_CPU_DISPATCH(fn, args) scalar::fn(args)
#else
#define SEQKV_CPU_DISPATCH(fn, args)          \
  switch (active_isa()) {                      \
    case kAvx512: avx512::fn(args); break;     \
    case kAvx2: avx2::fn(args); break;         \
    default: scalar::fn(args);                 \
  }
#endif
std::atomic<int> g_isa{-1};

bool cpu_has(Isa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(SEQKV_CPU_PORTABLE_ONLY)
  __builtin_cpu_init();
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
#else
  return isa == kScalar;
#endif
}

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

int best_isa() { return cpu_has(kAvx512) ? kAvx512 : cpu_has(kAvx2) ? kAvx2 : kScalar; }

int parse_isa(const std::string& name) {
  if (name == "avx512") return kAvx512;
  if (name == "avx2") return kAvx2;
  if (name == "scalar") return kScalar;
  TORCH_CHECK(false, "seqkv CPU kernels: unknown ISA '", name, "' (avx512, avx2, scalar, auto)");
}

int active_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = best_isa();
    if (const char* env = std::getenv("SEQKV_CPU_ISA"); env != nullptr && *env && std::string(env) != "auto") {
      const int wanted = parse_isa(env);
      TORCH_CHECK(cpu_has(static_cast<Isa>(wanted)), "SEQKV_CPU_ISA=", env, " but this CPU lacks it");
      isa = wanted;
    }
    g_isa.store(isa);
  }
  return isa;
}

std::string kernel_isa(c10::string_view wanted_view) {
  const std::string wanted(wanted_view);
  if (wanted == "auto") {
    g_isa.store(best_isa());
  } else if (!wanted.empty()) {
    const int isa = parse_isa(wanted);
    TORCH_CHECK(cpu_has(static_cast<Isa>(isa)), "seqkv CPU kernels: this CPU lacks ", wanted);
    g_isa.store(isa);
  }
  return isa_name(active_isa());
}

PairBlocks pair_blocks(const std::optional<at::Tensor>& key_pairs, int64_t heads, int64_t dim, const at::Tensor& pages) {
  if (!key_pairs.has_value() || !key_pairs->defined()) return PairBlocks{nullptr, nullptr, nullptr, nullptr};
  const at::Tensor& p = *key_pairs;
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.device() == pages.device() &&
                  p.sizes() == at::IntArrayRef({4, heads, dim / 2}),
              "key_pairs must be a contiguous float32 [4, H, D/2] tensor on the pages' device");
  const float* base = p.data_ptr<float>();
  const int64_t step = heads * (dim / 2);
  return PairBlocks{base, base + step, base + 2 * step, base + 3 * step};
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_rope(const std::optional<at::Tensor>& rope, int64_t dim, int64_t rows_needed, const at::Tensor& pages) {
  if (!given(rope)) return;
  TORCH_CHECK(rope->dim() == 2 && rope->size(1) == dim && rope->scalar_type() == at::kFloat && rope->is_contiguous() &&
                  rope->device() == pages.device(),
              "rope must be a contiguous float32 [P, D] table on the pages' device");
  TORCH_CHECK(rope->size(0) >= rows_needed, "rope table has ", rope->size(0), " rows, positions up to ",
              rows_needed - 1, " are read");
}

// ---- Layer tables: what the ops derive from one layer's codec tables (and, for the decode, its
// RoPE) independently of the tokens, in one int32 tensor. Built inside each call, or once per
// layer by cpu_transform_layer_tables and passed in (`layer_tables`): a decode step calls the ops
// once per layer with the same tables, and rebuilding them was a large part of a short context's
// call. int32 layout (floats bit-cast):
//   header [kHeader]: magic, version, heads, dim, slot_bytes, k offset, k nbytes, k level entries,
//     v offset, v nbytes, v level entries, has_rope, has_pairs, rope rows used, total size; from
//     int32 kSourcesAt on, the data pointers (int64) of the tensors it was built from (k tables
//     0..7, v tables 0..7, key_pairs, rope), compared at every use;
//   per stream (K, then V): byte, extra, shift, mask [n] each, field [2 n] (FieldDesc), lut16 [16 n];
//   with rope: tile cos, tile sin [D/2 * kTile] each; with rope and pairs: tile pairs
//   [H * D/2 * 6 * kTile] (DecodeArgs); when the key basis is 2x2-block-diagonal on RoPE pairs
//   (header int32 15 = 1): its blocks [H][4][D/2] (WriteArgs::k_basis_pairs).
constexpr int32_t kLayerMagic = 0x564b5153;  // "SQKV"
constexpr int32_t kLayerVersion = 3;
constexpr int64_t kHeader = 64;
constexpr int64_t kSourcesAt = 16;
constexpr int kSources = 18;

struct LayerSizes {
  int64_t stream, tile_rope, tile_pairs, basis_pairs, total;
};

LayerSizes layer_sizes(int64_t heads, int64_t dim, bool rope, bool pairs, bool basis_pairs) {
  const int64_t n = heads * dim, half = dim / 2;
  LayerSizes z{};
  z.stream = 6 * n + 16 * n;
  z.tile_rope = rope ? half * kTile : 0;
  z.tile_pairs = rope && pairs ? heads * half * 6 * kTile : 0;
  z.basis_pairs = basis_pairs ? heads * 4 * half : 0;
  z.total = kHeader + 2 * z.stream + 2 * z.tile_rope + z.tile_pairs + z.basis_pairs;
  return z;
}

// Whether the key basis [H, D, D] (z = x @ basis) only mixes RoPE pairs {j, j + D/2}: every other
// entry exactly zero. Then the write projects keys pair by pair (the same products and sums as
// the full product: the zero terms add exact zeros) and reads 4 D/2 floats per head, not D * D.
bool basis_is_pair_diagonal(const float* basis, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t e = 0; e < dim; ++e)
        if (e != d && e != (d + half) % dim && basis[(h * dim + d) * dim + e] != 0.f) return false;
  return true;
}

// Its blocks [H][4][D/2]: basis[j][j], basis[j][j'], basis[j'][j], basis[j'][j'] (j' = j + D/2).
void fill_basis_pairs(const float* basis, int64_t heads, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* b = basis + h * dim * dim;
    float* o = out + h * 4 * half;
    for (int64_t j = 0; j < half; ++j) {
      o[j] = b[j * dim + j];
      o[half + j] = b[j * dim + j + half];
      o[2 * half + j] = b[(j + half) * dim + j];
      o[3 * half + j] = b[(j + half) * dim + j + half];
    }
  }
}

void sources(at::TensorList k_tables, at::TensorList v_tables, const std::optional<at::Tensor>& key_pairs,
             const std::optional<at::Tensor>& rope, int64_t* out) {
  for (int i = 0; i < 8; ++i) {
    out[i] = reinterpret_cast<int64_t>(k_tables[i].data_ptr());
    out[8 + i] = reinterpret_cast<int64_t>(v_tables[i].data_ptr());
  }
  out[16] = given(key_pairs) ? reinterpret_cast<int64_t>(key_pairs->data_ptr()) : 0;
  out[17] = given(rope) ? reinterpret_cast<int64_t>(rope->data_ptr()) : 0;
}

// One stream's extraction tables (see Stream) from its start/nbits/level_start/levels.
void fill_stream(const transform::StreamTables& t, int64_t entries, int64_t n, int32_t* dst) {
  int32_t *byte = dst, *extra = dst + n, *shift = dst + 2 * n, *mask = dst + 3 * n;
  FieldDesc* field = reinterpret_cast<FieldDesc*>(dst + 4 * n);
  float* lut16 = reinterpret_cast<float*>(dst + 6 * n);
  for (int64_t i = 0; i < n; ++i) {
    const int start = t.start[i], bits = t.nbits[i];
    TORCH_CHECK(bits >= 0 && bits <= 8 && start >= 0 && (bits == 0 || start + bits <= 8 * t.nbytes),
                "transform table start/nbits out of range for a ", t.nbytes, "-byte stream");
    TORCH_CHECK(t.level_start[i] >= 0 && t.level_start[i] + (int64_t{1} << bits) <= entries,
                "transform table level_start out of range: component ", i, " needs entries [",
                t.level_start[i], ", ", t.level_start[i] + (1 << bits), ") of ", entries);
    byte[i] = t.offset + (start >> 3);
    extra[i] = (start & 7) + bits > 8 ? 1 : 0;
    shift[i] = start & 7;
    mask[i] = (1 << bits) - 1;
    const int bit = 8 * t.offset + (bits > 0 ? start : 0);
    field[i] = FieldDesc{(bit >> 5) * kTile, static_cast<uint8_t>(bit & 31),
                         static_cast<uint8_t>((bit & 31) + bits > 32 ? 1 : 0), static_cast<uint8_t>(bits), 0};
    for (int k = 0; k < 16; ++k) lut16[i * 16 + k] = t.levels[t.level_start[i] + (bits <= 4 ? (k & mask[i]) : k)];
  }
}

Stream view_stream(const transform::StreamTables& t, const int32_t* src, int64_t n) {
  const int first_word = t.offset / 4, last_word = (8 * (t.offset + t.nbytes) - 1) >> 5;
  return Stream{t.levels, t.cuts, t.inverse, t.basis, t.mean, t.start, t.nbits, t.level_start, src, src + n, src + 2 * n,
                src + 3 * n, reinterpret_cast<const FieldDesc*>(src + 4 * n), first_word, last_word - first_word + 1,
                t.offset, t.nbytes, reinterpret_cast<const float*>(src + 6 * n)};
}

// Rotations of the in-tile offsets (and the pair blocks composed with them), see DecodeArgs.
void fill_tile(const float* rope, int64_t rope_rows, const PairBlocks& pairs, const float* mean_k, int64_t heads,
               int64_t dim, float* cos, float* sin, float* pair_blocks) {
  const int64_t half = dim / 2;
  for (int t = 0; t < kTile; ++t) {
    // rows >= the table's are only needed by masked lanes (then every position is < kTile)
    const float* row = rope + std::min<int64_t>(t, std::max<int64_t>(rope_rows - 1, 0)) * dim;
    for (int64_t j = 0; j < half; ++j) {
      cos[j * kTile + t] = row[j];
      sin[j * kTile + t] = row[half + j];
    }
  }
  if (pair_blocks == nullptr) return;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t j = 0; j < half; ++j) {
      const int64_t i = h * half + j;
      const float pa = pairs.a[i], pb = pairs.b[i], pc = pairs.c[i], pd = pairs.d[i];
      const float m_lo = mean_k[h * dim + j], m_hi = mean_k[h * dim + half + j];
      float* out = pair_blocks + i * 6 * kTile;
      for (int t = 0; t < kTile; ++t) {
        const float c = cos[j * kTile + t], sn = sin[j * kTile + t];
        // k_lo = lo pa + hi pb + m_lo, k_hi = lo pc + hi pd + m_hi; r_lo = k_lo c - k_hi s, r_hi = k_hi c + k_lo s
        out[t] = pa * c - pc * sn;
        out[kTile + t] = pb * c - pd * sn;
        out[2 * kTile + t] = pc * c + pa * sn;
        out[3 * kTile + t] = pd * c + pb * sn;
        out[4 * kTile + t] = m_lo * c - m_hi * sn;
        out[5 * kTile + t] = m_hi * c + m_lo * sn;
      }
    }
  }
}

// What the kernels read of one layer: streams, pair blocks, tile rotations (pointers into the
// codec's tables and into `owner`, the layer tables).
struct LayerView {
  Stream k, v;
  PairBlocks pairs;
  const float *tile_cos, *tile_sin, *tile_pairs;
  const float* k_basis_pairs;
  at::Tensor owner;
};

at::Tensor build_layer_tables(const transform::StreamTables& kt, const transform::StreamTables& vt, at::TensorList k_tables,
                              at::TensorList v_tables, const PairBlocks& pairs, const std::optional<at::Tensor>& key_pairs,
                              const std::optional<at::Tensor>& rope, const at::Tensor& pages, int64_t heads, int64_t dim) {
  const bool has_rope = given(rope), has_pairs = pairs.a != nullptr;
  const bool basis_pairs = dim % 2 == 0 && basis_is_pair_diagonal(kt.basis, heads, dim);
  const LayerSizes z = layer_sizes(heads, dim, has_rope, has_pairs, basis_pairs);
  const int64_t n = heads * dim, half = dim / 2;
  auto blob = at::empty({z.total}, pages.options().dtype(at::kInt));
  int32_t* p = blob.data_ptr<int32_t>();
  std::fill(p, p + kHeader, 0);
  const int64_t rope_rows = has_rope ? rope->size(0) : 0;
  const int64_t header[] = {kLayerMagic, kLayerVersion, heads, dim, pages.size(3), kt.offset, kt.nbytes, k_tables[3].numel(),
                            vt.offset, vt.nbytes, v_tables[3].numel(), has_rope, has_pairs,
                            std::min<int64_t>(rope_rows, kTile), z.total};
  for (size_t i = 0; i < sizeof(header) / sizeof(header[0]); ++i) p[i] = static_cast<int32_t>(header[i]);
  p[15] = basis_pairs;
  sources(k_tables, v_tables, key_pairs, rope, reinterpret_cast<int64_t*>(p + kSourcesAt));
  fill_stream(kt, k_tables[3].numel(), n, p + kHeader);
  fill_stream(vt, v_tables[3].numel(), n, p + kHeader + z.stream);
  if (has_rope) {
    float* cos = reinterpret_cast<float*>(p + kHeader + 2 * z.stream);
    fill_tile(rope->data_ptr<float>(), rope_rows, pairs, kt.mean, heads, dim, cos, cos + half * kTile,
              has_pairs ? cos + 2 * half * kTile : nullptr);
  }
  if (basis_pairs)
    fill_basis_pairs(kt.basis, heads, dim, reinterpret_cast<float*>(p + z.total - z.basis_pairs));
  return blob;
}

// The layer's tables for one call: `layer_tables` when given (checked to have been built from
// these very tensors: same data pointers, sizes and formats; with `with_tile` also the same
// key_pairs and rope), else built here. The codec tables are checked (shapes, dtypes, device) in
// every call.
LayerView layer_view(const std::optional<at::Tensor>& layer_tables, at::TensorList k_tables, at::TensorList v_tables,
                     at::IntArrayRef k_format, at::IntArrayRef v_format, const std::optional<at::Tensor>& key_pairs,
                     const std::optional<at::Tensor>& rope, const at::Tensor& pages, int64_t heads, int64_t dim,
                     bool with_tile) {
  const transform::StreamTables kt = transform::stream_tables(k_tables, k_format, pages, heads, dim);
  const transform::StreamTables vt = transform::stream_tables(v_tables, v_format, pages, heads, dim);
  TORCH_CHECK(!kt.has_pred && !vt.has_pred, "seqkv CPU ops read streams without cross-layer prediction (has_pred "
              "must be 0); cross-layer presets use the torch path");
  const int64_t slot_bytes = std::max(kt.offset + kt.nbytes, vt.offset + vt.nbytes);
  TORCH_CHECK(slot_bytes == pages.size(3), "pages: slots of ", pages.size(3), " bytes, but the K and V streams take ",
              slot_bytes);
  LayerView view{};
  view.pairs = pair_blocks(key_pairs, heads, dim, pages);
  const bool has_rope = with_tile && given(rope);
  if (has_rope) check_rope(rope, dim, 0, pages);
  if (given(layer_tables)) {
    const at::Tensor& t = *layer_tables;
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous() && t.device() == pages.device() &&
                    t.numel() >= kHeader, "layer_tables must be the int32 tensor cpu_transform_layer_tables returns");
    const int32_t* p = t.data_ptr<int32_t>();
    TORCH_CHECK(p[0] == kLayerMagic && p[1] == kLayerVersion && p[14] == t.numel() &&
                    layer_sizes(heads, dim, p[11] != 0, p[12] != 0, p[15] != 0).total == t.numel(),
                "layer_tables: not (or no longer) a cpu_transform_layer_tables result (magic, version or size differ)");
    const int64_t expected[] = {heads, dim, pages.size(3), kt.offset, kt.nbytes, k_tables[3].numel(), vt.offset,
                                vt.nbytes, v_tables[3].numel()};
    bool same = true;
    for (int i = 0; i < 9; ++i) same = same && p[2 + i] == expected[i];
    int64_t now[kSources];
    sources(k_tables, v_tables, key_pairs, rope, now);
    const int64_t* then = reinterpret_cast<const int64_t*>(p + kSourcesAt);
    for (int i = 0; i < 16; ++i) same = same && now[i] == then[i];
    TORCH_CHECK(same, "layer_tables were built from other codec tables or pages than this call's (rebuild them "
                "with cpu_transform_layer_tables for these tensors)");
    if (with_tile) {
      const int64_t rows = has_rope ? std::min<int64_t>(rope->size(0), kTile) : 0;
      TORCH_CHECK(p[11] == has_rope && p[12] == (view.pairs.a != nullptr) && p[13] == rows && now[16] == then[16] &&
                      now[17] == then[17],
                  "layer_tables were built for another rope / key_pairs than this call's");
    }
    view.owner = t;
  } else {
    view.owner = build_layer_tables(kt, vt, k_tables, v_tables, view.pairs, key_pairs, has_rope ? rope : std::nullopt,
                                    pages, heads, dim);
  }
  const int32_t* p = view.owner.data_ptr<int32_t>();
  const LayerSizes z = layer_sizes(heads, dim, p[11] != 0, p[12] != 0, p[15] != 0);
  const int64_t n = heads * dim, half = dim / 2;
  view.k = view_stream(kt, p + kHeader, n);
  view.v = view_stream(vt, p + kHeader + z.stream, n);
  const float* cos = p[11] ? reinterpret_cast<const float*>(p + kHeader + 2 * z.stream) : nullptr;
  view.tile_cos = has_rope ? cos : nullptr;
  view.tile_sin = has_rope ? cos + half * kTile : nullptr;
  view.tile_pairs = has_rope && view.pairs.a != nullptr ? cos + 2 * half * kTile : nullptr;
  view.k_basis_pairs = p[15] ? reinterpret_cast<const float*>(p + z.total - z.basis_pairs) : nullptr;
  return view;
}

// The layer tables of cpu_transform_layer_tables (see above): for the decode and write ops of
// `pages`' layer with these codec tables, key_pairs and rope.
at::Tensor layer_tables(const at::Tensor& pages, at::TensorList k_tables, at::TensorList v_tables, at::IntArrayRef k_format,
                        at::IntArrayRef v_format, const std::optional<at::Tensor>& key_pairs,
                        const std::optional<at::Tensor>& rope) {
  TORCH_CHECK(pages.device().is_cpu(), "seqkv CPU ops: pages must be a CPU tensor, got ", pages.device());
  transform::check_pages(pages);
  const int64_t heads = pages.size(1);
  const int64_t dim = k_tables.size() > 7 ? k_tables[7].size(-1) : 0;
  transform::check_head_dim(dim);
  return layer_view(std::nullopt, k_tables, v_tables, k_format, v_format, key_pairs, rope, pages, heads, dim, true).owner;
}

// One past the last byte of the pages view (a 4-byte SIMD read must not pass it).
const uint8_t* pages_end(const at::Tensor& pages) {
  if (pages.numel() == 0) return pages.data_ptr<uint8_t>();
  int64_t last = 0;
  for (int64_t i = 0; i < pages.dim(); ++i) last += (pages.size(i) - 1) * pages.stride(i);
  return pages.data_ptr<uint8_t>() + last + 1;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "seqkv CPU ops: ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& query_in, const std::optional<at::Tensor>& own_k_in, const std::optional<at::Tensor>& own_v_in,
    const at::Tensor& pages, const at::Tensor& block_table_in, const at::Tensor& seq_lens_in,
    const std::optional<at::Tensor>& rope, at::TensorList k_tables, at::TensorList v_tables, at::IntArrayRef k_format,
    at::IntArrayRef v_format, const std::optional<at::Tensor>& key_pairs, double scale, int64_t num_splits,
    int64_t skip_first,
    const std::optional<at::Tensor>& sink_k_in, const std::optional<at::Tensor>& sink_v_in,
    const std::optional<at::Tensor>& layer_tables) {
  SEQKV_PART_CLOCK(t0);
  check_cpu(pages, "pages");
  transform::check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(query_in.dim() == 3 && transform::is_float(query_in) && query_in.device() == pages.device(),
              "query must be float [B, Hq, D] on the pages' device");
  const int64_t batch = query_in.size(0), q_heads = query_in.size(1), dim = query_in.size(2);
  transform::check_head_dim(dim);
  TORCH_CHECK(q_heads % heads == 0, "query heads must be a multiple of kv heads");
  // no own token (own_k and own_v None): the queries are not part of the cache (a shared prefix's
  // pass); seq_lens still count one position past the cached ones
  const bool has_own = own_k_in.has_value() && own_k_in->defined();
  TORCH_CHECK(has_own == (own_v_in.has_value() && own_v_in->defined()), "pass both own_k and own_v or neither");
  if (has_own) {
    for (const auto* t : {&*own_k_in, &*own_v_in}) {
      TORCH_CHECK(t->sizes() == at::IntArrayRef({batch, heads, dim}) && transform::is_float(*t) &&
                      t->device() == pages.device(), "own_k/own_v must be float [B, H, D] on the pages' device");
    }
  }
  TORCH_CHECK(block_table_in.dim() == 2 && block_table_in.size(0) == batch &&
                  (block_table_in.scalar_type() == at::kInt || block_table_in.scalar_type() == at::kLong) &&
                  block_table_in.device() == pages.device(), "block_table must be int [B, max_blocks]");
  TORCH_CHECK(seq_lens_in.dim() == 1 && seq_lens_in.size(0) == batch &&
                  (seq_lens_in.scalar_type() == at::kInt || seq_lens_in.scalar_type() == at::kLong) &&
                  seq_lens_in.device() == pages.device(), "seq_lens must be int [B]");
  TORCH_CHECK(skip_first >= 0, "skip_first must be >= 0");
  const LayerView lv = layer_view(layer_tables, k_tables, v_tables, k_format, v_format, key_pairs, rope, pages, heads,
                                  dim, true);
  auto out = at::empty({batch, q_heads, dim}, query_in.options());
  auto lse = at::empty({batch, q_heads}, query_in.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};

  const auto block_table = block_table_in.to(at::kLong).contiguous();
  const auto seq_lens = seq_lens_in.to(at::kLong).contiguous();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t capacity = block_table.size(1) * block_size;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    // without an own token, position seq_len - 1 is not stored: the table holds the positions before it
    TORCH_CHECK(lens[b] >= 1 && lens[b] - (has_own ? 0 : 1) <= capacity, "seq_lens[", b, "] = ", lens[b],
                " is outside [1, ", capacity + (has_own ? 0 : 1), "] (the block table's capacity)");
    const bool has_sink_rows = sink_k_in.has_value() && sink_k_in->defined() && sink_k_in->dim() == 4 && sink_k_in->size(1) > 0;
    TORCH_CHECK(has_own || (lens[b] >= 2 && (lens[b] - 1 > skip_first || has_sink_rows)), "seq_lens[", b, "] = ", lens[b],
                ": without an own token every sequence needs a cached position that is read (skip_first ", skip_first, ")");
    longest = std::max(longest, lens[b]);
  }
  {  // every block the kernel reads must exist
    const int64_t* bt = block_table.data_ptr<int64_t>();
    const int64_t num_blocks = pages.size(0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t cached = lens[b] - 1, lo = std::min(skip_first, cached);
      if (lo >= cached) continue;
      for (int64_t i = lo / block_size; i <= (cached - 1) / block_size; ++i) {
        const int64_t id = bt[b * block_table.size(1) + i];
        TORCH_CHECK(id >= 0 && id < num_blocks, "block_table[", b, ", ", i, "] = ", id, " is not a block of the ",
                    num_blocks, "-block pages");
      }
    }
  }
  check_rope(rope, dim, longest - 1, pages);
  const bool has_rope = rope.has_value() && rope->defined();
  const auto query = query_in.to(at::kFloat).contiguous();
  const auto own_k = has_own ? own_k_in->to(at::kFloat).contiguous() : at::Tensor();
  const auto own_v = has_own ? own_v_in->to(at::kFloat).contiguous() : at::Tensor();
  auto out_f = query_in.scalar_type() == at::kFloat ? out : at::empty({batch, q_heads, dim}, query.options());
  const bool has_sinks = sink_k_in.has_value() && sink_k_in->defined();
  TORCH_CHECK(has_sinks == (sink_v_in.has_value() && sink_v_in->defined()), "pass both sink_k and sink_v or neither");
  at::Tensor sink_k, sink_v;
  if (has_sinks) {
    const int64_t sinks = sink_k_in->dim() == 4 ? sink_k_in->size(1) : -1;
    for (const auto* t : {&*sink_k_in, &*sink_v_in}) {
      TORCH_CHECK(t->dim() == 4 && t->sizes() == at::IntArrayRef({batch, sinks, heads, dim}) && transform::is_float(*t) &&
                      t->device() == pages.device(),
                  "sink_k/sink_v must be float [B, S, H, D] on the pages' device, got ", t->sizes());
    }
    TORCH_CHECK(sinks <= skip_first, "sink rows (", sinks, ") must be positions the kernel skips (skip_first ",
                skip_first, "), else they count twice");
    sink_k = sink_k_in->to(at::kFloat).contiguous();
    sink_v = sink_v_in->to(at::kFloat).contiguous();
  }

  DecodeArgs args{query.data_ptr<float>(), has_own ? own_k.data_ptr<float>() : nullptr,
                  has_own ? own_v.data_ptr<float>() : nullptr, pages.data_ptr<uint8_t>(),
                  pages.stride(0), pages.stride(1), pages.stride(2), block_table.data_ptr<int64_t>(), block_table.size(1),
                  lens, has_rope ? rope->data_ptr<float>() : nullptr, has_rope ? rope->size(0) : 0, pages_end(pages),
                  lv.k, lv.v, lv.pairs, lv.tile_cos, lv.tile_sin, lv.tile_pairs,
                  static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(q_heads), static_cast<int>(dim),
                  static_cast<int>(block_size), static_cast<float>(scale), skip_first, num_splits,
                  out_f.data_ptr<float>(), lse.data_ptr<float>(),
                  has_sinks ? sink_k.data_ptr<float>() : nullptr, has_sinks ? sink_v.data_ptr<float>() : nullptr,
                  has_sinks ? static_cast<int>(sink_k.size(1)) : 0};
  SEQKV_PART_CLOCK(t1);
  SEQKV_CPU_DISPATCH(decode_attention, args);
  SEQKV_PART_CLOCK(t2);
  if (!out_f.is_same(out)) out.copy_(out_f);
  SEQKV_PART_CLOCK(t3);
  SEQKV_PARTS_ADD(decode, t0, t1, t2, t3);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> reconstruct_blocks(
    const at::Tensor& pages, const at::Tensor& block_ids_in, const std::optional<at::Tensor>& rope,
    const std::optional<at::Tensor>& block_positions_in, at::TensorList k_tables, at::TensorList v_tables,
    at::IntArrayRef k_format, at::IntArrayRef v_format, const std::optional<at::Tensor>& key_pairs,
    const std::optional<at::Tensor>& layer_tables) {
  check_cpu(pages, "pages");
  transform::check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  const int64_t dim = k_tables.size() > 7 ? k_tables[7].size(-1) : 0;
  transform::check_head_dim(dim);
  TORCH_CHECK(block_ids_in.dim() == 1 && (block_ids_in.scalar_type() == at::kInt || block_ids_in.scalar_type() == at::kLong) &&
                  block_ids_in.device() == pages.device(), "block_ids must be int [M]");
  const LayerView lv = layer_view(layer_tables, k_tables, v_tables, k_format, v_format, key_pairs, std::nullopt, pages,
                                  heads, dim, false);
  const auto block_ids = block_ids_in.to(at::kLong).contiguous();
  const int64_t num_ids = block_ids.numel();
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < num_ids; ++m)
    TORCH_CHECK(ids[m] < pages.size(0), "block_ids[", m, "] = ", ids[m], " is not a block of the ", pages.size(0),
                "-block pages");
  const bool has_rope = rope.has_value() && rope->defined();
  at::Tensor positions;
  if (has_rope) {
    TORCH_CHECK(block_positions_in.has_value() && block_positions_in->defined() && block_positions_in->dim() == 1 &&
                    block_positions_in->numel() == num_ids && block_positions_in->device() == pages.device(),
                "rope needs block_positions int [M] (position of each block's first slot)");
    positions = block_positions_in->to(at::kLong).contiguous();
    int64_t needed = 0;
    for (int64_t m = 0; m < num_ids; ++m) {
      TORCH_CHECK(ids[m] < 0 || positions.data_ptr<int64_t>()[m] >= 0, "block_positions must be >= 0");
      if (ids[m] >= 0) needed = std::max(needed, positions.data_ptr<int64_t>()[m] + block_size);
    }
    check_rope(rope, dim, needed, pages);
  }
  const auto f32 = pages.options().dtype(at::kFloat);
  auto key = at::empty({num_ids * block_size, heads, dim}, f32);
  auto value = at::empty({num_ids * block_size, heads, dim}, f32);
  if (num_ids == 0) return {key, value};
  ReconstructArgs args{pages.data_ptr<uint8_t>(), pages.stride(0), pages.stride(1), pages.stride(2), ids,
                       has_rope ? positions.data_ptr<int64_t>() : nullptr, has_rope ? rope->data_ptr<float>() : nullptr,
                       has_rope ? rope->size(0) : 0, lv.k, lv.v, lv.pairs, num_ids, static_cast<int>(heads),
                       static_cast<int>(dim), static_cast<int>(block_size), key.data_ptr<float>(), value.data_ptr<float>()};
  SEQKV_CPU_DISPATCH(reconstruct, args);
  return {key, value};
}

void write_slots(const at::Tensor& zk_in, const at::Tensor& zv_in, const at::Tensor& slot_mapping_in, const at::Tensor& pages,
                 at::TensorList k_tables, at::TensorList v_tables, at::IntArrayRef k_format, at::IntArrayRef v_format,
                 const std::optional<at::Tensor>& layer_tables) {
  check_cpu(pages, "pages");
  transform::check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(zk_in.dim() == 3 && zk_in.size(1) == heads && zk_in.scalar_type() == at::kFloat &&
                  zk_in.device() == pages.device(), "zk must be float32 [T, H, D] on the pages' device");
  const int64_t tokens = zk_in.size(0), dim = zk_in.size(2);
  transform::check_head_dim(dim);
  TORCH_CHECK(zv_in.sizes() == zk_in.sizes() && zv_in.scalar_type() == at::kFloat && zv_in.device() == pages.device(),
              "zv must be float32 [T, H, D] like zk");
  TORCH_CHECK(slot_mapping_in.dim() == 1 && slot_mapping_in.size(0) == tokens &&
                  (slot_mapping_in.scalar_type() == at::kInt || slot_mapping_in.scalar_type() == at::kLong) &&
                  slot_mapping_in.device() == pages.device(), "slot_mapping must be int [T]");
  const LayerView lv = layer_view(layer_tables, k_tables, v_tables, k_format, v_format, std::nullopt, std::nullopt, pages,
                                  heads, dim, false);
  if (tokens == 0) return;
  const auto zk = zk_in.contiguous();
  const auto zv = zv_in.contiguous();
  const auto slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] < pages.size(0) * block_size, "slot_mapping[", t, "] = ", slots[t], " is beyond the pages");
  WriteArgs args{zk.data_ptr<float>(), zv.data_ptr<float>(), nullptr, nullptr, slots, pages.data_ptr<uint8_t>(), pages.stride(0),
                 pages.stride(1), pages.stride(2), lv.k, lv.v, lv.k_basis_pairs, tokens, static_cast<int>(heads),
                 static_cast<int>(dim), static_cast<int>(block_size)};
  SEQKV_CPU_DISPATCH(write_slots, args);
}

// Keys un-rotated in place at their positions by the exact inverse of `rope` (the model's table,
// magnitude included), as vllm_seqkv.codec.rope.unrotate_by_table computes it: separate products
// and sums (no contraction into FMAs), so the components and codes equal the codec's.
__attribute__((optimize("fp-contract=off"))) void unrotate_keys(float* key, const int64_t* positions,
                                                                const float* rope, int64_t tokens, int64_t heads,
                                                                int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* r = rope + positions[t] * dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = key + (t * heads + h) * dim;
      for (int64_t j = 0; j < half; ++j) {
        const float cos = r[j], sin = r[half + j];
        const float norm = cos * cos + sin * sin;
        const float c = cos / norm, sn = sin / norm;
        const float lo = x[j], hi = x[j + half];
        x[j] = lo * c + hi * sn;
        x[j + half] = hi * c - lo * sn;
      }
    }
  }
}

// In place: NaN/inf -> 0; flags[t] = 1 where row t had any.
void zero_nonfinite(float* x, int64_t tokens, int64_t row, uint8_t* flags) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* r = x + t * row;
    for (int64_t i = 0; i < row; ++i) {
      if (!std::isfinite(r[i])) {
        r[i] = 0.f;
        flags[t] = 1;
      }
    }
  }
}

at::Tensor write_tokens(const at::Tensor& key_in, const at::Tensor& value_in, const at::Tensor& slot_mapping_in,
                        const at::Tensor& positions_in, const at::Tensor& pages, const std::optional<at::Tensor>& rope,
                        at::TensorList k_tables, at::TensorList v_tables, at::IntArrayRef k_format,
                        at::IntArrayRef v_format, const std::optional<at::Tensor>& layer_tables) {
  SEQKV_PART_CLOCK(t0);
  check_cpu(pages, "pages");
  transform::check_pages(pages);
  const int64_t heads = pages.size(1), block_size = pages.size(2);
  TORCH_CHECK(key_in.dim() == 3 && key_in.size(1) == heads && transform::is_float(key_in) &&
                  key_in.device() == pages.device(), "key must be float [T, H, D] on the pages' device");
  const int64_t tokens = key_in.size(0), dim = key_in.size(2);
  transform::check_head_dim(dim);
  TORCH_CHECK(value_in.sizes() == key_in.sizes() && transform::is_float(value_in) && value_in.device() == pages.device(),
              "value must be float [T, H, D] like key");
  for (const auto* t : {&slot_mapping_in, &positions_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == tokens && (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong) &&
                    t->device() == pages.device(), "slot_mapping/positions must be int [T]");
  }
  const LayerView lv = layer_view(layer_tables, k_tables, v_tables, k_format, v_format, std::nullopt, std::nullopt, pages,
                                  heads, dim, false);
  auto nonfinite = at::zeros({}, pages.options().dtype(at::kLong));
  if (tokens == 0) return nonfinite;
  const auto slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const auto positions = positions_in.to(at::kLong).contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const bool has_rope = rope.has_value() && rope->defined();
  std::vector<int64_t> valid;
  valid.reserve(tokens);
  int64_t needed = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] < pages.size(0) * block_size, "slot_mapping[", t, "] = ", slots[t], " is beyond the pages");
    if (slots[t] < 0) continue;
    TORCH_CHECK(pos[t] >= 0, "positions[", t, "] = ", pos[t], " is negative");
    needed = std::max(needed, pos[t] + 1);
    valid.push_back(t);
  }
  if (has_rope) check_rope(rope, dim, needed, pages);
  if (valid.empty()) return nonfinite;
  // the codec codes the valid tokens only: the same rows in the same einsum give the same bytes
  const auto rows = at::from_blob(valid.data(), {static_cast<int64_t>(valid.size())}, at::kLong);
  const bool all = static_cast<int64_t>(valid.size()) == tokens;
  auto key = (all ? key_in : key_in.index_select(0, rows)).to(at::kFloat, false, true).contiguous();
  auto value = (all ? value_in : value_in.index_select(0, rows)).to(at::kFloat, false, true).contiguous();
  const auto valid_slots = all ? slot_mapping : slot_mapping.index_select(0, rows);
  const auto valid_positions = all ? positions : positions.index_select(0, rows);
  const int64_t n = key.size(0);
  std::vector<uint8_t> flags(n, 0);
  zero_nonfinite(key.data_ptr<float>(), n, heads * dim, flags.data());
  zero_nonfinite(value.data_ptr<float>(), n, heads * dim, flags.data());
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += flags[i];
  nonfinite.fill_(count);
  if (has_rope) unrotate_keys(key.data_ptr<float>(), valid_positions.data_ptr<int64_t>(), rope->data_ptr<float>(), n, heads, dim);
  // NOTE: the components z = (x - mean) @ basis are computed by the kernel (see WriteArgs): a
  // BLAS product costs more than the rest of a decode step's one-token write
  WriteArgs args{nullptr, nullptr, key.data_ptr<float>(), value.data_ptr<float>(), valid_slots.data_ptr<int64_t>(),
                 pages.data_ptr<uint8_t>(), pages.stride(0), pages.stride(1), pages.stride(2), lv.k, lv.v,
                 lv.k_basis_pairs, n, static_cast<int>(heads), static_cast<int>(dim), static_cast<int>(block_size)};
  SEQKV_PART_CLOCK(t1);
  SEQKV_CPU_DISPATCH(write_slots, args);
  SEQKV_PART_CLOCK(t2);
  if (tokens <= 8) SEQKV_PARTS_ADD(write, t0, t1, t2, t2);  // decode steps only (a prefill's write is long)
  return nonfinite;
}

}  // namespace
}  // namespace cpu
}  // namespace seqkv

TORCH_LIBRARY_FRAGMENT(seqkv, m) {
  m.def("cpu_transform_decode_attention(Tensor query, Tensor? own_k, Tensor? own_v, Tensor pages, Tensor block_table, "
        "Tensor seq_lens, Tensor? rope, Tensor[] k_tables, Tensor[] v_tables, int[] k_format, int[] v_format, "
        "Tensor? key_pairs, float scale, int num_splits, int skip_first, Tensor? sink_k=None, Tensor? sink_v=None, "
        "Tensor? layer_tables=None) -> (Tensor, Tensor)");
  m.def("cpu_reconstruct_transform_blocks(Tensor pages, Tensor block_ids, Tensor? rope, Tensor? block_positions, "
        "Tensor[] k_tables, Tensor[] v_tables, int[] k_format, int[] v_format, Tensor? key_pairs, Tensor? layer_tables=None) "
        "-> (Tensor, Tensor)");
  m.def("cpu_write_transform_slots(Tensor zk, Tensor zv, Tensor slot_mapping, Tensor(a!) pages, Tensor[] k_tables, "
        "Tensor[] v_tables, int[] k_format, int[] v_format, Tensor? layer_tables=None) -> ()");
  m.def("cpu_write_transform_tokens(Tensor key, Tensor value, Tensor slot_mapping, Tensor positions, Tensor(a!) pages, "
        "Tensor? rope, Tensor[] k_tables, Tensor[] v_tables, int[] k_format, int[] v_format, Tensor? layer_tables=None) "
        "-> Tensor");
  m.def("cpu_transform_layer_tables(Tensor pages, Tensor[] k_tables, Tensor[] v_tables, int[] k_format, int[] v_format, "
        "Tensor? key_pairs, Tensor? rope) -> Tensor");
  m.def("cpu_kernel_isa(str wanted) -> str", &seqkv::cpu::kernel_isa);
}

TORCH_LIBRARY_IMPL(seqkv, CPU, m) {
  m.impl("cpu_transform_decode_attention", &seqkv::cpu::decode_attention);
  m.impl("cpu_reconstruct_transform_blocks", &seqkv::cpu::reconstruct_blocks);
  m.impl("cpu_write_transform_slots", &seqkv::cpu::write_slots);
  m.impl("cpu_write_transform_tokens", &seqkv::cpu::write_tokens);
  m.impl("cpu_transform_layer_tables", &seqkv::cpu::layer_tables);
}

// An empty Python module named _cpu (the build names the extension vllm_seqkv._cpu).
extern "C" PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "seqkv CPU ops (torch.ops.seqkv.cpu_*)", -1, nullptr};
  return PyModule_Create(&module);
}
