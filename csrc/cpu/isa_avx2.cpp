// AVX2 build of the CPU kernels (compiled with -mavx2 -mfma -mf16c; run only when the CPU
// reports AVX2 and FMA, see transform_cpu_ops.cpp).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SEQKV_CPU_NS avx2
#include "transform_cpu_kernels.h"
