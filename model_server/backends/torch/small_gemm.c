/* Float32 matrix products for few rows: y[M, N] = x[M, K] . w[N, K]^T.
 *
 * A decode step multiplies a handful of activation rows by every weight matrix, so it is bound
 * by how fast the weights stream from memory. Every thread of the OpenMP team (torch's team:
 * this library shares the process's libgomp) takes whole chunks of weight rows; a tile of R
 * weight rows stays in L1 while every group of MT activation rows passes over it, so each
 * weight is read from memory once per call.
 *
 * Built at run time with -march=native: the vector width is the machine's (16 floats with
 * AVX-512, 8 otherwise). Rows have leading dimensions ldx, ldw, ldy (in elements); y must not
 * overlap x or w.
 */
#include <string.h>

#ifdef __AVX512F__
#define VW 16
#define MT 3
#define R 8
#else
#define VW 8
#define MT 2
#define R 4
#endif
#define CHUNK 32 /* weight rows per unit of work (a multiple of R) */

typedef float vf __attribute__((vector_size(VW * 4)));

static inline vf load(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

static void rows(const float *x, const float *w, float *y, int M, int K, int n0, int n1,
                 long ldx, long ldw, long ldy) {
  for (int n = n0; n < n1; n += R) {
    int nr = n1 - n < R ? n1 - n : R;
    for (int m0 = 0; m0 < M; m0 += MT) {
      int mt = M - m0 < MT ? M - m0 : MT;
      vf acc[MT][R];
      memset(acc, 0, sizeof acc);
      int k = 0;
      for (; k + VW <= K; k += VW) {
        vf wv[R];
        for (int r = 0; r < R; r++) wv[r] = r < nr ? load(w + (n + r) * ldw + k) : (vf){0};
        for (int m = 0; m < MT; m++) {
          if (m < mt) {
            vf xv = load(x + (m0 + m) * ldx + k);
            for (int r = 0; r < R; r++) acc[m][r] += xv * wv[r];
          }
        }
      }
      for (int m = 0; m < mt; m++) {
        for (int r = 0; r < nr; r++) {
          float s = hsum(acc[m][r]);
          for (int kk = k; kk < K; kk++) s += x[(m0 + m) * ldx + kk] * w[(n + r) * ldw + kk];
          y[(m0 + m) * ldy + n + r] = s;
        }
      }
    }
  }
}

void sax_gemm_f32(const float *x, const float *w, float *y, int M, int N, int K, long ldx,
                  long ldw, long ldy) {
  int chunks = (N + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; c++) {
    int n0 = c * CHUNK, n1 = n0 + CHUNK < N ? n0 + CHUNK : N;
    rows(x, w, y, M, K, n0, n1, ldx, ldw, ldy);
  }
}

/* The vector width the library was built with, in floats. */
int sax_gemm_vector_width(void) { return VW; }
