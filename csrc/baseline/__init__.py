"""dlc's kernel modules built for baseline x86-64 (SSE2) or whatever the platform's default target is; the build
every CPU can run. dlc._C picks this one, avx2 or avx512 at import (see dlc._C.ISA)."""
