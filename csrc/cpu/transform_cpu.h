// CPU ops of the transform slot format (seqkv-3-nox and the non-cross-layer layers of the
// transform presets): plain structs shared by the op layer (transform_cpu_ops.cpp: argument
// checks, tables, registration) and the kernels (transform_cpu_kernels.h), which are compiled
// once per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_default.cpp) and picked at run
// time. No torch types here: the kernels see raw pointers only.
#pragma once

#include <cstdint>

namespace seqkv {
namespace cpu {

constexpr int kTile = 16;     // context positions per step of the decode kernel

// One component's field in the slot's 32-bit words (Stream::field): its word times kTile (the
// word's row in a tile's transposed words), the shift inside the word, 1 when the field continues
// in the next word, its width. Two int32 in the layer tables.
struct FieldDesc {
  int32_t row;
  uint8_t shift, span, bits, unused;
};
static_assert(sizeof(FieldDesc) == 8, "FieldDesc is two int32 of the layer tables");

// One stream (K or V) of one layer. Per (head, component) extraction tables are derived by the
// op layer from start/nbits: the byte of the code's low bits inside the SLOT (stream offset
// included), 1 when the code spans a second byte (else 0, the same byte is read twice), the
// right shift and the mask.
struct Stream {
  const float* levels;   // [n] packed: component (h, c) at level_start[h, c], 2**nbits entries
  const float* cuts;     // [n] packed like levels (the component's last entry +inf)
  const float* inverse;  // [H, D, D]  x = z @ inverse + mean
  const float* basis;    // [H, D, D]  z = (x - mean) @ basis (the write)
  const float* mean;     // [H, D]
  const int32_t* start;  // [H, D] first bit in the stream
  const int32_t* nbits;  // [H, D]
  const int32_t* level_start;  // [H, D] first entry of the component's levels / cuts
  const int32_t* byte;   // [H, D] derived: offset + start / 8
  const int32_t* extra;  // [H, D] derived: 1 if the code spans two bytes
  const int32_t* shift;  // [H, D] derived: start % 8
  const int32_t* mask;   // [H, D] derived: 2**nbits - 1
  // the same fields as 32-bit words of the slot (SIMD path), one FieldDesc per component so
  // that the hot loops keep one pointer live and read each field with one byte load
  const FieldDesc* field;  // [H, D]
  int first_word, num_words;  // words of the slot that hold the stream
  int offset;                 // byte offset of the stream in the slot
  int nbytes;                 // its size
  // [H, D, 16] derived: entry k = levels[k & mask] for codes of <= 4 bits, so that a 16-entry
  // register permute of the shifted word needs no mask (it reads 4 index bits)
  const float* lut16;
};

// The key inverse as 2x2 blocks of RoPE pairs {j, j + D/2} (only when it is pair-block
// diagonal): k[j] = z_j a + z_j' b, k[j'] = z_j c + z_j' d (j' = j + D/2), each [H, D/2].
struct PairBlocks {
  const float* a;
  const float* b;
  const float* c;
  const float* d;
};

struct DecodeArgs {
  const float* query;  // [B, Hq, D] float32 contiguous
  const float* own_k;  // [B, H, D] or nullptr (no own token)
  const float* own_v;  // [B, H, D] or nullptr
  const uint8_t* pages;
  int64_t stride_pb, stride_ph, stride_pt;
  const int64_t* block_table;  // [B, stride_bt] (contiguous rows)
  int64_t stride_bt;
  const int64_t* seq_lens;  // [B]
  const float* rope;        // [P, D] or nullptr
  int64_t num_rope_rows;
  const uint8_t* pages_end;  // one past the last byte of the pages' storage that may be read
  Stream k, v;
  PairBlocks pairs;  // a == nullptr: general key path
  // with rope: its rotations of the kTile in-tile offsets, cos and sin [D/2][kTile] (rows 0..kTile-1,
  // the last row repeated past the table's end); with rope and pairs also, per head and pair
  // [6][kTile], R(t) (a, b, c, d) and R(t) mean (see the kernels' TileRope); else nullptr
  const float* tile_cos;
  const float* tile_sin;
  const float* tile_pairs;
  int batch, heads, q_heads, dim, block_size;
  float scale;
  int64_t skip_first;
  int64_t num_splits;  // 0: automatic
  float* out;          // [B, Hq, D] float32
  float* lse;          // [B, Hq]
  // exact K (post-RoPE) / V of positions 0 .. sinks - 1 ([B, sinks, H, D] float32) or nullptr;
  // row s is attended iff s < seq_len - 1 (sinks <= skip_first: the pages' rows are not read)
  const float* sink_k;
  const float* sink_v;
  int sinks;
};

struct ReconstructArgs {
  const uint8_t* pages;
  int64_t stride_pb, stride_ph, stride_pt;
  const int64_t* block_ids;        // [M] (-1: zero rows)
  const int64_t* block_positions;  // [M] or nullptr (with rope)
  const float* rope;               // [P, D] or nullptr
  int64_t num_rope_rows;
  Stream k, v;
  PairBlocks pairs;
  int64_t num_ids;
  int heads, dim, block_size;
  float* key;    // [M * bs, H, D]
  float* value;  // [M * bs, H, D]
};

struct WriteArgs {
  // [T, H, D] components (x - mean) @ basis as the codec computes them (bytes = the codec's), or
  // nullptr: then xk / xv [T, H, D] (finite, keys in the coding frame) and the kernel computes
  // the components itself (float32 multiply-adds in order of d: a code may differ from the
  // codec's by one where z lies within float32 rounding of a decision threshold)
  const float* zk;
  const float* zv;
  const float* xk;
  const float* xv;
  const int64_t* slot_mapping;  // [T] (-1: skip)
  uint8_t* pages;
  int64_t stride_pb, stride_ph, stride_pt;
  Stream k, v;
  // the key basis' 2x2 RoPE-pair blocks [H][4][D/2] (see the layer tables) when it has no other
  // nonzero entry, else nullptr: keys are then projected pair by pair
  const float* k_basis_pairs;
  int64_t tokens;
  int heads, dim, block_size;
};

// One set of kernels per instruction set (namespaces avx512, avx2, scalar).
#define SEQKV_DECLARE_CPU_KERNELS(NS)            \
  namespace NS {                                 \
  void decode_attention(const DecodeArgs& args); \
  void reconstruct(const ReconstructArgs& args); \
  void write_slots(const WriteArgs& args);       \
  int vector_width();                            \
  }

SEQKV_DECLARE_CPU_KERNELS(avx512)
SEQKV_DECLARE_CPU_KERNELS(avx2)
SEQKV_DECLARE_CPU_KERNELS(scalar)

}  // namespace cpu
}  // namespace seqkv
