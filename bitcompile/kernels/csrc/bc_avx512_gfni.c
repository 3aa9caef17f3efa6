/* bc_avx512.c again, with GF(2) affine plane extraction (needs GFNI); symbols end in _gfni. */
#define BC_GFNI 1
#define BC_NAME(name) name##_gfni
#include "bc_avx512.c"
