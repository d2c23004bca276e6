// The two things the ops need from torch's CUDA layer: the current stream and a launch check.
//
// A CPU build of torch (our dev/CI machines) ships no c10/cuda config header, so there the
// ops are compiled (compile-only check) against the default stream; a CUDA build of torch
// (the real extension) uses torch's current stream.
#pragma once

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
namespace seqkv {
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace seqkv
#else
namespace seqkv {
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace seqkv
#endif

#define SEQKV_CHECK_LAUNCH()                                                          \
  do {                                                                                \
    const cudaError_t seqkv_err = cudaGetLastError();                                 \
    TORCH_CHECK(seqkv_err == cudaSuccess, "seqkv kernel launch failed: ",             \
                cudaGetErrorString(seqkv_err));                                       \
  } while (0)
