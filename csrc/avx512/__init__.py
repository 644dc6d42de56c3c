"""dlc's kernel modules built with AVX-512 (F, CD, BW, DQ, VL: Skylake-X and later, Zen 4), 512-bit vectors
preferred. Picked by dlc._C at import where the CPU and OS support them."""
