// dspark::quant_mm: y = x @ W^T for a weight quantized in groups of 32 along K, computed with
// AVX-512 VNNI integer dot products (the arithmetic of llama.cpp's Q4_1 x Q8_0 and Q8_0 x Q8_0), or,
// built for AVX2 CPUs (models/kernels/__init__.py picks the ISA), with AVX2's maddubs/madd.
//
// Each row of x is quantized to int8 in groups of 32 (scale sx = max|x| / 127, codes
// round-half-even(x / sx), their sum sum_q). For every group g of output channel n:
//   bits 4 (GGUF Q4_1): w = d * q + m, q in 0..15        -> y += d * sx * dot(q, xq) + m * sx * sum_q
//   bits 8 (GGUF Q8_0): w = d * c, c in -127..127, stored as u = c + 128
//                                                        -> y += d * sx * dot(u, xq) - d * 128 * sx * sum_q
// dot() is exact (int32), and every (row, channel) sums its groups in the same order whatever the
// other rows and the thread split are: the result of a row does not depend on the batch.
//
// Packed layout, per block of 16 output channels and per group of 32 inputs:
//   bits 4: 4 x 64 bytes; in the o-th 64 bytes, byte 4c + j holds q[c][8o + j] in its low nibble and
//           q[c][8o + 4 + j] in its high nibble;
//   bits 8: 8 x 64 bytes; in the o-th 64 bytes, byte 4c + j holds u[c][4o + j];
//   consts: fp16 [blocks][groups][2][16]: d of the 16 channels, then m (bits 4) or d again (bits 8).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlock = 16;
constexpr int kRowTile = 8;

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* xq, float* sx, float* sq) {
  const int64_t G = K / kGroup;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const T* p = x + r * K + g * kGroup;
      float v[kGroup];
      float amax = 0.f;
      for (int i = 0; i < kGroup; ++i) {
        v[i] = static_cast<float>(p[i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = xq + r * K + g * kGroup;
      for (int i = 0; i < kGroup; ++i) {
        const int c = static_cast<int>(std::nearbyint(v[i] * id));
        q[i] = static_cast<int8_t>(c);
        sum += c;
      }
      sx[r * G + g] = d;
      sq[r * G + g] = d * static_cast<float>(sum);
    }
  }
}

#if defined(__AVX512VNNI__)
// R rows of x against one block of 16 channels; out[r * 16 + c].
template <int BITS, int R>
inline void block_rows(const uint8_t* wb, const at::Half* cb, int64_t G, const int8_t* xq, const float* sx,
                       const float* sq, int64_t K, float* out) {
  constexpr int kVecs = BITS == 4 ? 8 : 8;  // 8 vectors of 64 bytes per group (4 k each)
  constexpr int64_t kGroupBytes = BITS == 4 ? 256 : 512;
  const float kBias = BITS == 4 ? 1.f : -128.f;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = wb + g * kGroupBytes;
    __m512i w[kVecs];
    if constexpr (BITS == 4) {
      for (int o = 0; o < 4; ++o) {
        const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(wg + 64 * o));
        w[2 * o] = _mm512_and_si512(v, low);
        w[2 * o + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int o = 0; o < 8; ++o) w[o] = _mm512_loadu_si512(reinterpret_cast<const void*>(wg + 64 * o));
    }
    const at::Half* cg = cb + g * 2 * kBlock;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + kBlock)));
    for (int r = 0; r < R; ++r) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * K + g * kGroup);
      __m512i s = _mm512_setzero_si512();
      for (int o = 0; o < kVecs; ++o) s = _mm512_dpbusd_epi32(s, w[o], _mm512_set1_epi32(xr[o]));
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sx[r * G + g]));
      acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(kBias * sq[r * G + g]), m, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kBlock, acc[r]);
}

#else
// R rows of x against one block of 16 channels; out[r * 16 + c]. AVX2 (no VNNI): the same packed
// bytes, each 64-byte vector read as two halves of 8 channels; u8 x s8 products summed in pairs by
// maddubs and in fours by madd (llama.cpp's AVX2 arithmetic). bits 4: q <= 15, so the int16 pair
// sums cannot saturate. bits 8: the stored u = c + 128 becomes the signed c (u ^ 0x80) and the dot is
// |x| . (c signed by x) (|x|, |c| <= 127: pair sums <= 32258), so y = d * sx * dot(c, xq) and the
// -128 * sum term of the VNNI path is not needed. Integer dots are exact; the float accumulation
// order per (row, channel) is fixed, so rows stay batch-invariant.
template <int BITS, int R>
inline void block_rows(const uint8_t* wb, const at::Half* cb, int64_t G, const int8_t* xq, const float* sx,
                       const float* sq, int64_t K, float* out) {
  constexpr int64_t kGroupBytes = BITS == 4 ? 256 : 512;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = wb + g * kGroupBytes;
    const at::Half* cg = cb + g * 2 * kBlock;
    for (int h = 0; h < 2; ++h) {  // channels 8h .. 8h + 7
      __m256i w[8];
      if constexpr (BITS == 4) {
        for (int o = 0; o < 4; ++o) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * o + 32 * h));
          w[2 * o] = _mm256_and_si256(v, low);
          w[2 * o + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      } else {
        for (int o = 0; o < 8; ++o)
          w[o] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * o + 32 * h)), flip);
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cg + 8 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cg + kBlock + 8 * h)));
      for (int r = 0; r < R; ++r) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * K + g * kGroup);
        __m256i s = _mm256_setzero_si256();
        for (int o = 0; o < 8; ++o) {
          const __m256i xb = _mm256_set1_epi32(xr[o]);
          __m256i p;
          if constexpr (BITS == 4) p = _mm256_maddubs_epi16(w[o], xb);
          else p = _mm256_maddubs_epi16(_mm256_sign_epi8(xb, xb), _mm256_sign_epi8(w[o], xb));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
        }
        const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(sx[r * G + g]));
        acc[r][h] = _mm256_fmadd_ps(t, d, acc[r][h]);
        if constexpr (BITS == 4) acc[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(sq[r * G + g]), m, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * kBlock, acc[r][0]);
    _mm256_storeu_ps(out + r * kBlock + 8, acc[r][1]);
  }
}

#endif

template <int BITS, typename T>
void run(const T* x, int64_t M, int64_t K, int64_t N, const uint8_t* w, const at::Half* consts, T* y) {
  const int64_t G = K / kGroup, NB = N / kBlock;
  const int64_t block_bytes = G * (BITS == 4 ? 256 : 512);
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * G), sq(M * G);
  quantize_rows<T>(x, M, K, xq.data(), sx.data(), sq.data());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float buf[kRowTile * kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * block_bytes;
      const at::Half* cb = consts + b * G * 2 * kBlock;
      for (int64_t r0 = 0; r0 < M; r0 += kRowTile) {
        const int64_t R = std::min<int64_t>(kRowTile, M - r0);
        const int8_t* xr = xq.data() + r0 * K;
        const float* sxr = sx.data() + r0 * G;
        const float* sqr = sq.data() + r0 * G;
        switch (R) {
          case 1: block_rows<BITS, 1>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 2: block_rows<BITS, 2>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 3: block_rows<BITS, 3>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 4: block_rows<BITS, 4>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 5: block_rows<BITS, 5>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 6: block_rows<BITS, 6>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          case 7: block_rows<BITS, 7>(wb, cb, G, xr, sxr, sqr, K, buf); break;
          default: block_rows<BITS, 8>(wb, cb, G, xr, sxr, sqr, K, buf); break;
        }
        for (int64_t r = 0; r < R; ++r) {
          T* yr = y + (r0 + r) * N + b * kBlock;
          for (int c = 0; c < kBlock; ++c) yr[c] = static_cast<T>(buf[r * kBlock + c]);
        }
      }
    }
  });
}

at::Tensor quant_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& consts, int64_t n, int64_t bits) {
  TORCH_CHECK(x.dim() == 2, "quant_mm: x must be 2-d");
  TORCH_CHECK(bits == 4 || bits == 8, "quant_mm: bits must be 4 or 8");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "quant_mm: x must be bfloat16 or float32");
  TORCH_CHECK(w.scalar_type() == at::kByte && consts.scalar_type() == at::kHalf, "quant_mm: packed weight dtypes");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0 && n % kBlock == 0, "quant_mm: K must be a multiple of 32 and N of 16");
  TORCH_CHECK(w.numel() == n * K * bits / 8 && consts.numel() == n / kBlock * (K / kGroup) * 2 * kBlock,
              "quant_mm: packed weight does not match the shapes");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto cc = consts.contiguous();
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half* cp = cc.data_ptr<at::Half>();
  if (x.scalar_type() == at::kBFloat16) {
    if (bits == 4) run<4>(xc.data_ptr<at::BFloat16>(), M, K, n, wp, cp, y.data_ptr<at::BFloat16>());
    else run<8>(xc.data_ptr<at::BFloat16>(), M, K, n, wp, cp, y.data_ptr<at::BFloat16>());
  } else {
    if (bits == 4) run<4>(xc.data_ptr<float>(), M, K, n, wp, cp, y.data_ptr<float>());
    else run<8>(xc.data_ptr<float>(), M, K, n, wp, cp, y.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(dspark, m) { m.def("quant_mm(Tensor x, Tensor w, Tensor consts, int n, int bits) -> Tensor"); }
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("quant_mm", &quant_mm); }
