// AVX-512 build of the CPU kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma;
// run only when the CPU reports those features, see transform_cpu_ops.cpp).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SEQKV_CPU_NS avx512
#include "transform_cpu_kernels.h"
