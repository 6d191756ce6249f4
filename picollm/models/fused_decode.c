/* The Transformer's decode step as one C function: every layer, for every new token, in one call.

   PyTorch runs a batch-1 decode step as ~80 small ops, each dispatched from Python; on a CPU that
   overhead costs more than the arithmetic. This file does the same math in one pass (the approach of
   llama2.c's run.c), reading the model's own weight tensors in place. picollm/models/fused.py compiles
   it with the system C compiler at first use, loads it with ctypes and falls back to PyTorch when it
   cannot. Plain C with OpenMP pragmas (ignored where the compiler lacks -fopenmp): no Python or torch
   headers, so it compiles in about a second.

   Weights: the matmul weights (embedding, q/k/v, projections, MLP, head) are float32 or bfloat16, as the
   model holds them; norms, biases and position tables come as float32. Activations, the KV cache and all
   accumulation are float32. The math follows models/transformer.py line by line: pre- or post-norm,
   RMSNorm or LayerNorm, RoPE ("rotate half" pairs i, i + hs/2), learned or sinusoidal positions, GELU
   (erf), SwiGLU or ReLU^2 MLP, optional biases; grouped-query attention (n_kv_head kv heads, each serving
   n_head / n_kv_head consecutive query heads), sliding windows (every layer, or the even ones),
   QK-norm (RMSNorm over each q and k head before RoPE), attention sinks and logit soft-capping.
   A mixture of experts is not served here (fused.py says so and PyTorch decodes it). */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef struct {
    int32_t n_layer, n_head, n_embd, head_size, hidden, vocab, block_size;
    int32_t layernorm;  /* 0: RMSNorm, 1: LayerNorm */
    int32_t pre_norm;   /* 1: pre-norm (with a final norm), 0: post-norm */
    int32_t swiglu;     /* 1: SwiGLU (fc holds gate then up, 2*hidden rows), 0: GELU or ReLU^2 */
    int32_t pos_kind;   /* 0: none, 1: learned or sinusoidal table added to the embedding, 2: RoPE */
    int32_t bf16;       /* matmul weights are bfloat16 (else float32) */
    float eps;
    int32_t n_kv_head;  /* key/value heads (n_head: multi-head attention) */
    int32_t window;     /* 0: full attention; W: a query sees its last W keys */
    int32_t window_alternate;  /* 1: only even layers slide */
    int32_t relu2;      /* 1: ReLU^2 MLP (with swiglu 0) */
    float softcap;      /* 0: off; else logits = softcap * tanh(logits / softcap) */
} PicoCfg;

/* Weight pointers, in this order (NULL where the model has none):
   global  0 wte (V, C)  1 position table (block, C)  2 rope cos (block, hs/2)  3 rope sin
           4 final norm weight  5 final norm bias  6 head (V, C)
   layer l, at 7 + 15 l:  0 ln_1.w  1 ln_1.b  2 qkv.w ((nh + 2 nkv) hs, C)  3 qkv.b  4 proj.w (C, C)  5 proj.b
           6 ln_2.w  7 ln_2.b  8 fc.w (H or 2H, C)  9 fc.b  10 mlp proj.w (C, H)  11 mlp proj.b
           12 q_norm.w (hs)  13 k_norm.w (hs)  14 sinks (nh) */
enum { W_WTE, W_POS, W_COS, W_SIN, W_LNF, W_LNF_B, W_HEAD, N_GLOBAL };
enum { L_LN1, L_LN1_B, L_QKV, L_QKV_B, L_PROJ, L_PROJ_B, L_LN2, L_LN2_B, L_FC, L_FC_B, L_MPROJ, L_MPROJ_B,
       L_QNORM, L_KNORM, L_SINKS, N_PER_LAYER };

/* pico_forward's return codes, one per cause; fused.py names each (keep the two lists in step). */
enum {
    PICO_OK = 0,
    PICO_BAD_TOKEN = 1,      /* a token id outside [0, vocab) */
    PICO_BAD_POSITION = 2,   /* pos0 < 0, or pos0 + T past block_size (the KV cache's length) */
    PICO_NO_TOKENS = 3,      /* T < 1 or B < 1: nothing to feed */
    PICO_MISSING_WEIGHT = 4  /* a weight pointer the configuration reads is NULL */
};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float dot_f32(const float *w, const float *x, int n) {
    int i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    int i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i)));
        __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i + 16)));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)), _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; i < n; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

/* out[b, j] = W[j, :] . x[b, :] (+ bias[j]) for b < B, j < n_out; W is (n_out, n_in), row-major.
   Rows are split across the OpenMP threads (torch's own libgomp, already loaded, so one thread pool).
   With several rows of x a bf16 weight row is widened to float32 once, not once per row of x. */
static void matvec(float *out, const void *W, int bf16, const float *bias, const float *x, int B, int n_out, int n_in) {
    const int widen = bf16 && B > 1 && n_in <= 16384;  /* a float32 row on each thread's stack */
#pragma omp parallel
    {
        float wrow[widen ? n_in : 1];
#pragma omp for schedule(static)
        for (int j = 0; j < n_out; j++) {
            const float *wf = (const float *)W + (size_t)j * n_in;
            const uint16_t *wh = (const uint16_t *)W + (size_t)j * n_in;
            if (widen) {
                for (int i = 0; i < n_in; i++) wrow[i] = bf16_to_f32(wh[i]);
                wf = wrow;
            }
            for (int b = 0; b < B; b++) {
                const float *xb = x + (size_t)b * n_in;
                float s = bf16 && !widen ? dot_bf16(wh, xb, n_in) : dot_f32(wf, xb, n_in);
                out[(size_t)b * n_out + j] = bias ? s + bias[j] : s;
            }
        }
    }
}

static void embed_row(float *dst, const void *wte, int bf16, int64_t tok, int C) {
    if (bf16) {
        const uint16_t *r = (const uint16_t *)wte + (size_t)tok * C;
        for (int i = 0; i < C; i++) dst[i] = bf16_to_f32(r[i]);
    } else {
        memcpy(dst, (const float *)wte + (size_t)tok * C, sizeof(float) * (size_t)C);
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

/* Scratch floats needed for batch B: see the carve-up at the top of pico_forward. */
int64_t pico_scratch_floats(const PicoCfg *c, int B) {
    int64_t C = c->n_embd, H = c->hidden, QKV = (int64_t)(c->n_head + 2 * c->n_kv_head) * c->head_size;
    return (int64_t)B * (5 * C + QKV + 2 * H) + c->block_size;
}

/* PICO_OK when every weight the configuration reads is there, else PICO_MISSING_WEIGHT. */
static int check_weights(const PicoCfg *c, const void *const *w) {
    if (!w[W_WTE] || !w[W_HEAD] || (c->pos_kind == 1 && !w[W_POS]) ||
        (c->pos_kind == 2 && (!w[W_COS] || !w[W_SIN])) || (c->pre_norm && !w[W_LNF]))
        return PICO_MISSING_WEIGHT;
    for (int l = 0; l < c->n_layer; l++) {
        const void *const *lw = w + N_GLOBAL + N_PER_LAYER * l;
        if (!lw[L_LN1] || !lw[L_QKV] || !lw[L_PROJ] || !lw[L_LN2] || !lw[L_FC] || !lw[L_MPROJ])
            return PICO_MISSING_WEIGHT;
    }
    return PICO_OK;
}

/* Feed tokens (B, T) (row-major int64) at positions pos0 .. pos0+T-1 into the KV caches k, v (each
   (L, B, n_kv_head, block, hs) float32) and write the logits of the last position to logits (B, V).
   Returns PICO_OK, or the PICO_* code of the first problem found (nothing is written then). */
int pico_forward(const PicoCfg *c, const void *const *w, float *kc, float *vc, float *scratch,
                 const int64_t *tokens, int B, int T, int pos0, float *logits) {
    const int C = c->n_embd, nh = c->n_head, nkv = c->n_kv_head, hs = c->head_size, H = c->hidden, L = c->n_layer;
    const int bf = c->bf16, half = hs / 2, QKV = (nh + 2 * nkv) * hs, group = nh / nkv;
    if (T < 1 || B < 1) return PICO_NO_TOKENS;
    if (pos0 < 0 || pos0 + T > c->block_size) return PICO_BAD_POSITION;
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab) return PICO_BAD_TOKEN;
    if (check_weights(c, w) != PICO_OK) return PICO_MISSING_WEIGHT;

    float *x = scratch;          /* (B, C) residual stream */
    float *xn = x + B * C;       /* (B, C) normed input of a sublayer */
    float *y = xn + B * C;       /* (B, C) attention output before the projection */
    float *a = y + B * C;        /* (B, C) sublayer output */
    float *t = a + B * C;        /* (B, C) post-norm sum */
    float *qkv = t + B * C;      /* (B, (nh + 2 nkv) hs) */
    float *h = qkv + (size_t)B * QKV;  /* (B, 2H) */
    float *att = h + 2 * B * H;  /* (block) attention scores of one head */
    const float scale = 1.0f / sqrtf((float)hs);
    const size_t head_stride = (size_t)c->block_size * hs;

    for (int ti = 0; ti < T; ti++) {
        const int pos = pos0 + ti;
        for (int b = 0; b < B; b++) {
            embed_row(x + b * C, w[W_WTE], bf, tokens[(size_t)b * T + ti], C);
            if (c->pos_kind == 1) {
                const float *p = (const float *)w[W_POS] + (size_t)pos * C;
                for (int i = 0; i < C; i++) x[b * C + i] += p[i];
            }
        }
        for (int l = 0; l < L; l++) {
            const void *const *lw = w + N_GLOBAL + N_PER_LAYER * l;
            /* attention */
            for (int b = 0; b < B; b++) {
                if (c->pre_norm)
                    norm(xn + b * C, x + b * C, lw[L_LN1], lw[L_LN1_B], C, c->layernorm, c->eps);
                else
                    memcpy(xn + b * C, x + b * C, sizeof(float) * C);
            }
            matvec(qkv, lw[L_QKV], bf, lw[L_QKV_B], xn, B, QKV, C);
            const int W = (c->window && !(c->window_alternate && (l % 2))) ? c->window : 0;
            const int first = W && pos - W + 1 > 0 ? pos - W + 1 : 0;  /* the oldest key this query sees */
            const float *sinks = (const float *)lw[L_SINKS];
            for (int b = 0; b < B; b++) {
                float *q = qkv + (size_t)b * QKV, *k = q + nh * hs, *v = k + nkv * hs;
                for (int hd = 0; hd < nh + nkv; hd++) {  /* q heads, then k heads: norm, rotate */
                    float *r = q + hd * hs;  /* k follows q, so k head j is q + (nh + j) hs */
                    if (lw[L_QNORM]) norm(r, r, hd < nh ? lw[L_QNORM] : lw[L_KNORM], NULL, hs, 0, c->eps);
                    if (c->pos_kind == 2)
                        rope(r, (const float *)w[W_COS] + (size_t)pos * half,
                             (const float *)w[W_SIN] + (size_t)pos * half, half);
                }
                for (int kh = 0; kh < nkv; kh++) {
                    size_t base = (((size_t)l * B + b) * nkv + kh) * head_stride;
                    memcpy(kc + base + (size_t)pos * hs, k + kh * hs, sizeof(float) * hs);
                    memcpy(vc + base + (size_t)pos * hs, v + kh * hs, sizeof(float) * hs);
                }
                for (int hd = 0; hd < nh; hd++) {
                    size_t base = (((size_t)l * B + b) * nkv + hd / group) * head_stride;
                    const float *kh = kc + base, *vh = vc + base, *qh = q + hd * hs;
                    float mx = sinks ? sinks[hd] : -INFINITY;
                    for (int j = first; j <= pos; j++) {
                        att[j] = dot_f32(qh, kh + (size_t)j * hs, hs) * scale;
                        if (att[j] > mx) mx = att[j];
                    }
                    float sum = sinks ? expf(sinks[hd] - mx) : 0.0f;  /* a sink joins the denominator only */
                    for (int j = first; j <= pos; j++) {
                        att[j] = expf(att[j] - mx);
                        sum += att[j];
                    }
                    float *yh = y + (size_t)b * C + hd * hs;
                    memset(yh, 0, sizeof(float) * hs);
                    for (int j = first; j <= pos; j++) {
                        const float p = att[j] / sum, *vj = vh + (size_t)j * hs;
                        for (int i = 0; i < hs; i++) yh[i] += p * vj[i];
                    }
                }
            }
            matvec(a, lw[L_PROJ], bf, lw[L_PROJ_B], y, B, C, C);
            if (c->pre_norm) {
                for (int i = 0; i < B * C; i++) x[i] += a[i];
                for (int b = 0; b < B; b++)
                    norm(xn + b * C, x + b * C, lw[L_LN2], lw[L_LN2_B], C, c->layernorm, c->eps);
            } else {
                for (int i = 0; i < B * C; i++) t[i] = x[i] + a[i];
                for (int b = 0; b < B; b++)
                    norm(x + b * C, t + b * C, lw[L_LN1], lw[L_LN1_B], C, c->layernorm, c->eps);
                memcpy(xn, x, sizeof(float) * B * C);
            }
            /* MLP */
            if (c->swiglu) {
                matvec(h, lw[L_FC], bf, lw[L_FC_B], xn, B, 2 * H, C);
                for (int b = 0; b < B; b++) {
                    float *hb = h + (size_t)b * 2 * H, *dst = h + (size_t)b * H;
                    for (int i = 0; i < H; i++) {
                        float g = hb[i], u = hb[H + i];
                        /* (B, H) rows packed to the front: row b's dst ends before row b+1's source
                           starts, and within a row i < H + i, so nothing unread is overwritten */
                        dst[i] = g / (1.0f + expf(-g)) * u;
                    }
                }
            } else if (c->relu2) {
                matvec(h, lw[L_FC], bf, lw[L_FC_B], xn, B, H, C);
                for (int i = 0; i < B * H; i++) h[i] = h[i] > 0.0f ? h[i] * h[i] : 0.0f;
            } else {
                matvec(h, lw[L_FC], bf, lw[L_FC_B], xn, B, H, C);
                for (int i = 0; i < B * H; i++) h[i] = 0.5f * h[i] * (1.0f + erff(h[i] * 0.70710678118654752f));
            }
            matvec(a, lw[L_MPROJ], bf, lw[L_MPROJ_B], h, B, C, H);
            if (c->pre_norm) {
                for (int i = 0; i < B * C; i++) x[i] += a[i];
            } else {
                for (int i = 0; i < B * C; i++) t[i] = x[i] + a[i];
                for (int b = 0; b < B; b++)
                    norm(x + b * C, t + b * C, lw[L_LN2], lw[L_LN2_B], C, c->layernorm, c->eps);
            }
        }
    }
    for (int b = 0; b < B; b++) {
        if (c->pre_norm)
            norm(xn + b * C, x + b * C, w[W_LNF], w[W_LNF_B], C, c->layernorm, c->eps);
        else
            memcpy(xn + b * C, x + b * C, sizeof(float) * C);
    }
    matvec(logits, w[W_HEAD], bf, NULL, xn, B, c->vocab, C);
    if (c->softcap > 0.0f)
        for (int64_t i = 0; i < (int64_t)B * c->vocab; i++) logits[i] = c->softcap * tanhf(logits[i] / c->softcap);
    return PICO_OK;
}
