// Reading and writing one compressed slot (one token-head) of a seqkv page.
//
// A slot is [K fields | V fields]; a stream's fields are
//   norm     fp16, 2 bytes, little-endian, at norm_off
//   codes_a  first D/2 rotated coordinates, bits_a bits each, little-endian bit stream, at off_a
//   codes_b  last D/2 coordinates, bits_b bits each, at off_b
// (vllm_seqkv/codec/baselines.py TurboCodec + vllm_seqkv/codec/packing.py). The codebook
// tensor holds the a-book (2**bits_a centroids) followed by the b-book.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

namespace seqkv {

struct StreamFormat {
  int bits_a, bits_b, norm_off, off_a, off_b;
};

__device__ __forceinline__ float load_norm(const uint8_t* slot, const StreamFormat& f) {
  const uint16_t raw = static_cast<uint16_t>(slot[f.norm_off]) |
                       (static_cast<uint16_t>(slot[f.norm_off + 1]) << 8);
  return __half2float(__ushort_as_half(raw));
}

// Code of rotated coordinate d (0 <= d < D) and its index into the concatenated codebook.
__device__ __forceinline__ int codebook_index(const uint8_t* slot, int d, int head_dim,
                                              const StreamFormat& f) {
  const bool first = d < head_dim / 2;
  const int bits = first ? f.bits_a : f.bits_b;
  const int bitpos = first ? d * f.bits_a : (d - head_dim / 2) * f.bits_b;
  const uint8_t* byte = slot + (first ? f.off_a : f.off_b) + (bitpos >> 3);
  const int shift = bitpos & 7;
  int word = byte[0];
  if (shift + bits > 8) word |= static_cast<int>(byte[1]) << 8;
  const int code = (word >> shift) & ((1 << bits) - 1);
  return first ? code : (1 << f.bits_a) + code;
}

// Entry (d, e) of the Sylvester Hadamard matrix: (-1)^popcount(d & e).
__device__ __forceinline__ float hadamard_entry(int d, int e) {
  return (__popc(d & e) & 1) ? -1.f : 1.f;
}

}  // namespace seqkv
