# Included by conv.pyx: Winograd F(2×2, 3×3) for 3×3, stride-1, undilated, ungrouped convolutions.
#
# The output is cut into 2×2 tiles; tile t = (i, j) reads the 4×4 input patch d at padded rows 2i..2i+3 and
# padded columns 2j..2j+3 (padded coordinates: input row r sits at padded row r + top). With
#
#     B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
#     G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
#     A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
#
# forward    V[ξ][c][t] = (B^T d B)[ξ]      U[ξ][o][c] = (G w G^T)[ξ]      ξ = 4k + l, the 16 positions
#            M[ξ] (O, T) = U[ξ] (O, C) @ V[ξ] (C, T)                        16 GEMMs instead of one 9× larger
#            y tile = A^T M A  (+ b)
# backward   the adjoint of each step, so the gradients are exactly those of the function computed:
#            dM[ξ] = (A dY A^T)[ξ]    dU[ξ] += dM[ξ] @ V[ξ].T    dw = G^T dU G
#            dV[ξ] = U[ξ].T @ dM[ξ]   dx += B dV B^T, overlapping tiles added up, padding dropped
#
# 2.25× fewer multiply-adds than im2col, and the transformed input is 4× the input where im2col's columns
# are 9× it. Every transform runs on whole rows of tiles so that its loops are contiguous and vectorize:
# padded rows are stored de-interleaved (even columns, then odd columns, tw + 1 of each), which turns the
# stride-2 tile access into unit-stride loops. Work is banded over tile rows so that a task's V and M stay
# within `_wino_bytes` (L2), one task per (image, band) forward and per image backward, as in the im2col
# path; GEMMs are the same single-threaded sgemm inside the OpenMP team.

# Its settings, `_wino_mode` and `_wino_bytes`, are declared with the others at the top of conv.pyx.

cdef extern from *:
    """
    /* The Winograd kernels' inner loops, on the widest vectors the build has: GCC leaves the transforms'
       16-stream loops scalar (it cannot prove that the streams do not overlap). Rows are often shorter than
       a vector (4 tiles across an 8-pixel map), so the last step of every loop is masked rather than
       scalar: DLC_LOADN / DLC_STOREN touch only the first r lanes. */
    #include <string.h>
    #if defined(__AVX512F__)
    #include <immintrin.h>
    #define DLC_WV 16
    typedef __m512 dlc_wv;
    #define DLC_WLOAD _mm512_loadu_ps
    #define DLC_WSTORE _mm512_storeu_ps
    #define DLC_WSET1 _mm512_set1_ps
    #define DLC_WZERO _mm512_setzero_ps
    #define DLC_WFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
    #define DLC_WADD _mm512_add_ps
    #define DLC_WSUB _mm512_sub_ps
    static inline dlc_wv DLC_LOADN(const float* p, Py_ssize_t r) {
        return r >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << r) - 1), p);
    }
    static inline void DLC_STOREN(float* p, dlc_wv v, Py_ssize_t r) {
        if (r >= 16) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, (__mmask16)((1u << r) - 1), v);
    }
    #elif defined(__AVX2__) && defined(__FMA__)
    #include <immintrin.h>
    #define DLC_WV 8
    typedef __m256 dlc_wv;
    #define DLC_WLOAD _mm256_loadu_ps
    #define DLC_WSTORE _mm256_storeu_ps
    #define DLC_WSET1 _mm256_set1_ps
    #define DLC_WZERO _mm256_setzero_ps
    #define DLC_WFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
    #define DLC_WADD _mm256_add_ps
    #define DLC_WSUB _mm256_sub_ps
    static inline __m256i dlc_lanes(Py_ssize_t r) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static inline dlc_wv DLC_LOADN(const float* p, Py_ssize_t r) {
        return r >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, dlc_lanes(r));
    }
    static inline void DLC_STOREN(float* p, dlc_wv v, Py_ssize_t r) {
        if (r >= 8) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, dlc_lanes(r), v);
    }
    #else
    #include <emmintrin.h>
    #define DLC_WV 4
    typedef __m128 dlc_wv;
    #define DLC_WLOAD _mm_loadu_ps
    #define DLC_WSTORE _mm_storeu_ps
    #define DLC_WSET1 _mm_set1_ps
    #define DLC_WZERO _mm_setzero_ps
    #define DLC_WFMA(a, b, c) _mm_add_ps(_mm_mul_ps(a, b), c)
    #define DLC_WADD _mm_add_ps
    #define DLC_WSUB _mm_sub_ps
    static inline dlc_wv DLC_LOADN(const float* p, Py_ssize_t r) {
        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (r >= 4) return _mm_loadu_ps(p);
        memcpy(t, p, (size_t)r * sizeof(float));
        return _mm_loadu_ps(t);
    }
    static inline void DLC_STOREN(float* p, dlc_wv v, Py_ssize_t r) {
        float t[4];
        if (r >= 4) { _mm_storeu_ps(p, v); return; }
        _mm_storeu_ps(t, v);
        memcpy(p, t, (size_t)r * sizeof(float));
    }
    #endif
    #define DLC_FOR_LANES(j, n) for (Py_ssize_t j = 0, r_ = (n); j < (n); j += DLC_WV, r_ -= DLC_WV)
    #define DLC_L(p) DLC_LOADN(p, r_)
    #define DLC_S(p, v) DLC_STOREN(p, v, r_)

    /* C (m, n) = A (m, k) @ B (k, n), row-major: the Winograd-domain products. Their inner dimension is a
       layer's channel count (8-128), too short for sgemm's packing to pay off, and there are 16 of them per
       band. Register-blocked 4 rows x 2 vectors, fused multiply-add where the build has it. */
    static void dlc_wino_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* A, Py_ssize_t lda,
                              const float* B, Py_ssize_t ldb, float* C, Py_ssize_t ldc) {
        Py_ssize_t i = 0, j, p;
        for (; i + 4 <= m; i += 4) {
            const float *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
            float *c0 = C + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
            for (j = 0; j + 2 * DLC_WV <= n; j += 2 * DLC_WV) {
                dlc_wv s00 = DLC_WZERO(), s01 = DLC_WZERO(), s10 = DLC_WZERO(), s11 = DLC_WZERO();
                dlc_wv s20 = DLC_WZERO(), s21 = DLC_WZERO(), s30 = DLC_WZERO(), s31 = DLC_WZERO();
                for (p = 0; p < k; p++) {
                    const float* b = B + p * ldb + j;
                    dlc_wv b0 = DLC_WLOAD(b), b1 = DLC_WLOAD(b + DLC_WV), x;
                    x = DLC_WSET1(a0[p]); s00 = DLC_WFMA(x, b0, s00); s01 = DLC_WFMA(x, b1, s01);
                    x = DLC_WSET1(a1[p]); s10 = DLC_WFMA(x, b0, s10); s11 = DLC_WFMA(x, b1, s11);
                    x = DLC_WSET1(a2[p]); s20 = DLC_WFMA(x, b0, s20); s21 = DLC_WFMA(x, b1, s21);
                    x = DLC_WSET1(a3[p]); s30 = DLC_WFMA(x, b0, s30); s31 = DLC_WFMA(x, b1, s31);
                }
                DLC_WSTORE(c0 + j, s00); DLC_WSTORE(c0 + j + DLC_WV, s01);
                DLC_WSTORE(c1 + j, s10); DLC_WSTORE(c1 + j + DLC_WV, s11);
                DLC_WSTORE(c2 + j, s20); DLC_WSTORE(c2 + j + DLC_WV, s21);
                DLC_WSTORE(c3 + j, s30); DLC_WSTORE(c3 + j + DLC_WV, s31);
            }
            for (; j < n; j += DLC_WV) {
                Py_ssize_t r = n - j;
                dlc_wv s0 = DLC_WZERO(), s1 = DLC_WZERO(), s2 = DLC_WZERO(), s3 = DLC_WZERO();
                for (p = 0; p < k; p++) {
                    dlc_wv b0 = DLC_LOADN(B + p * ldb + j, r);
                    s0 = DLC_WFMA(DLC_WSET1(a0[p]), b0, s0);
                    s1 = DLC_WFMA(DLC_WSET1(a1[p]), b0, s1);
                    s2 = DLC_WFMA(DLC_WSET1(a2[p]), b0, s2);
                    s3 = DLC_WFMA(DLC_WSET1(a3[p]), b0, s3);
                }
                DLC_STOREN(c0 + j, s0, r); DLC_STOREN(c1 + j, s1, r);
                DLC_STOREN(c2 + j, s2, r); DLC_STOREN(c3 + j, s3, r);
            }
        }
        for (; i < m; i++) {
            const float* a0 = A + i * lda;
            float* c0 = C + i * ldc;
            for (j = 0; j < n; j += DLC_WV) {
                Py_ssize_t r = n - j;
                dlc_wv s0 = DLC_WZERO();
                for (p = 0; p < k; p++) s0 = DLC_WFMA(DLC_WSET1(a0[p]), DLC_LOADN(B + p * ldb + j, r), s0);
                DLC_STOREN(c0 + j, s0, r);
            }
        }
    }

    /* B^T d B of one row of n tiles straight from its four padded rows (each de-interleaved: even columns
       at r, odd at r + Wh): 16 loads, the row and column combinations in registers, 16 stores to
       v[(4k + l) * plane + j]. Tile j's columns are e[j], o[j], e[j + 1], o[j + 1]. */
    static void dlc_wino_input_row(const float* r0, Py_ssize_t W2, Py_ssize_t Wh, float* v, Py_ssize_t plane,
                                   Py_ssize_t n) {
        const float *r1 = r0 + W2, *r2 = r1 + W2, *r3 = r2 + W2;
        DLC_FOR_LANES(j, n) {
            dlc_wv c[4][4];  /* c[col][row] */
            const float* rr[4] = {r0, r1, r2, r3};
            for (int r = 0; r < 4; r++) {
                c[0][r] = DLC_L(rr[r] + j); c[1][r] = DLC_L(rr[r] + Wh + j);
                c[2][r] = DLC_L(rr[r] + j + 1); c[3][r] = DLC_L(rr[r] + Wh + j + 1);
            }
            dlc_wv t[4][4];  /* t[k][col] = (B^T d)[k][col] */
            for (int q = 0; q < 4; q++) {
                t[0][q] = DLC_WSUB(c[q][0], c[q][2]); t[1][q] = DLC_WADD(c[q][1], c[q][2]);
                t[2][q] = DLC_WSUB(c[q][2], c[q][1]); t[3][q] = DLC_WSUB(c[q][1], c[q][3]);
            }
            for (int k = 0; k < 4; k++) {
                float* o = v + (4 * k) * plane + j;
                DLC_S(o, DLC_WSUB(t[k][0], t[k][2])); DLC_S(o + plane, DLC_WADD(t[k][1], t[k][2]));
                DLC_S(o + 2 * plane, DLC_WSUB(t[k][2], t[k][1])); DLC_S(o + 3 * plane, DLC_WSUB(t[k][1], t[k][3]));
            }
        }
    }

    /* ev[m] = src[2m] (m < (n + 1) / 2), od[m] = src[2m + 1] (m < n / 2): a row split into its even and odd
       columns, by whole vector pairs with shuffles, the rest scalar. */
    static void dlc_deinterleave(const float* src, Py_ssize_t n, float* ev, float* od) {
        Py_ssize_t m = 0;
    #if defined(__AVX512F__)
        const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (; 2 * (m + 16) <= n; m += 16) {
            __m512 a = _mm512_loadu_ps(src + 2 * m), b = _mm512_loadu_ps(src + 2 * m + 16);
            _mm512_storeu_ps(ev + m, _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(od + m, _mm512_permutex2var_ps(a, io, b));
        }
        if (2 * m < n) {  /* the last r < 32 values, masked: rows are often 8-32 wide */
            Py_ssize_t r = n - 2 * m, ra = r < 16 ? r : 16, rb = r - ra;
            __m512 a = _mm512_maskz_loadu_ps((__mmask16)((1u << ra) - 1), src + 2 * m);
            __m512 b = _mm512_maskz_loadu_ps((__mmask16)((1u << rb) - 1), src + 2 * m + 16);
            _mm512_mask_storeu_ps(ev + m, (__mmask16)((1u << ((r + 1) >> 1)) - 1), _mm512_permutex2var_ps(a, ie, b));
            _mm512_mask_storeu_ps(od + m, (__mmask16)((1u << (r >> 1)) - 1), _mm512_permutex2var_ps(a, io, b));
            return;
        }
    #elif defined(__AVX2__)
        /* the shuffles work per 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6]; then the 64-bit pairs are reordered */
        #define DLC_PAIRS(v) _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)))
        for (; 2 * (m + 8) <= n; m += 8) {
            __m256 a = _mm256_loadu_ps(src + 2 * m), b = _mm256_loadu_ps(src + 2 * m + 8);
            _mm256_storeu_ps(ev + m, DLC_PAIRS(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))));
            _mm256_storeu_ps(od + m, DLC_PAIRS(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
        }
        #undef DLC_PAIRS
    #else
        for (; 2 * (m + 4) <= n; m += 4) {
            __m128 a = _mm_loadu_ps(src + 2 * m), b = _mm_loadu_ps(src + 2 * m + 4);
            _mm_storeu_ps(ev + m, _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
            _mm_storeu_ps(od + m, _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
        }
    #endif
        for (; 2 * m < n; m++) {
            ev[m] = src[2 * m];
            if (2 * m + 1 < n) od[m] = src[2 * m + 1];
        }
    }

    /* The inverse: dst[2m] = ev[m], dst[2m + 1] = od[m], n values of dst. */
    static void dlc_interleave(const float* ev, const float* od, Py_ssize_t n, float* dst) {
        Py_ssize_t m = 0;
    #if defined(__AVX512F__)
        const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (; 2 * (m + 16) <= n; m += 16) {
            __m512 e = _mm512_loadu_ps(ev + m), o = _mm512_loadu_ps(od + m);
            _mm512_storeu_ps(dst + 2 * m, _mm512_permutex2var_ps(e, lo, o));
            _mm512_storeu_ps(dst + 2 * m + 16, _mm512_permutex2var_ps(e, hi, o));
        }
        if (2 * m < n) {
            Py_ssize_t r = n - 2 * m, ra = r < 16 ? r : 16, rb = r - ra;
            __m512 e = _mm512_maskz_loadu_ps((__mmask16)((1u << ((r + 1) >> 1)) - 1), ev + m);
            __m512 o = _mm512_maskz_loadu_ps((__mmask16)((1u << (r >> 1)) - 1), od + m);
            _mm512_mask_storeu_ps(dst + 2 * m, (__mmask16)((1u << ra) - 1), _mm512_permutex2var_ps(e, lo, o));
            _mm512_mask_storeu_ps(dst + 2 * m + 16, (__mmask16)((1u << rb) - 1), _mm512_permutex2var_ps(e, hi, o));
            return;
        }
    #elif defined(__AVX2__)
        for (; 2 * (m + 8) <= n; m += 8) {
            __m256 e = _mm256_loadu_ps(ev + m), o = _mm256_loadu_ps(od + m);
            __m256 l = _mm256_unpacklo_ps(e, o), h = _mm256_unpackhi_ps(e, o);
            _mm256_storeu_ps(dst + 2 * m, _mm256_permute2f128_ps(l, h, 0x20));
            _mm256_storeu_ps(dst + 2 * m + 8, _mm256_permute2f128_ps(l, h, 0x31));
        }
    #else
        for (; 2 * (m + 4) <= n; m += 4) {
            __m128 e = _mm_loadu_ps(ev + m), o = _mm_loadu_ps(od + m);
            _mm_storeu_ps(dst + 2 * m, _mm_unpacklo_ps(e, o));
            _mm_storeu_ps(dst + 2 * m + 4, _mm_unpackhi_ps(e, o));
        }
    #endif
        for (; 2 * m < n; m++) {
            dst[2 * m] = ev[m];
            if (2 * m + 1 < n) dst[2 * m + 1] = od[m];
        }
    }

    /* U[ξ * nw + q] = (G w_q G^T)[ξ] for the nw 3×3 kernels w_q = w + 9q (G's entries are exact in float). */
    static void dlc_wino_weights(const float* w, Py_ssize_t nw, float* U) {
        for (Py_ssize_t q = 0; q < nw; q++) {
            const float* g = w + 9 * q;
            float t[4][3], u[4][4];
            for (int b = 0; b < 3; b++) {
                t[0][b] = g[b]; t[3][b] = g[6 + b];
                t[1][b] = 0.5f * (g[b] + g[3 + b] + g[6 + b]); t[2][b] = 0.5f * (g[b] - g[3 + b] + g[6 + b]);
            }
            for (int k = 0; k < 4; k++) {
                u[k][0] = t[k][0]; u[k][3] = t[k][2];
                u[k][1] = 0.5f * (t[k][0] + t[k][1] + t[k][2]); u[k][2] = 0.5f * (t[k][0] - t[k][1] + t[k][2]);
            }
            for (int x = 0; x < 16; x++) U[x * nw + q] = u[x >> 2][x & 3];
        }
    }

    /* dw_q = G^T dU_q G, dU summed over the team's nparts partial sums (each 16 * nw): the adjoint above. */
    static void dlc_wino_weight_grad(const float* dU, Py_ssize_t nw, Py_ssize_t nparts, float* dw) {
        for (Py_ssize_t q = 0; q < nw; q++) {
            float d[4][4], s[3][4];
            for (int x = 0; x < 16; x++) {
                float a = 0.0f;
                for (Py_ssize_t t = 0; t < nparts; t++) a += dU[(t * 16 + x) * nw + q];
                d[x >> 2][x & 3] = a;
            }
            for (int l = 0; l < 4; l++) {
                s[0][l] = d[0][l] + 0.5f * (d[1][l] + d[2][l]);
                s[1][l] = 0.5f * (d[1][l] - d[2][l]);
                s[2][l] = 0.5f * (d[1][l] + d[2][l]) + d[3][l];
            }
            float* o = dw + 9 * q;
            for (int a = 0; a < 3; a++) {
                o[3 * a] = s[a][0] + 0.5f * (s[a][1] + s[a][2]);
                o[3 * a + 1] = 0.5f * (s[a][1] - s[a][2]);
                o[3 * a + 2] = 0.5f * (s[a][1] + s[a][2]) + s[a][3];
            }
        }
    }

    /* A^T M A (+ bv) of n tiles: m[x * plane + j] is position x of tile j */
    static void dlc_wino_out(const float* m, Py_ssize_t plane, float bv, float* y00, float* y01,
                             float* y10, float* y11, Py_ssize_t n) {
        dlc_wv b = DLC_WSET1(bv);
        #define DLC_M(x) DLC_L(m + (x) * plane + j)
        DLC_FOR_LANES(j, n) {
            dlc_wv s00 = DLC_WADD(DLC_WADD(DLC_M(0), DLC_M(1)), DLC_M(2));
            dlc_wv s01 = DLC_WSUB(DLC_WSUB(DLC_M(1), DLC_M(2)), DLC_M(3));
            dlc_wv s10 = DLC_WADD(DLC_WADD(DLC_M(4), DLC_M(5)), DLC_M(6));
            dlc_wv s11 = DLC_WSUB(DLC_WSUB(DLC_M(5), DLC_M(6)), DLC_M(7));
            dlc_wv s20 = DLC_WADD(DLC_WADD(DLC_M(8), DLC_M(9)), DLC_M(10));
            dlc_wv s21 = DLC_WSUB(DLC_WSUB(DLC_M(9), DLC_M(10)), DLC_M(11));
            dlc_wv s30 = DLC_WADD(DLC_WADD(DLC_M(12), DLC_M(13)), DLC_M(14));
            dlc_wv s31 = DLC_WSUB(DLC_WSUB(DLC_M(13), DLC_M(14)), DLC_M(15));
            DLC_S(y00 + j, DLC_WADD(DLC_WADD(DLC_WADD(s00, s10), s20), b));
            DLC_S(y01 + j, DLC_WADD(DLC_WADD(DLC_WADD(s01, s11), s21), b));
            DLC_S(y10 + j, DLC_WADD(DLC_WSUB(DLC_WSUB(s10, s20), s30), b));
            DLC_S(y11 + j, DLC_WADD(DLC_WSUB(DLC_WSUB(s11, s21), s31), b));
        }
        #undef DLC_M
    }

    /* A dY A^T of n tiles, dY = [[a00, a01], [a10, a11]]: d[x * plane + j] is position x of tile j */
    static void dlc_wino_dy(const float* a00, const float* a01, const float* a10, const float* a11,
                            float* d, Py_ssize_t plane, Py_ssize_t n) {
        dlc_wv z = DLC_WZERO();
        DLC_FOR_LANES(j, n) {
            dlc_wv y00 = DLC_L(a00 + j), y01 = DLC_L(a01 + j), y10 = DLC_L(a10 + j), y11 = DLC_L(a11 + j);
            dlc_wv q[8];
            q[0] = y00; q[1] = y01;
            q[2] = DLC_WADD(y00, y10); q[3] = DLC_WADD(y01, y11);
            q[4] = DLC_WSUB(y00, y10); q[5] = DLC_WSUB(y01, y11);
            q[6] = DLC_WSUB(z, y10); q[7] = DLC_WSUB(z, y11);
            for (int k = 0; k < 4; k++) {
                DLC_S(d + (4 * k) * plane + j, q[2 * k]);
                DLC_S(d + (4 * k + 1) * plane + j, DLC_WADD(q[2 * k], q[2 * k + 1]));
                DLC_S(d + (4 * k + 2) * plane + j, DLC_WSUB(q[2 * k], q[2 * k + 1]));
                DLC_S(d + (4 * k + 3) * plane + j, DLC_WSUB(z, q[2 * k + 1]));
            }
        }
    }

    /* B dV of n tiles: w[(4r + l) * n + j] = row r, column l, from u[(4k + l) * plane + j] */
    static void dlc_wino_grad_rows(const float* u, Py_ssize_t plane, float* w, Py_ssize_t n) {
        dlc_wv z = DLC_WZERO();
        for (int l = 0; l < 4; l++) {
            const float *u0 = u + l * plane, *u1 = u + (4 + l) * plane, *u2 = u + (8 + l) * plane,
                        *u3 = u + (12 + l) * plane;
            float *w0 = w + l * n, *w1 = w + (4 + l) * n, *w2 = w + (8 + l) * n, *w3 = w + (12 + l) * n;
            DLC_FOR_LANES(j, n) {
                dlc_wv a = DLC_L(u0 + j), b = DLC_L(u1 + j), c = DLC_L(u2 + j), d = DLC_L(u3 + j);
                DLC_S(w0 + j, a);
                DLC_S(w1 + j, DLC_WADD(DLC_WSUB(b, c), d));
                DLC_S(w2 + j, DLC_WADD(DLC_WSUB(b, a), c));
                DLC_S(w3 + j, DLC_WSUB(z, d));
            }
        }
    }

    /* (.) B^T along one tile row (w0..w3 = its columns l), added into a padded row's even (E) and odd (Od)
       halves: columns 2j, 2j+1 get s0 = w0, s1 = w1 - w2 + w3; columns 2j+2, 2j+3 get s2 = w1 + w2 - w0,
       s3 = -w3. One pass over column pairs m = 0..n, each taking tile m's s0, s1 and tile m - 1's s2, s3, so
       that no load reads what the same pass has just stored (a stalled store-to-load forward). */
    static void dlc_wino_grad_cols(const float* w0, const float* w1, const float* w2, const float* w3,
                                   float* E, float* Od, Py_ssize_t n) {
        E[0] += w0[0];
        Od[0] += w1[0] - w2[0] + w3[0];
        const float *p0 = w0 - 1, *p1 = w1 - 1, *p2 = w2 - 1, *p3 = w3 - 1;
        for (Py_ssize_t k = 1, r_ = n - 1; k < n; k += DLC_WV, r_ -= DLC_WV) {
            dlc_wv s0 = DLC_L(w0 + k), s1 = DLC_WADD(DLC_WSUB(DLC_L(w1 + k), DLC_L(w2 + k)), DLC_L(w3 + k));
            dlc_wv s2 = DLC_WSUB(DLC_WADD(DLC_L(p1 + k), DLC_L(p2 + k)), DLC_L(p0 + k));
            DLC_S(E + k, DLC_WADD(DLC_L(E + k), DLC_WADD(s0, s2)));
            DLC_S(Od + k, DLC_WSUB(DLC_WADD(DLC_L(Od + k), s1), DLC_L(p3 + k)));
        }
        E[n] += w1[n - 1] + w2[n - 1] - w0[n - 1];
        Od[n] -= w3[n - 1];
    }
    """
    void dlc_wino_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* A, Py_ssize_t lda,
                       const float* B, Py_ssize_t ldb, float* C, Py_ssize_t ldc) noexcept nogil
    void dlc_wino_input_row(const float* r0, Py_ssize_t W2, Py_ssize_t Wh, float* v, Py_ssize_t plane,
                            Py_ssize_t n) noexcept nogil
    void dlc_deinterleave(const float* src, Py_ssize_t n, float* ev, float* od) noexcept nogil
    void dlc_interleave(const float* ev, const float* od, Py_ssize_t n, float* dst) noexcept nogil
    void dlc_wino_weights(const float* w, Py_ssize_t nw, float* U) noexcept nogil
    void dlc_wino_weight_grad(const float* dU, Py_ssize_t nw, Py_ssize_t nparts, float* dw) noexcept nogil
    void dlc_wino_out(const float* m, Py_ssize_t plane, float bv, float* y00, float* y01, float* y10,
                      float* y11, Py_ssize_t n) noexcept nogil
    void dlc_wino_dy(const float* a00, const float* a01, const float* a10, const float* a11, float* d,
                     Py_ssize_t plane, Py_ssize_t n) noexcept nogil
    void dlc_wino_grad_rows(const float* u, Py_ssize_t plane, float* w, Py_ssize_t n) noexcept nogil
    void dlc_wino_grad_cols(const float* w0, const float* w1, const float* w2, const float* w3, float* E,
                            float* Od, Py_ssize_t n) noexcept nogil


cdef struct Wino:
    Py_ssize_t th, tw, Wh, R   # tile rows and columns; half width of a padded row (tw + 1); padded rows (2th + 2)
    Py_ssize_t rows, nbands    # tile rows per band, bands per image (1 when a task takes whole images)
    Py_ssize_t imgs, ntasks    # images per task (several when one image is smaller than the budget); tasks
    Py_ssize_t ld              # columns (tiles) of a task's V and M: rows * tw, or imgs * th * tw
    Py_ssize_t vsize, msize, padsize, tmpsize, dxsize  # per-thread scratch parts (floats)


cdef inline bint _winograd_applies(const Geom* g) noexcept:
    return g.KH == 3 and g.KW == 3 and g.sh == 1 and g.sw == 1 and g.dh == 1 and g.dw == 1 and g.G == 1


cdef bint _use_winograd(const Geom* g) noexcept:
    if _wino_mode == 0 or not _winograd_applies(g) or not _team_blas():
        return False
    if _wino_mode == 2:
        return True
    return _winograd_pays(g)


cdef bint _winograd_pays(const Geom* g) noexcept:
    # Measured against the im2col path (2-core AVX-512, 2 threads, forward and backward, best of 15):
    # 0.5-0.9x its time at 8-128 channels on maps of 8 px and more. It loses below 8 channels (the 16
    # products' inner dimension is too short), at 256 channels (its dU products get too few tiles per task
    # within the band budget: 1.2-1.5x), on 4 px maps (1.06x backward) and on a few hundred tiles in all
    # (the weight transforms and the team's start do not pay off: 2.3x at batch 2 on 6 px).
    cdef Py_ssize_t tiles = g.N * ((g.OH + 1) // 2) * ((g.OW + 1) // 2)
    return 8 <= g.C <= 128 and 8 <= g.O <= 128 and g.OH >= 8 and g.OW >= 8 and tiles >= 256


cdef Wino _wino_plan(const Geom* g, bint backward, int threads):
    """Bands of tile rows whose V and M fit `_wino_bytes`; when a whole image fits, a task takes as many
    images as fit, but no fewer tasks than two per thread (so that the team stays busy)."""
    cdef Wino p
    p.th = (g.OH + 1) // 2
    p.tw = (g.OW + 1) // 2
    p.Wh = p.tw + 1
    p.R = 2 * p.th + 2
    cdef Py_ssize_t per_row = 16 * (g.C + g.O) * p.tw * sizeof(float)
    cdef Py_ssize_t rows = _wino_bytes // per_row if per_row > 0 else p.th
    cdef Py_ssize_t imgs = 1
    if rows >= p.th:
        imgs = max(1, min(rows // p.th, g.N // (2 * threads)))
        rows = p.th
    rows = max(1, rows)
    p.nbands = (p.th + rows - 1) // rows
    p.rows = (p.th + p.nbands - 1) // p.nbands
    p.imgs = imgs
    p.ntasks = (g.N + imgs - 1) // imgs
    p.ld = imgs * p.rows * p.tw
    p.vsize = 16 * _wino_plane(g.C, _wino_stride(p.ld))
    p.msize = 16 * _wino_plane(g.O, _wino_stride(p.ld))
    p.padsize = g.C * (2 * p.rows + 2) * 2 * p.Wh
    p.tmpsize = 16 * p.rows * p.tw  # the largest of the transforms' row buffers (B dV of a band)
    p.dxsize = g.C * p.R * 2 * p.Wh if backward else 0
    return p


cdef inline Py_ssize_t _wino_stride(Py_ssize_t tiles) noexcept nogil:
    """Row stride of V and M for `tiles` columns: whole cache lines, an odd number of them, so that the rows
    a GEMM walks down spread over all of L1's sets (2 KiB strides put 16 rows in two sets)."""
    cdef Py_ssize_t lines = (tiles + 15) // 16
    return 16 * (lines + 1 - (lines & 1))


cdef inline Py_ssize_t _wino_plane(Py_ssize_t rows, Py_ssize_t ld) noexcept nogil:
    """Distance between the 16 positions' planes: one line more than their rows, for the same reason (the
    transforms write all 16 planes at once)."""
    return rows * ld + 16


cdef inline Py_ssize_t _wino_ld(const Wino* p) noexcept nogil:
    return p.vsize + p.msize + p.padsize + p.tmpsize + p.dxsize


cdef inline void _deinterleave_row(const float* src, Py_ssize_t W, Py_ssize_t pl, float* dst,
                                   Py_ssize_t Wh) noexcept nogil:
    """Input row src (W) into a padded row: padded column pc = x + pl goes to dst[pc/2] (even pc) or
    dst[Wh + pc/2] (odd); the padding is zero."""
    memset(dst, 0, 2 * Wh * sizeof(float))
    if pl & 1:  # even x lands on odd padded columns
        dlc_deinterleave(src, W, dst + Wh + (pl >> 1), dst + ((pl + 1) >> 1))
    else:
        dlc_deinterleave(src, W, dst + (pl >> 1), dst + Wh + (pl >> 1))


cdef void _wino_pad_band(const float* xn, float* pad, const Geom* g, const Wino* p,
                         Py_ssize_t tr0, Py_ssize_t nr) noexcept nogil:
    """Padded rows 2*tr0 .. 2*(tr0 + nr) + 1 of every channel, de-interleaved, (C, 2nr + 2, 2Wh)."""
    cdef Py_ssize_t c, pr, r, nrow = 2 * nr + 2
    cdef float* dst
    for c in range(g.C):
        for pr in range(nrow):
            r = 2 * tr0 + pr - g.pt
            dst = pad + (c * nrow + pr) * 2 * p.Wh
            if r < 0 or r >= g.H:
                memset(dst, 0, 2 * p.Wh * sizeof(float))
            else:
                _deinterleave_row(xn + (c * g.H + r) * g.W, g.W, g.pl, dst, p.Wh)


cdef void _wino_input(const float* pad, float* V, const Geom* g, const Wino* p,
                      Py_ssize_t nr, Py_ssize_t ld, Py_ssize_t col0) noexcept nogil:
    """V[ξ][c][col0 + t] = (B^T d B)[ξ] for the nr tile rows of a segment (rows of V ld apart)."""
    cdef Py_ssize_t c, li, W2 = 2 * p.Wh, nrow = 2 * nr + 2, plane = _wino_plane(g.C, ld)
    for c in range(g.C):
        for li in range(nr):
            dlc_wino_input_row(pad + (c * nrow + 2 * li) * W2, W2, p.Wh, V + c * ld + col0 + li * p.tw, plane,
                               p.tw)


cdef void _wino_output(const float* M, const float* bias, float* yn, float* tmp, const Geom* g, const Wino* p,
                       Py_ssize_t tr0, Py_ssize_t nr, Py_ssize_t ld, Py_ssize_t col0) noexcept nogil:
    """y rows of a segment's tiles = A^T M A (+ bias), clipped to OH × OW."""
    cdef Py_ssize_t o, li, xi, tw = p.tw, P = g.OH * g.OW, plane = _wino_plane(g.O, ld), n = nr * p.tw
    cdef float* y00
    cdef float* y01
    cdef float* y10
    cdef float* y11
    cdef float* out0
    cdef float bv
    for o in range(g.O):
        bv = 0.0 if bias == NULL else bias[o]
        dlc_wino_out(M + o * ld + col0, plane, bv, tmp, tmp + n, tmp + 2 * n, tmp + 3 * n, n)
        for li in range(nr):  # interleaved into the output rows
            y00 = tmp + li * tw
            y01 = y00 + n
            y10 = y01 + n
            y11 = y10 + n
            xi = 2 * (tr0 + li)
            out0 = yn + o * P + xi * g.OW
            dlc_interleave(y00, y01, g.OW, out0)
            if xi + 1 < g.OH:
                dlc_interleave(y10, y11, g.OW, out0 + g.OW)


cdef void _wino_dy(const float* dyn, float* dM, float* tmp, const Geom* g, const Wino* p,
                   Py_ssize_t tr0, Py_ssize_t nr, Py_ssize_t ld, Py_ssize_t col0) noexcept nogil:
    """dM[ξ][o][col0 + t] = (A dY A^T)[ξ] for a segment's tiles (dY zero beyond OH × OW)."""
    cdef Py_ssize_t o, li, xi, tw = p.tw, P = g.OH * g.OW, plane = _wino_plane(g.O, ld), n = nr * p.tw
    cdef Py_ssize_t half = g.OW // 2
    cdef float* a00  # dY[0, 0] of each tile of the segment, then dY[0, 1], dY[1, 0], dY[1, 1]
    cdef float* a01
    cdef float* a10
    cdef float* a11
    cdef const float* row0
    for o in range(g.O):
        for li in range(nr):
            xi = 2 * (tr0 + li)
            a00 = tmp + li * tw
            a01 = a00 + n
            a10 = a01 + n
            a11 = a10 + n
            row0 = dyn + o * P + xi * g.OW
            dlc_deinterleave(row0, g.OW, a00, a01)
            if g.OW & 1:
                a01[half] = 0.0
            if xi + 1 < g.OH:
                dlc_deinterleave(row0 + g.OW, g.OW, a10, a11)
                if g.OW & 1:
                    a11[half] = 0.0
            else:
                memset(a10, 0, tw * sizeof(float))
                memset(a11, 0, tw * sizeof(float))
        dlc_wino_dy(tmp, tmp + n, tmp + 2 * n, tmp + 3 * n, dM + o * ld + col0, plane, n)


cdef void _wino_input_grad(const float* dV, float* dxpad, float* tmp, const Geom* g, const Wino* p,
                           Py_ssize_t tr0, Py_ssize_t nr, Py_ssize_t ld, Py_ssize_t col0) noexcept nogil:
    """dxpad (C, R, 2Wh) += B dV B^T of a segment's tiles, overlapping tiles summed."""
    cdef Py_ssize_t c, li, r, tw = p.tw, Wh = p.Wh, W2 = 2 * p.Wh, plane = _wino_plane(g.C, ld), n = nr * p.tw
    cdef float* w = tmp  # (4 rows r) × (4 columns l) × n tiles: the row combinations B dV
    cdef float* wr0
    cdef float* E
    for c in range(g.C):
        dlc_wino_grad_rows(dV + c * ld + col0, plane, w, n)
        for li in range(nr):
            for r in range(4):  # row r of the tiles, added into padded row 2i + r
                wr0 = w + (r * 4) * n + li * tw
                E = dxpad + (c * p.R + 2 * (tr0 + li) + r) * W2
                dlc_wino_grad_cols(wr0, wr0 + n, wr0 + 2 * n, wr0 + 3 * n, E, E + Wh, tw)


cdef void _wino_unpad(const float* dxpad, float* dxn, const Geom* g, const Wino* p) noexcept nogil:
    """dx (C, H, W) = the interior of the padded, de-interleaved gradient planes."""
    cdef Py_ssize_t c, r, W2 = 2 * p.Wh, Wh = p.Wh, pl = g.pl
    cdef const float* src
    for c in range(g.C):
        for r in range(g.H):
            src = dxpad + (c * p.R + r + g.pt) * W2
            if pl & 1:
                dlc_interleave(src + Wh + (pl >> 1), src + ((pl + 1) >> 1), g.W, dxn + (c * g.H + r) * g.W)
            else:
                dlc_interleave(src + (pl >> 1), src + Wh + (pl >> 1), g.W, dxn + (c * g.H + r) * g.W)


cdef inline void _wino_forward_task(const float* x, const float* U, const float* bias, float* y,
                                    float* scratch, const Geom* g, const Wino* p, Py_ssize_t task) noexcept nogil:
    """Task = one band of one image, or p.imgs whole images side by side in V and M."""
    cdef Py_ssize_t n0, n1, n, tr0, nr, Tb, ld, vplane, mplane, xi, col
    cdef float* V = scratch
    cdef float* M = V + p.vsize
    cdef float* pad = M + p.msize
    cdef float* tmp = pad + p.padsize
    if p.imgs > 1:
        n0 = task * p.imgs
        n1 = n0 + p.imgs if n0 + p.imgs < g.N else g.N
        tr0 = 0
        nr = p.th
    else:
        n0 = task // p.nbands
        n1 = n0 + 1
        tr0 = (task % p.nbands) * p.rows
        nr = p.rows if tr0 + p.rows <= p.th else p.th - tr0
    Tb = (n1 - n0) * nr * p.tw
    ld = _wino_stride(Tb)
    vplane = _wino_plane(g.C, ld)
    mplane = _wino_plane(g.O, ld)
    col = 0
    for n in range(n0, n1):
        _wino_pad_band(x + n * g.C * g.H * g.W, pad, g, p, tr0, nr)
        _wino_input(pad, V, g, p, nr, ld, col)
        col = col + nr * p.tw
    for xi in range(16):
        dlc_wino_gemm(g.O, Tb, g.C, U + xi * g.O * g.C, g.C, V + xi * vplane, ld, M + xi * mplane, ld)
    col = 0
    for n in range(n0, n1):
        _wino_output(M, bias, y + n * g.O * g.OH * g.OW, tmp, g, p, tr0, nr, ld, col)
        col = col + nr * p.tw


cdef void _wino_forward_team(const float* x, const float* U, const float* bias, float* y, float* scratch,
                             Geom g, Wino p, int threads) noexcept nogil:
    cdef Py_ssize_t t, ld = _wino_ld(&p)
    for t in prange(p.ntasks * p.nbands, schedule="dynamic", num_threads=threads):
        _wino_forward_task(x, U, bias, y, scratch + threadid() * ld, &g, &p, t)


cdef inline void _wino_backward_task(const float* x, const float* U, const float* UT, const float* dy,
                                     float* dx, float* dU, double* dbacc, float* scratch, const Geom* g,
                                     const Wino* p, Py_ssize_t task) noexcept nogil:
    """Images [task * imgs, ...) band by band; with several images (then one band each) their dx planes are
    finished one after the other from the shared dV."""
    cdef Py_ssize_t band, tr0, nr, Tb, ld, vplane, mplane, xi, o, q, n, n0, n1, col
    cdef Py_ssize_t P = g.OH * g.OW, img = g.C * g.H * g.W
    cdef Py_ssize_t oimg = g.O * P
    cdef float* V = scratch
    cdef float* dM = V + p.vsize
    cdef float* pad = dM + p.msize
    cdef float* tmp = pad + p.padsize
    cdef float* dxpad = tmp + p.tmpsize
    cdef double s
    n0 = task * p.imgs
    n1 = n0 + p.imgs if n0 + p.imgs < g.N else g.N
    if dbacc != NULL:
        for n in range(n0, n1):
            for o in range(g.O):
                s = 0.0
                for q in range(P):
                    s = s + dy[n * oimg + o * P + q]
                dbacc[o] += s
    if dx != NULL and p.imgs == 1:
        memset(dxpad, 0, p.dxsize * sizeof(float))
    for band in range(p.nbands):
        tr0 = band * p.rows
        nr = p.rows if tr0 + p.rows <= p.th else p.th - tr0
        Tb = (n1 - n0) * nr * p.tw
        ld = _wino_stride(Tb)
        vplane = _wino_plane(g.C, ld)
        mplane = _wino_plane(g.O, ld)
        col = 0
        for n in range(n0, n1):
            _wino_pad_band(x + n * img, pad, g, p, tr0, nr)
            _wino_input(pad, V, g, p, nr, ld, col)
            _wino_dy(dy + n * oimg, dM, tmp, g, p, tr0, nr, ld, col)
            col = col + nr * p.tw
        for xi in range(16):
            _gemm(NO_TRANS, TRANS, g.O, g.C, Tb, dM + xi * mplane, ld, V + xi * vplane, ld, 1.0,
                  dU + xi * g.O * g.C, g.C)
            if dx != NULL:  # V[ξ] is spent: dV[ξ] takes its place
                dlc_wino_gemm(g.C, Tb, g.O, UT + xi * g.O * g.C, g.O, dM + xi * mplane, ld, V + xi * vplane, ld)
        if dx == NULL:
            continue
        col = 0
        for n in range(n0, n1):
            if p.imgs > 1:  # one band per image: its padded plane is finished here
                memset(dxpad, 0, p.dxsize * sizeof(float))
            _wino_input_grad(V, dxpad, tmp, g, p, tr0, nr, ld, col)
            if p.imgs > 1:
                _wino_unpad(dxpad, dx + n * img, g, p)
            col = col + nr * p.tw
    if dx != NULL and p.imgs == 1:
        _wino_unpad(dxpad, dx + n0 * img, g, p)


cdef void _wino_backward_team(const float* x, const float* U, const float* UT, const float* dy, float* dx,
                              float* dU, double* dbacc, float* scratch, Geom g, Wino p, int threads) noexcept nogil:
    """Tasks statically scheduled (dw summed in the same order on every call); thread t owns dU[t] and
    dbacc[t]."""
    cdef Py_ssize_t t, tid, ld = _wino_ld(&p)
    for t in prange(p.ntasks, schedule="static", num_threads=threads):
        tid = threadid()
        _wino_backward_task(x, U, UT, dy, dx, dU + tid * 16 * g.O * g.C,
                            NULL if dbacc == NULL else dbacc + tid * g.O, scratch + tid * ld, &g, &p, t)


cdef object _wino_weights(w):
    """U (16, O, C) float32 = G w G^T at each of the 16 positions."""
    U = np.empty((16, w.shape[0], w.shape[1]), dtype=np.float32)
    cdef const float* wp = _fptr(w)
    cdef float* Up = _fptr(U)
    cdef Py_ssize_t nw = w.shape[0] * w.shape[1]
    with nogil:
        dlc_wino_weights(wp, nw, Up)
    return U


cdef object _wino_forward(x, w, b, Geom g):
    cdef int threads = _team_threads()
    cdef Wino p = _wino_plan(&g, False, threads)
    U = _wino_weights(w)
    y = np.empty((g.N, g.O, g.OH, g.OW), dtype=np.float32)
    scratch = _workspace("wino", threads * _wino_ld(&p))
    cdef const float* xp = _fptr(x)
    cdef const float* Up = _fptr(U)
    cdef const float* bp = _fptr(b)
    cdef float* yp = _fptr(y)
    cdef float* sp = _fptr(scratch)
    _blas_single_enter()
    try:
        with nogil:
            _wino_forward_team(xp, Up, bp, yp, sp, g, p, threads)
    finally:
        _blas_single_exit()
    return y


cdef tuple _wino_backward(x, w, dy, Geom g, bint need_dx, bint need_db):
    cdef int threads = _team_threads()
    cdef Wino p = _wino_plan(&g, need_dx, threads)
    U = _wino_weights(w)
    UT = np.ascontiguousarray(U.transpose(0, 2, 1))
    dx = np.empty(x.shape, dtype=np.float32) if need_dx else None
    dU = _workspace("wino_dU", threads * 16 * g.O * g.C).reshape(threads, 16, g.O, g.C)
    dU[...] = 0.0
    dbacc = None
    cdef double* dbaccp = NULL
    if need_db:
        dbacc = _workspace("dbacc", threads * g.O, np.float64).reshape(threads, g.O)
        dbacc[...] = 0.0
        dbaccp = <double*>cnp.PyArray_DATA(<cnp.ndarray>dbacc)
    scratch = _workspace("wino", threads * _wino_ld(&p))
    cdef const float* xp = _fptr(x)
    cdef const float* Up = _fptr(U)
    cdef const float* UTp = _fptr(UT)
    cdef const float* dyp = _fptr(dy)
    cdef float* dxp = _fptr(dx)
    cdef float* dUp = _fptr(dU)
    cdef float* sp = _fptr(scratch)
    _blas_single_enter()
    try:
        with nogil:
            _wino_backward_team(xp, Up, UTp, dyp, dxp, dUp, dbaccp, sp, g, p, threads)
    finally:
        _blas_single_exit()
    dw = np.empty((g.O, g.C, 3, 3), dtype=np.float32)
    cdef float* dwp = _fptr(dw)
    with nogil:
        dlc_wino_weight_grad(dUp, g.O * g.C, threads, dwp)
    db = dbacc.sum(axis=0).astype(np.float32) if need_db else None
    return dx, dw, db
