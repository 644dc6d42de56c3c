"""dlc's kernel modules built with AVX2, FMA and F16C enabled (x86-64 CPUs since Haswell / Zen). Picked by
dlc._C at import where the CPU has them."""
