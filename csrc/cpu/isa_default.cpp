// Portable build of the CPU kernels (no ISA flags: at::vec's array implementation, which the
// compiler vectorizes to the baseline ISA): the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#define SEQKV_CPU_NS scalar
#include "transform_cpu_kernels.h"
