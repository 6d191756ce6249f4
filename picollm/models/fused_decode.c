/* The Transformer's decode loop as C functions: the step (every layer, for every new token, in one call),
   the sampler (greedy, temperature, top-k, top-p) and the loop that alternates them for N tokens.

   PyTorch runs a batch-1 decode step as ~80 small ops, each dispatched from Python, and top-p sampling
   as ~15 more; on a CPU that overhead costs more than the arithmetic. This file does the same math in
   one pass (the approach of llama2.c's run.c), reading the model's own weight tensors in place.
   picollm/models/fused.py compiles it with the system C compiler at first use, loads it with ctypes and
   falls back to PyTorch when it cannot. Plain C with OpenMP pragmas (ignored where the compiler lacks
   -fopenmp) and AVX-512 intrinsics where the CPU has them: no Python or torch headers, so it compiles in
   about a second.

   Weights: the matmul weights (embedding, q/k/v, projections, MLP, head) are float32, bfloat16, or int8
   with a float32 scale per group of 32 consecutive inputs of a row (llama.cpp's Q8_0 layout, scales kept
   apart); norms, biases and position tables come as float32. Activations and all accumulation are
   float32; the KV cache is float32 or bf16 (PicoCfg.kv_bf16: fused.py picks bf16 beside bf16 or int8
   weights). A matmul rounds its input to bf16 for bf16 weights (as PyTorch's bf16 model does) and
   quantizes it to int8 by groups of 32 for int8 weights (as llama.cpp's Q8_0 dot product). Without
   AVX-512 (BF16, VNNI) the same math runs in plain C. The math follows models/transformer.py line by
   line: pre- or post-norm,
   RMSNorm or LayerNorm, RoPE ("rotate half" pairs i, i + hs/2), learned or sinusoidal positions, GELU
   (erf), SwiGLU or ReLU^2 MLP, optional biases; grouped-query attention (n_kv_head kv heads, each serving
   n_head / n_kv_head consecutive query heads), sliding windows (every layer, or the even ones),
   QK-norm (RMSNorm over each q and k head before RoPE), attention sinks and logit soft-capping.
   A mixture of experts is not served here (fused.py says so and PyTorch decodes it).

   Batches: row b of a call lives in KV-cache slot slot[b] at its own position pos[b], so rows of
   different lengths (ragged prompts, a server's requests that joined at different times) step together.
   Every dot product sums in the same order whatever the batch, so a row's logits do not depend on which
   other rows share its step. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int32_t n_layer, n_head, n_embd, head_size, hidden, vocab, block_size;
    int32_t layernorm;  /* 0: RMSNorm, 1: LayerNorm */
    int32_t pre_norm;   /* 1: pre-norm (with a final norm), 0: post-norm */
    int32_t swiglu;     /* 1: SwiGLU (fc holds gate then up, 2*hidden rows), 0: GELU or ReLU^2 */
    int32_t pos_kind;   /* 0: none, 1: learned or sinusoidal table added to the embedding, 2: RoPE */
    int32_t wtype;      /* matmul weights: 0 float32, 1 bfloat16, 2 int8 with a scale per 32 inputs */
    float eps;
    int32_t n_kv_head;  /* key/value heads (n_head: multi-head attention) */
    int32_t window;     /* 0: full attention; W: a query sees its last W keys */
    int32_t window_alternate;  /* 1: only even layers slide */
    int32_t relu2;      /* 1: ReLU^2 MLP (with swiglu 0) */
    float softcap;      /* 0: off; else logits = softcap * tanh(logits / softcap) */
    int32_t kv_bf16;    /* 1: the KV cache holds bf16 (rounded to nearest even), else float32 */
} PicoCfg;

/* How one row samples (sample_next of picollm/sampling.py): greedy, or temperature, then top-k, then
   top-p, then one draw from a uniform number by inverse CDF. */
typedef struct {
    float temperature;  /* 0: greedy */
    float top_p;        /* >= 1: off */
    int32_t top_k;      /* 0: off */
    int32_t greedy;
} PicoSampling;

/* Weight pointers, in this order (NULL where the model has none):
   (bf16 or int8: every matmul weight packed by pico_pack_bf16 or pico_pack_int8, the head too; wte
   row-major for the lookup)
   global  0 wte (V, C)  1 position table (block, C)  2 rope cos (block, hs/2)  3 rope sin
           4 final norm weight  5 final norm bias  6 head (V, C)
   layer l, at 7 + 15 l:  0 ln_1.w  1 ln_1.b  2 qkv.w ((nh + 2 nkv) hs, C)  3 qkv.b  4 proj.w (C, C)  5 proj.b
           6 ln_2.w  7 ln_2.b  8 fc.w (H or 2H, C)  9 fc.b  10 mlp proj.w (C, H)  11 mlp proj.b
           12 q_norm.w (hs)  13 k_norm.w (hs)  14 sinks (nh)
   With int8 weights, a second array of the same length holds each weight's scales: wte's (rows, cols/32),
   the packed ones as pico_pack_int8 lays them out. */
enum { W_WTE, W_POS, W_COS, W_SIN, W_LNF, W_LNF_B, W_HEAD, N_GLOBAL };
enum { L_LN1, L_LN1_B, L_QKV, L_QKV_B, L_PROJ, L_PROJ_B, L_LN2, L_LN2_B, L_FC, L_FC_B, L_MPROJ, L_MPROJ_B,
       L_QNORM, L_KNORM, L_SINKS, N_PER_LAYER };

/* Return codes, one per cause; fused.py names each (keep the two lists in step). */
enum {
    PICO_OK = 0,
    PICO_BAD_TOKEN = 1,      /* a token id outside [0, vocab) */
    PICO_BAD_POSITION = 2,   /* a row's pos < 0, or pos + T past block_size (the KV cache's length) */
    PICO_NO_TOKENS = 3,      /* T < 1 or B < 1: nothing to feed */
    PICO_MISSING_WEIGHT = 4, /* a weight pointer the configuration reads is NULL */
    PICO_BAD_HISTORY = 5     /* the loop's token history is full */
};

enum { WT_F32 = 0, WT_BF16 = 1, WT_INT8 = 2, QGROUP = 32 };

/* A matmul weight, its int8 scales, and room for its input as the kernel reads it (bf16: rounded, B * n_in
   values; int8: quantized, see quantize_row). */
typedef struct { const void *w; const float *s; int type; void *xb; } Mat;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Weight i of the row starting at element row_off; rs: that row's int8 scales (a group per 32 inputs, the
   last one partial where the row's length is not a multiple of 32). */
static inline float weight_at(Mat m, size_t row_off, const float *rs, int i) {
    if (m.type == WT_F32) return ((const float *)m.w)[row_off + i];
    if (m.type == WT_BF16) return bf16_to_f32(((const uint16_t *)m.w)[row_off + i]);
    return (float)((const int8_t *)m.w)[row_off + i] * rs[i / QGROUP];
}

static inline const float *row_scales(Mat m, int j, int n_in) {
    return m.type == WT_INT8 ? m.s + (size_t)j * ((n_in + QGROUP - 1) / QGROUP) : NULL;
}

#ifdef __AVX512F__
/* The sums of 8 vectors' 16 lanes each, out[k] = sum(v[k]), by one transposing tree (~20 instructions
   instead of 8 separate reductions). Each vector's lanes are added in the same order whatever the others
   hold, so a tile pads with zero vectors without changing any sum. */
static inline void reduce8(const __m512 v[8], float out[8]) {
    __m512 w[4], u[2];
    for (int i = 0; i < 4; i++)  /* 256-bit halves: v[2i] in quarters 0-1, v[2i+1] in 2-3 */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)  /* quarter q: 4 partial sums of v[4i + q] */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    const __m512 t2 = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
    float all[16];
    _mm512_storeu_ps(all, t2);  /* quarter q: sum(v[q]) at 4q, sum(v[4 + q]) at 4q + 1 */
    for (int q = 0; q < 4; q++) {
        out[q] = all[4 * q];
        out[4 + q] = all[4 * q + 1];
    }
}

/* s[r][b] = sum(a0[r][b] + a1[r][b]) for the RJ x NB (<= 8) accumulator pairs of a tile. */
static inline __attribute__((always_inline)) void reduce_tile(__m512 a0[4][4], __m512 a1[4][4], float s[4][4],
                                                              const int RJ, const int NB) {
    __m512 v[8];
    float out[8];
    for (int k = 0; k < 8; k++) v[k] = _mm512_setzero_ps();
    for (int r = 0; r < RJ; r++)
        for (int b = 0; b < NB; b++) v[r * NB + b] = _mm512_add_ps(a0[r][b], a1[r][b]);
    reduce8(v, out);
    for (int r = 0; r < RJ; r++)
        for (int b = 0; b < NB; b++) s[r][b] = out[r * NB + b];
}
#endif

/* out[b * ostride + j] = W[j, :] . x[b, :] for RJ rows j0.. of a float32 W and NB rows of x (n_in inputs).
   Each (j, b) sum has two 16-lane accumulators, for the even and the odd 16-input blocks; they are added
   and reduced, then the tail is added in order: the same order for every RJ and NB, so a row's result does
   not depend on the batch. RJ and NB are constants at each call: the 2 RJ NB accumulators stay in
   registers and each weight is loaded once for NB rows of x. */
static inline __attribute__((always_inline)) void dot_tile(float *out, size_t ostride, const float *W, int j0,
                                                           const float *x, int n_in, const int RJ, const int NB) {
    float s[4][4];
    int i = 0;
#ifdef __AVX512F__
    __m512 a0[4][4], a1[4][4];
    for (int r = 0; r < RJ; r++)
        for (int b = 0; b < NB; b++) a0[r][b] = a1[r][b] = _mm512_setzero_ps();
    for (; i + 32 <= n_in; i += 32) {
        __m512 xlo[4], xhi[4];
        for (int b = 0; b < NB; b++) {
            xlo[b] = _mm512_loadu_ps(x + (size_t)b * n_in + i);
            xhi[b] = _mm512_loadu_ps(x + (size_t)b * n_in + i + 16);
        }
        for (int r = 0; r < RJ; r++) {
            const float *row = W + (size_t)(j0 + r) * n_in + i;
            const __m512 wlo = _mm512_loadu_ps(row), whi = _mm512_loadu_ps(row + 16);
            for (int b = 0; b < NB; b++) {
                a0[r][b] = _mm512_fmadd_ps(wlo, xlo[b], a0[r][b]);
                a1[r][b] = _mm512_fmadd_ps(whi, xhi[b], a1[r][b]);
            }
        }
    }
    if (i + 16 <= n_in) {
        for (int r = 0; r < RJ; r++) {
            const __m512 wv = _mm512_loadu_ps(W + (size_t)(j0 + r) * n_in + i);
            for (int b = 0; b < NB; b++) a0[r][b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (size_t)b * n_in + i), a0[r][b]);
        }
        i += 16;
    }
    reduce_tile(a0, a1, s, RJ, NB);
#else
    for (int r = 0; r < RJ; r++)
        for (int b = 0; b < NB; b++) s[r][b] = 0.0f;
#endif
    for (; i < n_in; i++)
        for (int r = 0; r < RJ; r++) {
            const float wi = W[(size_t)(j0 + r) * n_in + i];
            for (int b = 0; b < NB; b++) s[r][b] += wi * x[(size_t)b * n_in + i];
        }
    for (int r = 0; r < RJ; r++)
        for (int b = 0; b < NB; b++) out[(size_t)b * ostride + j0 + r] = s[r][b];
}

/* out[b, j] = W[j, :] . x[b, :] for the rows j0 .. j0 + RJ - 1 of W and every b < B, 2 rows of x at a time. */
static inline __attribute__((always_inline)) void rows_tile(float *out, int n_out, const float *W, int j0,
                                                            const float *x, int B, int n_in, const int RJ) {
    int b = 0;
    for (; b + 2 <= B; b += 2) dot_tile(out + (size_t)b * n_out, n_out, W, j0, x + (size_t)b * n_in, n_in, RJ, 2);
    if (b < B) dot_tile(out + (size_t)b * n_out, n_out, W, j0, x + (size_t)b * n_in, n_in, RJ, 1);
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as _mm512_cvtneps_pbh */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Rows of x (B, n) rounded to bf16 into xb. */
static void round_bf16(uint16_t *xb, const float *x, size_t n) {
    size_t i = 0;
#ifdef __AVX512BF16__
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#endif
    for (; i < n; i++) xb[i] = f32_to_bf16(x[i]);
}

/* bf16 weights are packed (pico_pack_bf16) in tiles of PT = 32 rows: for each pair of inputs k2, the 32
   rows' two weights side by side, so one 64-byte load holds 16 rows' pairs and one _mm512_dpbf16_ps adds
   w[j][2k2] x[2k2] + w[j][2k2+1] x[2k2+1] into the lane of row j: the lanes are the outputs (no reduction
   at the end), and an input pair, broadcast, serves every row of the tile. Each output sums its pairs in
   order, whatever the batch. A tile's data is contiguous: at batch 1 it streams from memory in order. */
enum { PT = 32, PPREFETCH = 64 };

/* P[((t * K2 + k2) * PT + r) * 2 + e] = W[t * PT + r][2 k2 + e], zero past the matrix; K2 = ceil(n_in / 2). */
void pico_pack_bf16(const uint16_t *W, int n_out, int n_in, uint16_t *P) {
    const int K2 = (n_in + 1) / 2, tiles = (n_out + PT - 1) / PT;
    for (int t = 0; t < tiles; t++)
        for (int k2 = 0; k2 < K2; k2++)
            for (int r = 0; r < PT; r++)
                for (int e = 0; e < 2; e++) {
                    const int j = t * PT + r, i = 2 * k2 + e;
                    P[(((size_t)t * K2 + k2) * PT + r) * 2 + e] = j < n_out && i < n_in ? W[(size_t)j * n_in + i] : 0;
                }
}

/* out[b * ostride + j] for the (up to) 32 rows j of tile t and NB rows of bf16 inputs xb (rows n_in apart;
   an odd n_in's last pair reads one element past its row, times a zero weight). */
static inline __attribute__((always_inline)) void packed_tile(float *out, size_t ostride, const uint16_t *P, int t,
                                                              int n_out, int n_in, const uint16_t *xb, const int NB) {
    const int K2 = (n_in + 1) / 2, j0 = t * PT, nj = n_out - j0 < PT ? n_out - j0 : PT;
    const uint16_t *tile = P + (size_t)t * K2 * PT * 2;
#ifdef __AVX512BF16__
    __m512 acc[8][2];
    for (int b = 0; b < NB; b++) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    for (int k2 = 0; k2 < K2; k2++) {
        if (NB > 1)  /* as q8_tile: a batch outpaces the hardware's prefetch */
            for (int l = 0; l < PT * 2; l += 32) _mm_prefetch((const char *)(tile + (size_t)(k2 + PPREFETCH) * PT * 2 + l), _MM_HINT_T0);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(tile + (size_t)k2 * PT * 2);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(tile + (size_t)k2 * PT * 2 + 32);
        for (int b = 0; b < NB; b++) {
            uint32_t pair;
            memcpy(&pair, xb + (size_t)b * n_in + 2 * k2, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[b][0] = _mm512_dpbf16_ps(acc[b][0], w0, xv);
            acc[b][1] = _mm512_dpbf16_ps(acc[b][1], w1, xv);
        }
    }
    const __mmask16 m0 = nj >= 16 ? 0xffff : (__mmask16)((1u << nj) - 1);
    const __mmask16 m1 = nj >= 32 ? 0xffff : nj <= 16 ? 0 : (__mmask16)((1u << (nj - 16)) - 1);
    for (int b = 0; b < NB; b++) {
        _mm512_mask_storeu_ps(out + (size_t)b * ostride + j0, m0, acc[b][0]);
        _mm512_mask_storeu_ps(out + (size_t)b * ostride + j0 + 16, m1, acc[b][1]);
    }
#else
    for (int b = 0; b < NB; b++)
        for (int r = 0; r < nj; r++) {
            float sum = 0.0f;
            for (int k2 = 0; k2 < K2; k2++) {
                const uint16_t *w = tile + ((size_t)k2 * PT + r) * 2, *x = xb + (size_t)b * n_in + 2 * k2;
                sum += bf16_to_f32(w[0]) * bf16_to_f32(x[0]) + (2 * k2 + 1 < n_in ? bf16_to_f32(w[1]) * bf16_to_f32(x[1]) : 0.0f);
            }
            out[(size_t)b * ostride + j0 + r] = sum;
        }
#endif
}

/* TILE(nb) for nb = NB (1..8) as a constant, so that a tile's nb rows of sums stay in registers. */
#define WITH_CONSTANT_NB(NB, TILE) \
    switch (NB) { \
        case 8: TILE(8); break; \
        case 7: TILE(7); break; \
        case 6: TILE(6); break; \
        case 5: TILE(5); break; \
        case 4: TILE(4); break; \
        case 3: TILE(3); break; \
        case 2: TILE(2); break; \
        case 1: TILE(1); break; \
        default: break; \
    }

/* Tile t of a packed bf16 matrix for all B rows of x, 8 at a time. */
static void packed_rows(float *out, int n_out, const uint16_t *P, int t, int n_in, const uint16_t *xb, int B) {
    for (int b = 0; b < B; b += 8) {
#define PACKED_TILE(nb) packed_tile(out + (size_t)b * n_out, n_out, P, t, n_out, n_in, xb + (size_t)b * n_in, nb)
        WITH_CONSTANT_NB(B - b < 8 ? B - b : 8, PACKED_TILE)
#undef PACKED_TILE
    }
}

/* Tiles of W's rows: at batch 1 one row each (one sequential stream per thread: a large model reads its
   weights from memory near the memory's bandwidth); else 4 rows, for 2 rows of x at a time (16
   accumulators), and the n_out % 4 rows left over one each. */
static inline int tiles_of(int B, int n_out) { return B == 1 ? n_out : n_out / 4 + n_out % 4; }

static inline void tile_rows(int B, int n_out, int t, int *j0, int *nj) {
    if (B == 1) *j0 = t, *nj = 1;
    else if (t < n_out / 4) *j0 = 4 * t, *nj = 4;
    else *j0 = n_out / 4 * 4 + (t - n_out / 4), *nj = 1;
}

/* ---- int8 weights: packed for _mm512_dpbusd_epi32, with inputs quantized to int8 ----
   llama.cpp's Q8_0 dot product: the input is quantized too, each group of 32 to int8 with the scale
   max|x| / 127 (round to nearest even), so a group's dot product is exact in int32 and scaled once:
   out[j] = sum over groups g of (s_w[j][g] d_x[g]) (q_w[j][g] . q_x[g]), the groups in order.
   vpdpbusd multiplies unsigned bytes by signed ones, so the weights are stored as q + 128 (1..255) and
   each input group carries -128 sum(q_x) to start its int32 sum from. A tile is QT rows: for each input
   group, 8 blocks of 64 bytes, block k4 holding the 16 rows' inputs 4 k4 .. 4 k4 + 3 (a lane per row), then
   the tile's scales, a float32 per row and group. */
enum { QT = 16, QPREFETCH = 8 };

/* P[(((t G + g) 8 + k4) QT + r) 4 + e] = Q[t QT + r][32 g + 4 k4 + e] + 128, and PS[(t G + g) QT + r] =
   S[t QT + r][g]; zero weights (128) and scales past the matrix. G = ceil(n_in / 32). */
void pico_pack_int8(const int8_t *Q, const float *S, int n_out, int n_in, uint8_t *P, float *PS) {
    const int G = (n_in + QGROUP - 1) / QGROUP, tiles = (n_out + QT - 1) / QT;
    for (int t = 0; t < tiles; t++)
        for (int g = 0; g < G; g++) {
            for (int k4 = 0; k4 < QGROUP / 4; k4++)
                for (int r = 0; r < QT; r++)
                    for (int e = 0; e < 4; e++) {
                        const int j = t * QT + r, i = g * QGROUP + 4 * k4 + e;
                        const int q = j < n_out && i < n_in ? Q[(size_t)j * n_in + i] : 0;
                        P[((((size_t)t * G + g) * (QGROUP / 4) + k4) * QT + r) * 4 + e] = (uint8_t)(q + 128);
                    }
            for (int r = 0; r < QT; r++)
                PS[((size_t)t * G + g) * QT + r] = t * QT + r < n_out ? S[(size_t)(t * QT + r) * G + g] : 0.0f;
        }
}

/* Where quantize_row puts B rows of G groups in xb: the int8 values (32 G bytes a row, zero past n_in),
   each group's scale d and each group's -128 sum(q). */
typedef struct { int8_t *q; float *d; int32_t *c; } QRows;

static inline QRows qrows(void *xb, int B, int G) {
    QRows r;
    r.q = (int8_t *)xb;
    r.d = (float *)((int8_t *)xb + (size_t)B * G * QGROUP);
    r.c = (int32_t *)(r.d + (size_t)B * G);
    return r;
}

/* Row b of x (its n values at x) quantized by groups of 32 into qr: d = max|x| / 127, q = round(x / d) by
   the reciprocal, as picollm/models/fused.py's quantize_acts_int8 (which the tests hold this to). */
static void quantize_row(QRows qr, const float *x, int b, int G, int n) {
    for (int g = 0; g < G; g++) {
        const float *xg = x + g * QGROUP;
        const int len = n - g * QGROUP < QGROUP ? n - g * QGROUP : QGROUP;
        int8_t *q = qr.q + ((size_t)b * G + g) * QGROUP;
        int32_t sum = 0;
        float d;
#ifdef __AVX512F__
        const __mmask16 m0 = len >= 16 ? 0xffff : (__mmask16)((1u << len) - 1);
        const __mmask16 m1 = len >= 32 ? 0xffff : len <= 16 ? 0 : (__mmask16)((1u << (len - 16)) - 1);
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, xg), x1 = _mm512_maskz_loadu_ps(m1, xg + 16);
        d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1))) / 127.0f;
        const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
        float amax = 0.0f;
        for (int i = 0; i < len; i++) amax = amax > fabsf(xg[i]) ? amax : fabsf(xg[i]);
        d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < QGROUP; i++) {
            const int v = i < len ? (int)nearbyintf(xg[i] * id) : 0;
            q[i] = (int8_t)v;
            sum += v;
        }
#endif
        qr.d[(size_t)b * G + g] = d;
        qr.c[(size_t)b * G + g] = -128 * sum;
    }
}

/* out[b * ostride + j] for the (up to) QT rows j of tile t and NB rows of quantized inputs. Each output sums
   its groups in order, whatever the batch. */
static inline __attribute__((always_inline)) void q8_tile(float *out, size_t ostride, const uint8_t *P, const float *PS,
                                                          int t, int n_out, int G, QRows x, const int NB) {
    const int j0 = t * QT, nj = n_out - j0 < QT ? n_out - j0 : QT;
    const uint8_t *tile = P + (size_t)t * G * QGROUP * QT;
    const float *ts = PS + (size_t)t * G * QT;
#ifdef __AVX512VNNI__
    __m512 acc[8];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i ia[8];
        if (NB > 1)  /* a batch spends long enough on a group that the hardware's prefetch falls behind */
            for (int l = 0; l < QGROUP * QT; l += 64) _mm_prefetch((const char *)tile + (size_t)(g + QPREFETCH) * QGROUP * QT + l, _MM_HINT_T0);
        for (int b = 0; b < NB; b++) ia[b] = _mm512_set1_epi32(x.c[(size_t)b * G + g]);
        for (int k4 = 0; k4 < QGROUP / 4; k4++) {
            const __m512i wv = _mm512_loadu_si512(tile + ((size_t)g * (QGROUP / 4) + k4) * QT * 4);
            for (int b = 0; b < NB; b++) {
                int32_t four;
                memcpy(&four, x.q + ((size_t)b * G + g) * QGROUP + 4 * k4, sizeof four);
                ia[b] = _mm512_dpbusd_epi32(ia[b], wv, _mm512_set1_epi32(four));
            }
        }
        const __m512 sc = _mm512_loadu_ps(ts + (size_t)g * QT);
        for (int b = 0; b < NB; b++)
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[b]), _mm512_mul_ps(sc, _mm512_set1_ps(x.d[(size_t)b * G + g])), acc[b]);
    }
    const __mmask16 m = nj >= 16 ? 0xffff : (__mmask16)((1u << nj) - 1);
    for (int b = 0; b < NB; b++) _mm512_mask_storeu_ps(out + (size_t)b * ostride + j0, m, acc[b]);
#else
    for (int b = 0; b < NB; b++)
        for (int r = 0; r < nj; r++) {
            float sum = 0.0f;
            for (int g = 0; g < G; g++) {
                int32_t ia = x.c[(size_t)b * G + g];
                for (int i = 0; i < QGROUP; i++)
                    ia += (int32_t)tile[(((size_t)g * (QGROUP / 4) + i / 4) * QT + r) * 4 + i % 4] *
                          x.q[((size_t)b * G + g) * QGROUP + i];
                sum = fmaf((float)ia, ts[(size_t)g * QT + r] * x.d[(size_t)b * G + g], sum);
            }
            out[(size_t)b * ostride + j0 + r] = sum;
        }
#endif
}

/* Tile t of a packed int8 matrix for all B rows of x, 8 at a time. */
static void q8_rows(float *out, int n_out, const uint8_t *P, const float *PS, int t, int G, QRows x, int B) {
    for (int b = 0; b < B; b += 8) {
        const QRows xs = {x.q + (size_t)b * G * QGROUP, x.d + (size_t)b * G, x.c + (size_t)b * G};
#define Q8_TILE(nb) q8_tile(out + (size_t)b * n_out, n_out, P, PS, t, n_out, G, xs, nb)
        WITH_CONSTANT_NB(B - b < 8 ? B - b : 8, Q8_TILE)
#undef Q8_TILE
    }
}

static inline void add_bias(float *out, const float *bias, int B, int n_out, int j0, int j1) {
    for (int b = 0; b < B; b++)
        for (int j = j0; j < n_out && j < j1; j++) out[(size_t)b * n_out + j] += bias[j];
}

/* Row b of a matmul's input (B rows of n_in) as its kernel reads it: rounded to bf16 or quantized to int8
   into m.xb (float32 weights read x itself). Done by the loop that makes the row, where it can (one
   barrier less per matmul). */
static void prep_row(Mat m, const float *xr, int b, int B, int n_in) {
    const int G = (n_in + QGROUP - 1) / QGROUP;
    if (m.type == WT_BF16) round_bf16((uint16_t *)m.xb + (size_t)b * n_in, xr, (size_t)n_in);
    else if (m.type == WT_INT8) quantize_row(qrows(m.xb, B, G), xr, b, G, n_in);
}

/* out[b, j] = W[j, :] . x[b, :] (+ bias[j]) for b < B, j < n_out, the input's rows prepared (prep_row); W is
   (n_out, n_in): float32 row-major (at batch 1 a row at a time, else 4: tiles_of), or packed bf16 or int8
   tiles. Called by every thread of pico_forward's parallel region: the tiles are split among them (omp
   for, a barrier at the end). */
static void matvec_tiles(float *out, Mat m, const float *bias, const float *x, int B, int n_out, int n_in) {
    if (m.type == WT_BF16) {
#pragma omp for schedule(static)
        for (int t = 0; t < (n_out + PT - 1) / PT; t++) {
            packed_rows(out, n_out, (const uint16_t *)m.w, t, n_in, (const uint16_t *)m.xb, B);
            if (bias) add_bias(out, bias, B, n_out, t * PT, (t + 1) * PT);
        }
        return;
    }
    if (m.type == WT_INT8) {
        const int G = (n_in + QGROUP - 1) / QGROUP;
        const QRows xq = qrows(m.xb, B, G);
#pragma omp for schedule(static)
        for (int t = 0; t < (n_out + QT - 1) / QT; t++) {
            q8_rows(out, n_out, (const uint8_t *)m.w, m.s, t, G, xq, B);
            if (bias) add_bias(out, bias, B, n_out, t * QT, (t + 1) * QT);
        }
        return;
    }
    const int n_tiles = tiles_of(B, n_out);
#pragma omp for schedule(static)
    for (int t = 0; t < n_tiles; t++) {
        int j0, nj;
        tile_rows(B, n_out, t, &j0, &nj);
        if (nj == 4) rows_tile(out, n_out, (const float *)m.w, j0, x, B, n_in, 4);
        else rows_tile(out, n_out, (const float *)m.w, j0, x, B, n_in, 1);
        if (bias) add_bias(out, bias, B, n_out, j0, j0 + nj);
    }
}

/* A matmul whose input rows are ready in x: they are prepared (split among the threads), then multiplied. */
static void matvec(float *out, Mat m, const float *bias, const float *x, int B, int n_out, int n_in) {
    if (m.type != WT_F32) {
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) prep_row(m, x + (size_t)b * n_in, b, B, n_in);
    }
    matvec_tiles(out, m, bias, x, B, n_out, n_in);
}

static void embed_row(float *dst, Mat m, int64_t tok, int C) {
    const size_t off = (size_t)tok * C;
    if (m.type == WT_F32) {
        memcpy(dst, (const float *)m.w + off, sizeof(float) * (size_t)C);
    } else {
        const float *rs = row_scales(m, (int)tok, C);
        for (int i = 0; i < C; i++) dst[i] = weight_at(m, off, rs, i);
    }
}

static void norm(float *out, const float *x, const float *w, const float *b, int C, int layernorm, float eps) {
    if (layernorm) {
        float mean = 0.0f, var = 0.0f;
        for (int i = 0; i < C; i++) mean += x[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
        float r = 1.0f / sqrtf(var / C + eps);
        for (int i = 0; i < C; i++) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.0f);
    } else {
        float ss = 0.0f;
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + eps);
        for (int i = 0; i < C; i++) out[i] = x[i] * r * w[i];
    }
}

static void rope(float *v, const float *cos, const float *sin, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = a * sin[i] + b * cos[i];
    }
}

/* An element of the KV cache (float32 or bf16), and 16 of them as float32. */
static inline float kv_at(const void *p, size_t i, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#ifdef __AVX512F__
static inline __attribute__((always_inline)) __m512 kv16(const void *p, size_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* q . the n cache elements from off. */
static inline __attribute__((always_inline)) float dot_kv(const float *q, const void *k, size_t off, int n, const int bf16) {
    int i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv16(k, off + i, bf16), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += q[i] * kv_at(k, off + i, bf16);
    return s;
}

/* n floats into the KV cache at element off, rounded to bf16 where it holds bf16. */
static void kv_put(void *cache, size_t off, const float *src, int n, int bf16) {
    if (bf16) round_bf16((uint16_t *)cache + off, src, (size_t)n);
    else memcpy((float *)cache + off, src, sizeof(float) * (size_t)n);
}

/* Scratch floats for B rows ((row, position) pairs of a step): see the carve-up at the top of pico_forward. */
int64_t pico_scratch_floats(const PicoCfg *c, int B) {
    int64_t C = c->n_embd, H = c->hidden, QKV = (int64_t)(c->n_head + 2 * c->n_kv_head) * c->head_size;
    return (int64_t)B * (6 * C + QKV + 3 * H + c->vocab + (C > H ? C : H) + 32) + 32;
}

/* PICO_OK when every weight the configuration reads is there, else PICO_MISSING_WEIGHT. */
static int check_weights(const PicoCfg *c, const void *const *w, const float *const *ws) {
    static const int mats[] = {L_QKV, L_PROJ, L_FC, L_MPROJ};
    if (!w[W_WTE] || !w[W_HEAD] || (c->pos_kind == 1 && !w[W_POS]) ||
        (c->pos_kind == 2 && (!w[W_COS] || !w[W_SIN])) || (c->pre_norm && !w[W_LNF]))
        return PICO_MISSING_WEIGHT;
    if (c->wtype == WT_INT8 && (!ws || !ws[W_WTE] || !ws[W_HEAD])) return PICO_MISSING_WEIGHT;
    for (int l = 0; l < c->n_layer; l++) {
        const int at = N_GLOBAL + N_PER_LAYER * l;
        if (!w[at + L_LN1] || !w[at + L_LN2]) return PICO_MISSING_WEIGHT;
        for (int k = 0; k < 4; k++)
            if (!w[at + mats[k]] || (c->wtype == WT_INT8 && !ws[at + mats[k]])) return PICO_MISSING_WEIGHT;
    }
    return PICO_OK;
}

static inline Mat mat_at(const PicoCfg *c, const void *const *w, const float *const *ws, int i, void *xb) {
    Mat m = {w[i], c->wtype == WT_INT8 ? ws[i] : NULL, c->wtype, xb};
    return m;
}

static float exp_shifted(float *x, int V, float mx);

#ifdef __AVX512F__
static inline __m512 exp16(__m512 x);
#endif

/* dst[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up: SwiGLU's hidden activation. */
static void silu_mul(float *dst, const float *gate, const float *up, int n) {
    int i = 0;
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) dst[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Attention of one query head of one row over its cached keys first..pos (plus a sink, if any): the
   weighted sum of values into yh. att: pos + 1 floats of scratch. With AVX-512 and hs a multiple of 16,
   the scores of 8 keys at a time share one reduction tree, the softmax's exp is vectorized (exp16) and
   the values are added 16 lanes at a time: at batch 8 the scalar loops cost as much as the matmuls. */
static inline __attribute__((always_inline)) void attend_kv(float *yh, const float *qh, const void *kh, const void *vh,
                                                            int first, int pos, int hs, float scale, const float *sink,
                                                            float *att, const int bf16) {
    float *sc = att + first;
    const int n = pos - first + 1;
    int j = 0;
#ifdef __AVX512F__
    const int wide = hs % 16 == 0;
    if (wide)
        for (; j + 8 <= n; j += 8) {
            __m512 v[8];
            float out[8];
            for (int k = 0; k < 8; k++) {
                const size_t kr = (size_t)(first + j + k) * hs;
                __m512 acc = _mm512_setzero_ps();
                for (int d = 0; d < hs; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), kv16(kh, kr + d, bf16), acc);
                v[k] = acc;
            }
            reduce8(v, out);
            for (int k = 0; k < 8; k++) sc[j + k] = out[k] * scale;
        }
#endif
    for (; j < n; j++) sc[j] = dot_kv(qh, kh, (size_t)(first + j) * hs, hs, bf16) * scale;
    float mx = sink ? *sink : -INFINITY;
    for (j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    const float sum = exp_shifted(sc, n, mx) + (sink ? expf(*sink - mx) : 0.0f);  /* a sink: the denominator only */
#ifdef __AVX512F__
    if (wide && hs <= 128) {  /* y in registers, two sums (even and odd keys) so the FMAs do not wait on each other */
        const int nv = hs / 16;
        __m512 y0[8], y1[8];
        for (int d = 0; d < nv; d++) y0[d] = y1[d] = _mm512_setzero_ps();
        for (j = 0; j + 2 <= n; j += 2) {
            const __m512 p0 = _mm512_set1_ps(sc[j] / sum), p1 = _mm512_set1_ps(sc[j + 1] / sum);
            const size_t v0 = (size_t)(first + j) * hs, v1 = v0 + hs;
            for (int d = 0; d < nv; d++) {
                y0[d] = _mm512_fmadd_ps(p0, kv16(vh, v0 + 16 * d, bf16), y0[d]);
                y1[d] = _mm512_fmadd_ps(p1, kv16(vh, v1 + 16 * d, bf16), y1[d]);
            }
        }
        if (j < n) {
            const __m512 p0 = _mm512_set1_ps(sc[j] / sum);
            const size_t v0 = (size_t)(first + j) * hs;
            for (int d = 0; d < nv; d++) y0[d] = _mm512_fmadd_ps(p0, kv16(vh, v0 + 16 * d, bf16), y0[d]);
        }
        for (int d = 0; d < nv; d++) _mm512_storeu_ps(yh + 16 * d, _mm512_add_ps(y0[d], y1[d]));
        return;
    }
#endif
    memset(yh, 0, sizeof(float) * hs);
    for (j = 0; j < n; j++) {
        const float p = sc[j] / sum;
        const size_t vj = (size_t)(first + j) * hs;
        for (int i = 0; i < hs; i++) yh[i] += p * kv_at(vh, vj + i, bf16);
    }
}

static void attend(float *yh, const float *qh, const void *kh, const void *vh, int first, int pos, int hs, float scale,
                   const float *sink, float *att, int bf16) {
    if (bf16) attend_kv(yh, qh, kh, vh, first, pos, hs, scale, sink, att, 1);
    else attend_kv(yh, qh, kh, vh, first, pos, hs, scale, sink, att, 0);
}

/* A row's MLP output a added to its residual stream x (post-norm: t = x + a, then x = ln_2(t)); lw: the
   layer's weights. */
static void mlp_residual(const PicoCfg *c, const void *const *lw, float *x, float *t, const float *a) {
    const int C = c->n_embd;
    if (c->pre_norm) {
        for (int i = 0; i < C; i++) x[i] += a[i];
    } else {
        for (int i = 0; i < C; i++) t[i] = x[i] + a[i];
        norm(x, t, lw[L_LN2], lw[L_LN2_B], C, c->layernorm, c->eps);
    }
}

/* Feed tokens (B, T) (row-major int64): row b at positions pos[b] .. pos[b]+T-1 of KV-cache slot slot[b]
   (slot NULL: slot b). The caches k, v are (L, n_slots, n_kv_head, block, hs) float32; the logits of each
   row's last position go to logits + slot[b] * V. A prompt's positions go through the layers together,
   up to max_rows (row, position) pairs at a time (the scratch's capacity, pico_scratch_floats), so a
   prefill reads the weights once per chunk, not once per token; the head runs for the last positions
   only. Returns PICO_OK, or the PICO_* code of the first problem found (nothing is written then). */
int pico_forward(const PicoCfg *c, const void *const *w, const float *const *ws, void *kc, void *vc,
                 float *scratch, const int64_t *tokens, int B, int T, const int32_t *pos, const int32_t *slot,
                 int n_slots, float *logits, int max_rows) {
    const int C = c->n_embd, nh = c->n_head, nkv = c->n_kv_head, hs = c->head_size, H = c->hidden, L = c->n_layer;
    const int half = hs / 2, QKV = (nh + 2 * nkv) * hs, group = nh / nkv;
    if (T < 1 || B < 1) return PICO_NO_TOKENS;
    if (B > max_rows) return PICO_BAD_POSITION;
    for (int b = 0; b < B; b++) {
        const int s = slot ? slot[b] : b;
        if (pos[b] < 0 || pos[b] + T > c->block_size || s < 0 || s >= n_slots) return PICO_BAD_POSITION;
    }
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab) return PICO_BAD_TOKEN;
    if (check_weights(c, w, ws) != PICO_OK) return PICO_MISSING_WEIGHT;

    const int R = max_rows;  /* the scratch holds R rows: (row, position) pairs of a chunk */
    float *x = scratch;          /* (R, C) residual stream */
    float *xn = x + R * C;       /* (R, C) normed input of a sublayer */
    float *y = xn + R * C;       /* (R, C) attention output before the projection */
    float *a = y + R * C;        /* (R, C) sublayer output */
    float *t = a + R * C;        /* (R, C) post-norm sum */
    float *qkv = t + R * C;      /* (R, (nh + 2 nkv) hs) */
    float *h = qkv + (size_t)R * QKV;  /* (R, 2H) */
    float *act = h + (size_t)R * 2 * H;  /* (R, H) the MLP's hidden activations */
    float *head_in = act + (size_t)R * H;  /* (B, C) the last positions' final-normed rows */
    float *head_scratch = head_in + (size_t)R * C;  /* (B, V) the head's output when slots are not 0..B-1 */
    void *xb = head_scratch + (size_t)R * c->vocab;  /* (R, max(C, H) + 32) floats' room: matmul inputs (Mat) */
    const int tc_max = R / B;  /* positions per chunk */
    const float scale = 1.0f / sqrtf((float)hs);
    const size_t head_stride = (size_t)c->block_size * hs;
    const Mat wte = mat_at(c, w, ws, W_WTE, NULL);

    int contiguous = 1;  /* the rows' slots are 0..B-1: the head writes straight into logits */
    for (int b = 0; b < B && slot; b++) contiguous &= slot[b] == b;
    float *head_out = contiguous ? logits : head_scratch;  /* else to the slots after */

    /* One parallel region for the whole step: the matmuls split their rows, the attention its (row, head)
       pairs and the small parts (norms, residuals, RoPE, the cache writes) their rows across the threads
       (omp for); each ends in a barrier, far cheaper than the ~20 fork/joins of a region per matmul. */
#pragma omp parallel
    {
        float att[c->block_size];  /* this thread's attention scores */
        for (int t0 = 0; t0 < T; t0 += tc_max) {
            const int tc = T - t0 < tc_max ? T - t0 : tc_max, NR = B * tc;  /* row r: b = r / tc, t0 + r % tc */
#pragma omp for schedule(static)
            for (int r = 0; r < NR; r++) {
                const int b = r / tc, ti = t0 + r % tc;
                embed_row(x + (size_t)r * C, wte, tokens[(size_t)b * T + ti], C);
                if (c->pos_kind == 1) {
                    const float *p = (const float *)w[W_POS] + (size_t)(pos[b] + ti) * C;
                    for (int i = 0; i < C; i++) x[(size_t)r * C + i] += p[i];
                }
            }
            for (int l = 0; l < L; l++) {
                const int at = N_GLOBAL + N_PER_LAYER * l;
                const void *const *lw = w + at;
                const Mat qkv_m = mat_at(c, w, ws, at + L_QKV, xb);
                /* attention; its rows' loop first ends the previous layer (its MLP's residual) */
#pragma omp for schedule(static)
                for (int r = 0; r < NR; r++) {
                    if (l > 0) mlp_residual(c, w + at - N_PER_LAYER, x + (size_t)r * C, t + (size_t)r * C, a + (size_t)r * C);
                    if (c->pre_norm)
                        norm(xn + (size_t)r * C, x + (size_t)r * C, lw[L_LN1], lw[L_LN1_B], C, c->layernorm, c->eps);
                    else
                        memcpy(xn + (size_t)r * C, x + (size_t)r * C, sizeof(float) * C);
                    prep_row(qkv_m, xn + (size_t)r * C, r, NR, C);
                }
                matvec_tiles(qkv, qkv_m, lw[L_QKV_B], xn, NR, QKV, C);
                const int W = (c->window && !(c->window_alternate && (l % 2))) ? c->window : 0;
                const float *sinks = (const float *)lw[L_SINKS];
#pragma omp for schedule(static)
                for (int r = 0; r < NR; r++) {  /* every position's k and v into the cache, before any attends */
                    const int b = r / tc, p = pos[b] + t0 + r % tc, s = slot ? slot[b] : b;
                    float *q = qkv + (size_t)r * QKV, *k = q + nh * hs, *v = k + nkv * hs;
                    for (int hd = 0; hd < nh + nkv; hd++) {  /* q heads, then k heads: norm, rotate */
                        float *r = q + hd * hs;  /* k follows q, so k head j is q + (nh + j) hs */
                        if (lw[L_QNORM]) norm(r, r, hd < nh ? lw[L_QNORM] : lw[L_KNORM], NULL, hs, 0, c->eps);
                        if (c->pos_kind == 2)
                            rope(r, (const float *)w[W_COS] + (size_t)p * half, (const float *)w[W_SIN] + (size_t)p * half, half);
                    }
                    for (int kh = 0; kh < nkv; kh++) {
                        size_t base = (((size_t)l * n_slots + s) * nkv + kh) * head_stride;
                        kv_put(kc, base + (size_t)p * hs, k + kh * hs, hs, c->kv_bf16);
                        kv_put(vc, base + (size_t)p * hs, v + kh * hs, hs, c->kv_bf16);
                    }
                }
#pragma omp for schedule(static)
                for (int rh = 0; rh < NR * nh; rh++) {  /* every (row, head) pair on its own */
                    const int r = rh / nh, hd = rh % nh, b = r / tc, p = pos[b] + t0 + r % tc, s = slot ? slot[b] : b;
                    const int first = W && p - W + 1 > 0 ? p - W + 1 : 0;  /* the oldest key this query sees */
                    const size_t base = (((size_t)l * n_slots + s) * nkv + hd / group) * head_stride;
                    const size_t at_kv = base * (c->kv_bf16 ? sizeof(uint16_t) : sizeof(float));  /* bytes */
                    attend(y + (size_t)r * C + hd * hs, qkv + (size_t)r * QKV + hd * hs, (const char *)kc + at_kv,
                           (const char *)vc + at_kv, first, p, hs, scale, sinks ? sinks + hd : NULL, att, c->kv_bf16);
                }
                matvec(a, mat_at(c, w, ws, at + L_PROJ, xb), lw[L_PROJ_B], y, NR, C, C);
                const Mat fc = mat_at(c, w, ws, at + L_FC, xb), mproj = mat_at(c, w, ws, at + L_MPROJ, xb);
#pragma omp for schedule(static)
                for (int r = 0; r < NR; r++) {  /* the residual, and the MLP's input */
                    float *xr = x + (size_t)r * C, *tr = t + (size_t)r * C;
                    const float *ar = a + (size_t)r * C;
                    if (c->pre_norm) {
                        for (int i = 0; i < C; i++) xr[i] += ar[i];
                        norm(xn + (size_t)r * C, xr, lw[L_LN2], lw[L_LN2_B], C, c->layernorm, c->eps);
                    } else {
                        for (int i = 0; i < C; i++) tr[i] = xr[i] + ar[i];
                        norm(xr, tr, lw[L_LN1], lw[L_LN1_B], C, c->layernorm, c->eps);
                        memcpy(xn + (size_t)r * C, xr, sizeof(float) * C);
                    }
                    prep_row(fc, xn + (size_t)r * C, r, NR, C);
                }
                /* MLP: its hidden activations into act (B, H) */
                matvec_tiles(h, fc, lw[L_FC_B], xn, NR, c->swiglu ? 2 * H : H, C);
#pragma omp for schedule(static)
                for (int r = 0; r < NR; r++) {
                    float *ar = act + (size_t)r * H;
                    if (c->swiglu) {
                        silu_mul(ar, h + (size_t)r * 2 * H, h + (size_t)r * 2 * H + H, H);
                    } else {
                        const float *hr = h + (size_t)r * H;
                        if (c->relu2)
                            for (int i = 0; i < H; i++) ar[i] = hr[i] > 0.0f ? hr[i] * hr[i] : 0.0f;
                        else
                            for (int i = 0; i < H; i++) ar[i] = 0.5f * hr[i] * (1.0f + erff(hr[i] * 0.70710678118654752f));
                    }
                    prep_row(mproj, ar, r, NR, H);
                }
                matvec_tiles(a, mproj, lw[L_MPROJ_B], act, NR, C, H);
            }
            if (t0 + tc == T) {  /* the last chunk: each row's last position through the final norm and the head */
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++) {
                    const size_t r = (size_t)b * tc + tc - 1;  /* the last layer's MLP residual first (the other
                       layers' is in the next layer's first loop; a chunk's other positions need it no more) */
                    if (L > 0) mlp_residual(c, w + N_GLOBAL + N_PER_LAYER * (L - 1), x + r * C, t + r * C, a + r * C);
                    const float *last = x + r * C;
                    if (c->pre_norm)
                        norm(head_in + (size_t)b * C, last, w[W_LNF], w[W_LNF_B], C, c->layernorm, c->eps);
                    else
                        memcpy(head_in + (size_t)b * C, last, sizeof(float) * C);
                }
                matvec(head_out, mat_at(c, w, ws, W_HEAD, xb), NULL, head_in, B, c->vocab, C);
            }
        }
    }
    if (!contiguous)
        for (int b = 0; b < B; b++)
            memcpy(logits + (size_t)slot[b] * c->vocab, head_out + (size_t)b * c->vocab, sizeof(float) * c->vocab);
    if (c->softcap > 0.0f)
        for (int b = 0; b < B; b++) {
            float *r = logits + (size_t)(slot ? slot[b] : b) * c->vocab;
            for (int i = 0; i < c->vocab; i++) r[i] = c->softcap * tanhf(r[i] / c->softcap);
        }
    return PICO_OK;
}

/* ---- sampling ---- */

static float max_of(const float *x, int V) {
    int i = 0;
    float mx = -INFINITY;
#ifdef __AVX512F__
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= V; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    mx = _mm512_reduce_max_ps(m);
#endif
    for (; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

/* exp(x) for 16 lanes: 2^n * e^r with n = round(x log2 e) and |r| <= ln2 / 2, e^r by its degree-6 Taylor
   polynomial (within 2 ulp of expf); x below -104 (where expf underflows) gives 0, -inf included. */
#ifdef __AVX512F__
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  /* ln 2 in two parts, Cody-Waite */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* x[i] = exp(x[i] - mx) for i < V; returns their sum. */
static float exp_shifted(float *x, int V, float mx) {
    int i = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    for (; i + 16 <= V; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < V; i++) sum += (x[i] = expf(x[i] - mx));
    return sum;
}

/* A float's bits as an unsigned key in the same order (negatives below positives). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u >> 31 ? ~u : u | 0x80000000u;
}

/* The k-th largest of x (V values, 1 <= k <= V): a radix select on order_key, a byte at a time from the
   top, each pass counting the values that share the prefix chosen so far. */
static float kth_largest(const float *x, int V, int k) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int count[256] = {0};
        for (int i = 0; i < V; i++) {
            const uint32_t key = order_key(x[i]);
            if ((key & mask) == prefix) count[(key >> shift) & 255]++;
        }
        int d = 255;
        for (; d > 0 && count[d] < k; d--) k -= count[d];
        prefix |= (uint32_t)d << shift;
        mask |= 255u << shift;
    }
    const uint32_t u = prefix >> 31 ? prefix & 0x7fffffffu : ~prefix;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef struct { float p; int32_t id; } Cand;

/* Sorts n candidates by probability, descending (ties by id, ascending: the input order): an LSD radix sort
   on the probability's bits, 8 at a time, skipping the bytes every candidate shares. tmp: n more. */
static void sort_desc(Cand *c, Cand *tmp, int n) {
    for (int shift = 0; shift < 32; shift += 8) {
        int count[257] = {0};
        uint32_t bits;
        for (int i = 0; i < n; i++) {
            memcpy(&bits, &c[i].p, sizeof bits);
            count[255 - ((bits >> shift) & 255) + 1]++;  /* 255 - digit: larger first */
        }
        int same = 0;
        for (int d = 1; d <= 256; d++) same |= count[d] == n;
        if (same) continue;
        for (int d = 1; d <= 256; d++) count[d] += count[d - 1];
        for (int i = 0; i < n; i++) {
            memcpy(&bits, &c[i].p, sizeof bits);
            tmp[count[255 - ((bits >> shift) & 255)]++] = c[i];
        }
        memcpy(c, tmp, sizeof(Cand) * (size_t)n);
    }
}

/* The first index of the largest value (torch.argmax's choice among ties); NaN is not expected. */
static int64_t argmax(const float *x, int V) {
    float mx = max_of(x, V);
    for (int i = 0; i < V; i++)
        if (x[i] == mx) return i;
    return 0;
}

/* Probabilities in (0, 1] fall in NKEY buckets by their top 12 bits (the exponent and 3 bits of mantissa):
   a bucket holds values within 12.5% of each other, and every value of a higher bucket is larger. */
enum { NKEY = 1024 };
static inline int pkey(float p) {
    uint32_t u;
    memcpy(&u, &p, sizeof u);
    return (int)(u >> 20);
}

/* The (p, id) of bucket k's members, sorted by p descending (ties by id); their count. */
static int bucket_sorted(Cand *cand, Cand *tmp, const float *x, int V, int k) {
    int n = 0, i = 0;
#ifdef __AVX512F__
    const __m512i want = _mm512_set1_epi32(k);
    __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= V; i += 16, ids = _mm512_add_epi32(ids, _mm512_set1_epi32(16))) {
        const __m512i bits = _mm512_loadu_si512(x + i);
        const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(bits, 20), want);
        if (!m) continue;
        float ps[16];
        int32_t is[16];
        _mm512_mask_compressstoreu_ps(ps, m, _mm512_castsi512_ps(bits));
        _mm512_mask_compressstoreu_epi32(is, m, ids);
        const int c = __builtin_popcount(m);
        for (int j = 0; j < c; j++) cand[n + j] = (Cand){ps[j], is[j]};
        n += c;
    }
#endif
    for (; i < V; i++)
        if (pkey(x[i]) == k) cand[n++] = (Cand){x[i], i};
    sort_desc(cand, tmp, n);
    return n;
}

/* Top-p's draw from probabilities x (V values): the ids sorted by probability descending, the nucleus the
   smallest prefix whose float32 cumulative sum reaches top_p (kept: #{j : cum_j - p_j < top_p}), the draw
   the first kept id whose cumulative sum exceeds u times the kept mass, as sample_next. The cumulative
   sums are double sums cast to float32, as torch's cumsum on a CPU. Only the buckets (pkey) where the
   nucleus ends and where the draw lands are gathered and sorted: a whole bucket's mass is added at once
   (a double sum in another order differs in bits far below float32's). */
static int64_t draw_top_p(const float *x, int V, float top_p, float u, Cand *cand, Cand *tmp) {
    double bmass[NKEY];
    int bcnt[NKEY];
    memset(bmass, 0, sizeof bmass);
    memset(bcnt, 0, sizeof bcnt);
    for (int i = 0; i < V; i++)
        if (x[i] > 0.0f) {
            const int k = pkey(x[i]);
            bmass[k] += x[i];
            bcnt[k]++;
        }
    /* the nucleus: whole buckets while the mass before them stays below top_p, then token by token */
    double above = 0.0;
    int k = NKEY - 1;
    for (; k > 0; k--) {
        if (!bcnt[k]) continue;
        if ((float)(above + bmass[k]) + 1e-6f >= top_p) break;  /* it may end in this bucket */
        above += bmass[k];
    }
    int end_k = -1, end_j = -1;  /* the last kept token: member end_j of bucket end_k */
    float kept_mass = 0.0f;
    double acc = above;
    for (int done = 0; k >= 0 && !done; k--) {
        if (!bcnt[k]) continue;
        const int n = bucket_sorted(cand, tmp, x, V, k);
        for (int j = 0; j < n; j++) {
            const float cum = (float)(acc + cand[j].p);
            if (!(cum - cand[j].p < top_p)) {
                done = 1;
                break;
            }
            acc += cand[j].p;
            kept_mass = cum;
            end_k = k;
            end_j = j;
        }
    }
    if (end_k < 0) {  /* nothing kept (top_p below float resolution): the most probable id */
        for (k = NKEY - 1; k > 0 && !bcnt[k]; k--) {}
        bucket_sorted(cand, tmp, x, V, k);
        return cand[0].id;
    }
    /* the draw: skip whole buckets whose end stays at or below the target */
    const float target = u * kept_mass;
    acc = 0.0;
    for (k = NKEY - 1; k >= end_k; k--) {
        if (!bcnt[k]) continue;
        if (k > end_k && !((float)(acc + bmass[k]) > target)) {
            acc += bmass[k];
            continue;
        }
        const int n = bucket_sorted(cand, tmp, x, V, k);
        for (int j = 0; j < n; j++) {
            acc += cand[j].p;
            if ((float)acc > target || (k == end_k && j == end_j)) return cand[j].id;
        }
    }
    bucket_sorted(cand, tmp, x, V, end_k);  /* past the kept mass by rounding: the last kept id */
    return cand[end_j].id;
}

/* One draw from row `logits` (V values) as sample_next draws it, from the uniform number u in [0, 1).
   work: 5 V floats. The probabilities are softmax(logits / temperature) over the top-k; top-p keeps the
   smallest set of most probable ids whose mass reaches top_p (the crossing id kept); the draw locates
   u * (kept mass) in the cumulative sums (accumulated in double and compared as float32, as torch's cumsum
   on a CPU). Only the ids that can be in the nucleus are sorted: those in the float exponents, from the
   top, that hold top_p of the mass (the crossing id is at least as probable as the smallest of them). */
int64_t pico_sample(const float *logits, int V, const PicoSampling *smp, float u, float *work) {
    if (smp->greedy || smp->temperature == 0.0f) return argmax(logits, V);
    float *x = work;
    Cand *cand = (Cand *)(work + V), *tmp = cand + V;
    if (smp->temperature != 1.0f)
        for (int i = 0; i < V; i++) x[i] = logits[i] / smp->temperature;
    else
        memcpy(x, logits, sizeof(float) * (size_t)V);
    if (smp->top_k > 0 && smp->top_k < V) {
        const float kth = kth_largest(x, V, smp->top_k);
        for (int i = 0; i < V; i++)
            if (x[i] < kth) x[i] = -INFINITY;
    }
    const float inv = 1.0f / exp_shifted(x, V, max_of(x, V));
    for (int i = 0; i < V; i++) x[i] *= inv;
    if (!(smp->top_p < 1.0f)) {  /* plain: cumulative sums in id order */
        double acc = 0.0;
        for (int i = 0; i < V; i++) acc += x[i];
        const float target = u * (float)acc;
        acc = 0.0;
        for (int i = 0; i < V; i++)
            if ((float)(acc += x[i]) > target) return i;
        return V - 1;
    }
    return draw_top_p(x, V, smp->top_p, u, cand, tmp);
}

/* Rows of logits (B, V) -> ids, one draw each (u: B uniform numbers); smp: one per row. */
void pico_sample_rows(const float *logits, int B, int V, const PicoSampling *smp, const float *u, int64_t *out,
                      float *work) {
    for (int b = 0; b < B; b++) out[b] = pico_sample(logits + (size_t)b * V, V, smp + b, u ? u[b] : 0.0f, work);
}

/* ---- the loop ---- */

/* Up to n decode positions for B rows. At each, every live row samples a token from its logits (those of
   its KV-cache slot slot[b]) with its own settings smp[b] and uniform number u[s * B + b] (u may be NULL
   when every row is greedy), then the live rows' tokens are fed back in one batched step.
   A row is live until it draws its stop id stop[b] (-1: none) or has produced left[b] tokens (left counts
   down); a finished row is not fed and writes stop[b] to out. Its tokens are appended to its history,
   hist + b * hist_cap (n_hist[b] held, the prompt's last tokens first); when its KV cache is full
   (pos[b] == block_size) the row is rebuilt from its last block_size / 2 tokens, as picollm/sampling.py
   slides its window. keep_logits (n, B, V), if given, receives the logits each token was drawn from.
   Returns the positions written to out (n, B): fewer than n once no row is live; or -PICO_*.
   work: 5 V floats; scratch: the forward's, for max_rows >= B rows. */
int pico_generate(const PicoCfg *c, const void *const *w, const float *const *ws, void *kc, void *vc,
                  float *scratch, int n_slots, int B, const int32_t *slot, int32_t *pos, int64_t *hist,
                  int32_t *n_hist, int hist_cap, const PicoSampling *smp, const float *u, int n,
                  const int64_t *stop, int32_t *left, uint8_t *done, float *logits, float *keep_logits,
                  int64_t *out, float *work, int max_rows) {
    const int V = c->vocab, keep = c->block_size / 2 > 1 ? c->block_size / 2 : 1;
    for (int b = 0; b < B; b++) {
        if (slot[b] < 0 || slot[b] >= n_slots || (!done[b] && (pos[b] < 1 || pos[b] > c->block_size)))
            return -PICO_BAD_POSITION;
        if (!done[b] && (n_hist[b] < pos[b] || n_hist[b] + (n < left[b] ? n : left[b]) > hist_cap)) return -PICO_BAD_HISTORY;
    }
    int64_t *feed = malloc(sizeof(int64_t) * (size_t)B);
    int32_t *fslot = malloc(sizeof(int32_t) * (size_t)B), *fpos = malloc(sizeof(int32_t) * (size_t)B);
    int32_t *frow = malloc(sizeof(int32_t) * (size_t)B);
    int threads = 1;  /* the other threads' sampling work areas, made once a call ("work" is the first's) */
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    float *more = B > 1 && threads > 1 ? malloc(sizeof(float) * 5 * (size_t)V * (threads - 1)) : NULL;
    int produced = 0, rc = PICO_OK;
    for (int s = 0; s < n && rc == PICO_OK; s++) {
        int64_t *row_out = out + (size_t)s * B;
        /* the rows' draws, split across the threads (each with its own work area; work is the first's) */
#pragma omp parallel if (B > 1)
        {
            float *mine = work;
#ifdef _OPENMP
            if (omp_get_thread_num() > 0) mine = more + (size_t)(omp_get_thread_num() - 1) * 5 * V;
#endif
#pragma omp for schedule(dynamic)
            for (int b = 0; b < B; b++)
                row_out[b] = done[b] ? stop[b] : pico_sample(logits + (size_t)slot[b] * V, V, smp + b,
                                                             u ? u[(size_t)s * B + b] : 0.0f, mine);
        }
        int live = 0;
        for (int b = 0; b < B; b++) {
            if (!done[b]) {
                if (keep_logits) memcpy(keep_logits + ((size_t)s * B + b) * V, logits + (size_t)slot[b] * V, sizeof(float) * V);
                if (row_out[b] == stop[b] || --left[b] <= 0) done[b] = 1;
            }
            live += !done[b];
        }
        produced = s + 1;
        if (live == 0) break;
        int nf = 0;
        for (int b = 0; b < B && rc == PICO_OK; b++) {
            if (done[b]) continue;
            const int64_t tok = out[(size_t)s * B + b];
            hist[(size_t)b * hist_cap + n_hist[b]++] = tok;
            if (pos[b] + 1 > c->block_size) {  /* slide: rebuild the row from its last `keep` tokens */
                const int32_t zero = 0;
                rc = pico_forward(c, w, ws, kc, vc, scratch, hist + (size_t)b * hist_cap + n_hist[b] - keep, 1, keep,
                                  &zero, slot + b, n_slots, logits, max_rows);
                if (rc == PICO_OK) pos[b] = keep;
            } else {
                feed[nf] = tok;
                fslot[nf] = slot[b];
                fpos[nf] = pos[b];
                frow[nf++] = b;
            }
        }
        if (rc == PICO_OK && nf)
            rc = pico_forward(c, w, ws, kc, vc, scratch, feed, nf, 1, fpos, fslot, n_slots, logits, max_rows);
        if (rc == PICO_OK)
            for (int f = 0; f < nf; f++) pos[frow[f]] = fpos[f] + 1;
    }
    free(feed);
    free(fslot);
    free(fpos);
    free(frow);
    free(more);
    return rc == PICO_OK ? produced : -rc;
}

/* Frees the calling thread's OpenMP workers (they start again at its next parallel region). libgomp
   throttles every team's spinning once it manages more threads than there are CPUs, so when a second
   thread (the server's engine) runs the decode while the main thread's team from loading the model lies
   idle, each of the step's parallel regions waits on a futex wake-up: 5-7x slower steps, measured here. */
void pico_release_threads(void) {
#ifdef _OPENMP
    omp_pause_resource_all(omp_pause_soft);
#endif
}
