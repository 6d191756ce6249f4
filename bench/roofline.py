"""This machine's ceilings for the CPU decode step, and what they allow "8 streams against 1" to reach.

    python bench/roofline.py [--model t4|gpt2-small]

A small C program (written to a temporary directory, compiled as picollm/models/fused.py compiles
fused_decode.c, and #including it) measures:
  - the rate of one 512-bit vdpbf16ps, vpdpbusd and float32 FMA per thread (12 independent sums);
  - read bandwidth with every thread, from a buffer that fits the L3 cache (10 MB) and one that does not
    (200 MB);
  - fused_decode.c's packed bf16 and int8 matmuls (matvec) at batch 8 on a 3072 x 768 matrix (in cache), as
    a share of the instruction rates above.

From these it works out, for the model's matmuls, the least time of a batch-1 step (its weights read once,
from L3 where they fit, else from memory) and of a batch-8 step (8 rows' multiply-adds at the kernel's
measured rate), and their ratio x 8: the most that 8 concurrent streams can give over one, before
attention, sampling or any overhead on either side.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picollm.models.fused import _FLAGS, _SOURCE  # noqa: E402
from picollm.models.transformer import swiglu_hidden  # noqa: E402

PROGRAM = r"""
#include "%(source)s"
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define N_INSTR 200000000L
static char sink[12 * 64];  /* every sum is stored: the compiler keeps all 12 chains */
#define RATE(name, T, start, op)                                                                       \
    static double name(void) {                                                                        \
        double best = 1e9;                                                                            \
        for (int r = 0; r < 3; r++) {                                                                 \
            T a[12]; for (int i = 0; i < 12; i++) a[i] = start;                                       \
            __m512i x = _mm512_set1_epi32(0x3f803f80), y = _mm512_set1_epi32(0x01010101);             \
            double t0 = now();                                                                        \
            for (long i = 0; i < N_INSTR / 12; i++) {                                                 \
                for (int j = 0; j < 12; j++) a[j] = op;                                               \
                __asm__ volatile("" : "+v"(x));                                                       \
            }                                                                                         \
            double t = now() - t0; if (t < best) best = t;                                            \
            for (int j = 0; j < 12; j++) _mm512_storeu_si512((void *)(sink + 64 * j), (__m512i)a[j]);    \
        }                                                                                             \
        return N_INSTR / best;                                                                        \
    }
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
RATE(rate_bf16, __m512, _mm512_set1_ps((float)i), _mm512_dpbf16_ps(a[j], (__m512bh)x, (__m512bh)y))
RATE(rate_vnni, __m512i, _mm512_set1_epi32(i), _mm512_dpbusd_epi32(a[j], x, y))
RATE(rate_fma, __m512, _mm512_set1_ps((float)i), _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(y), a[j]))
#endif

static double bandwidth(size_t bytes) {
    size_t n = bytes / 4;
    float *a = malloc(n * 4);
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    double best = 1e9;
    for (int r = 0; r < 30; r++) {
        double t0 = now(), s = 0;
#pragma omp parallel reduction(+ : s)
        {
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#pragma omp for schedule(static)
            for (size_t i = 0; i < n; i += 32) {
                acc0 = _mm512_add_ps(acc0, _mm512_loadu_ps(a + i));
                acc1 = _mm512_add_ps(acc1, _mm512_loadu_ps(a + i + 16));
            }
            s += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
        double t = now() - t0; if (t < best) best = t;
        if (s < 0) printf("%%f", s);
    }
    free(a);
    return bytes / best;
}

/* microseconds of one matvec of B rows over an n_out x n_in matrix packed as `type`, every thread. */
static double kernel_us(int type, int n_out, int n_in, int B) {
    size_t nw = (size_t)n_out * n_in;
    float *x = malloc(sizeof(float) * B * n_in), *out = malloc(sizeof(float) * B * n_out);
    for (int i = 0; i < B * n_in; i++) x[i] = (float)((i * 13) %% 17 - 8) / 8;
    void *xb = malloc(4 * (size_t)B * (n_in + 64)), *P;
    float *PS = NULL;
    if (type == WT_BF16) {
        uint16_t *W = malloc(2 * nw);
        for (size_t i = 0; i < nw; i++) W[i] = 0x3f80 + (i %% 7);
        P = malloc(2 * (size_t)((n_out + 31) / 32) * 32 * ((n_in + 1) / 2) * 2);
        pico_pack_bf16(W, n_out, n_in, P);
        free(W);
    } else {
        int G = (n_in + 31) / 32, tiles = (n_out + 15) / 16;
        int8_t *Q = malloc(nw); float *S = malloc(sizeof(float) * n_out * G);
        for (size_t i = 0; i < nw; i++) Q[i] = (int8_t)((i * 7) %% 255 - 127);
        for (size_t i = 0; i < (size_t)n_out * G; i++) S[i] = 0.01f;
        P = malloc((size_t)tiles * G * 512); PS = malloc(sizeof(float) * tiles * G * 16);
        pico_pack_int8(Q, S, n_out, n_in, P, PS);
        free(Q); free(S);
    }
    Mat m = {P, PS, type, xb};
    double best = 1e9;
    for (int r = 0; r < 20; r++) {
        double t0 = now();
#pragma omp parallel
        for (int k = 0; k < 20; k++) matvec(out, m, NULL, x, B, n_out, n_in);
        double t = (now() - t0) / 20; if (t < best) best = t;
    }
    free(x); free(out); free(xb); free(P); free(PS);
    return best * 1e6;
}

int main(void) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
    printf("sink %%d\n", sink[0] + sink[64 * 11]);
    printf("threads %%d\nbf16 %%.4g\nvnni %%.4g\nfma %%.4g\n", threads, rate_bf16(), rate_vnni(), rate_fma());
    printf("l3 %%.4g\ndram %%.4g\n", bandwidth(10u << 20), bandwidth(200u << 20));
    printf("kbf16 %%.4g\nkint8 %%.4g\n", kernel_us(WT_BF16, 3072, 768, 8), kernel_us(WT_INT8, 3072, 768, 8));
    return 0;
#else
    printf("unsupported\n");
    return 0;
#endif
}
"""

MODELS = {  # Llama-style (SwiGLU), vocab 4096: the T4 run of bench/RESULTS.md and decode_step.py's --size gpt2-small
    "t4": dict(layers=4, C=256, V=4096, name="T4"),
    "gpt2-small": dict(layers=12, C=768, V=4096, name="GPT-2 small size"),
}


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="pico-roofline-") as tmp:
        src, exe = Path(tmp) / "roofline.c", Path(tmp) / "roofline"
        src.write_text(PROGRAM % {"source": _SOURCE})
        cc = os.environ.get("CC") or "cc"
        r = subprocess.run([cc, *_FLAGS[0], "-std=gnu99", "-o", str(exe), str(src), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: compiling the roofline program failed: {r.stderr.strip().splitlines()[-1:]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    if out == ["unsupported"]:
        raise SystemExit("error: this CPU (or compiler) lacks AVX-512 BF16 or VNNI: the packed kernels' rates do not apply")
    return {k: float(v) for k, v in zip(out[::2], out[1::2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="t4")
    a = ap.parse_args()
    m = measure()
    threads = int(m["threads"])
    macs_k = 3072 * 768 * 8
    eff = {"bf16": macs_k / 32 / (m["kbf16"] * 1e-6) / (m["bf16"] * threads),
           "int8": macs_k / 64 / (m["kint8"] * 1e-6) / (m["vnni"] * threads)}
    print(f"{threads} threads; per thread: vdpbf16ps {m['bf16'] / 1e9:.2f} G/s, vpdpbusd {m['vnni'] / 1e9:.2f} G/s, "
          f"float32 FMA {m['fma'] / 1e9:.2f} G/s (512-bit instructions)")
    print(f"read bandwidth: {m['l3'] / 1e9:.0f} GB/s from a 10 MB buffer, {m['dram'] / 1e9:.0f} GB/s from 200 MB")
    print(f"fused_decode.c's batch-8 kernels (3072 x 768): bf16 {m['kbf16']:.1f} us ({eff['bf16']:.0%} of vdpbf16ps), "
          f"int8 {m['kint8']:.1f} us ({eff['int8']:.0%} of vpdpbusd)")
    d = MODELS[a.model]
    C, L, V = d["C"], d["layers"], d["V"]
    H = swiglu_hidden(C)
    macs = L * (C * 3 * C + C * C + C * 2 * H + H * C) + V * C
    print(f"\n{d['name']} ({L} layers, n_embd {C}, SwiGLU {H}, vocab {V}): {macs / 1e6:.2f} M multiply-adds a token "
          "in its matmuls")
    print("| weights | batch 1 >= (weights read once) | batch 8 >= (8 rows at the kernel's rate) | 8 streams / 1 at most |")
    print("|---|---|---|---|")
    for w, nbytes, per_instr, rate in (("bf16", 2 * macs, 32, m["bf16"]), ("int8", macs * 1.125, 64, m["vnni"])):
        bw = m["l3"] if nbytes < 24e6 else m["dram"]
        one = nbytes / bw
        eight = 8 * macs / per_instr / (rate * threads * eff[w])
        print(f"| {w} | {one * 1e6:,.0f} us ({nbytes / 1e6:.1f} MB at {bw / 1e9:.0f} GB/s) | {eight * 1e6:,.0f} us "
              f"({eff[w]:.0%} of the instruction rate) | {8 * one / eight:.1f}x |")


if __name__ == "__main__":
    main()
