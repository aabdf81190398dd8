// dspark::paged_attention: attention of a few queries per sequence (decodes, verification blocks,
// short prompt chunks) read straight from the paged KV pool, in one pass over each sequence's
// context: no gathered copy of the context, no padding to the batch's longest context.
//
//   q        [N, H, D]        bf16, the step's tokens, sequence by sequence (query_lens[s] rows each)
//   k_cache  [slots, Hkv, D]  bf16, the pool (v_cache likewise)
//   gather   [S, C]           int64, pool slot of context entry j of sequence s (C >= context_lens[s])
//   context_lens, query_lens  [S] int64; a sequence's last query_lens[s] entries are its new tokens
//   k_new    [N, Hkv, D]      bf16: the new tokens' keys where the pool does not hold them yet
//                             (empty: read them from the pool as well); v_new likewise
//   window   0, or a sliding window (entry j is visible to position p when p - window < j <= p)
//
// Query i of sequence s sits at position p = context_lens[s] - query_lens[s] + i and attends to the
// entries j <= p (causal). Arithmetic in float32: scores q.k * scale, softmax with its max taken
// first, then sum_j p_j v_j / sum_j p_j, rounded to bf16 once at the end.
//
// Batch invariance: every (query, head) row is computed by its own loops over j in ascending order,
// whatever the other queries, sequences and the thread split are, so a token's output has the same
// bits in a decode step, a verification block, or a step shared with any other requests.
//
// AVX-512 only: built for an AVX2 CPU (models/kernels/__init__.py) this file defines nothing, and
// attention keeps the torch path there.
#if defined(__AVX512F__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline __m512 load_bf16(const at::BFloat16* p) {
  // bf16 -> fp32: the 16 bits become the high half of the float
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 (Cephes-style: 2^n * P(r), r = x - n ln 2, |rel. error| ~ 2e-7); x < -87 -> ~0
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

constexpr int kMaxChunks = 16;  // head_dim up to 256

// One (sequence, kv head): its query rows (query_lens x heads per kv head) over its context.
void attend_one(const at::BFloat16* q, const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* gather,
                const at::BFloat16* kn, const at::BFloat16* vn, at::BFloat16* out, int64_t clen, int64_t qlen,
                int64_t q0, int64_t hkv, int64_t H, int64_t Hkv, int64_t D, float scale, int64_t window,
                std::vector<float>& buf) {
  const int64_t G = H / Hkv;
  const int64_t R = qlen * G;  // query rows of this item
  const int64_t nc = D / 16;
  const int64_t first_new = clen - qlen;
  const int64_t stride = Hkv * D;  // between rows of the pool and of k_new
  // scores [R][clen], then their exps in place
  buf.assign(static_cast<size_t>(R * clen + R * D), 0.f);
  float* sc = buf.data();
  float* acc = sc + R * clen;
  std::vector<int64_t> lo(R), hi(R);  // visible entries [lo, hi] of each row
  std::vector<__m512> qv(static_cast<size_t>(R * nc));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / G, h = hkv * G + r % G;
    const int64_t p = first_new + i;
    hi[r] = p;
    lo[r] = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    const at::BFloat16* qr = q + (q0 + i) * H * D + h * D;
    for (int64_t c = 0; c < nc; ++c) qv[r * nc + c] = load_bf16(qr + 16 * c);
  }
  auto key = [&](int64_t j, const at::BFloat16* cache, const at::BFloat16* fresh) -> const at::BFloat16* {
    if (fresh != nullptr && j >= first_new) return fresh + (q0 + j - first_new) * stride + hkv * D;
    return cache + gather[j] * stride + hkv * D;
  };
  const bool have_new = kn != nullptr;
  // pass 1: scores
  for (int64_t j = 0; j < clen; ++j) {
    const at::BFloat16* kr = key(j, kc, have_new ? kn : nullptr);
    __m512 kv[kMaxChunks];
    for (int64_t c = 0; c < nc; ++c) kv[c] = load_bf16(kr + 16 * c);
    for (int64_t r = 0; r < R; ++r) {
      if (j < lo[r] || j > hi[r]) continue;
      __m512 s = _mm512_mul_ps(qv[r * nc], kv[0]);
      for (int64_t c = 1; c < nc; ++c) s = _mm512_fmadd_ps(qv[r * nc + c], kv[c], s);
      sc[r * clen + j] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  // pass 2: softmax numerators (exp(s - max)) and their sum, per row
  std::vector<float> inv(R);
  for (int64_t r = 0; r < R; ++r) {
    float* row = sc + r * clen;
    const int64_t a = lo[r], n = hi[r] - lo[r] + 1;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = a; j < a + n; ++j) m = std::max(m, row[j]);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = a;
    for (; j + 16 <= a + n; j += 16) {
      __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), mv));
      _mm512_storeu_ps(row + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < a + n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (a + n - j)) - 1u);
      __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), mv));
      e = _mm512_maskz_mov_ps(k, e);
      _mm512_mask_storeu_ps(row + j, k, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // pass 3: sum_j p_j v_j
  for (int64_t j = 0; j < clen; ++j) {
    const at::BFloat16* vr = key(j, vc, have_new ? vn : nullptr);
    __m512 vv[kMaxChunks];
    for (int64_t c = 0; c < nc; ++c) vv[c] = load_bf16(vr + 16 * c);
    for (int64_t r = 0; r < R; ++r) {
      if (j < lo[r] || j > hi[r]) continue;
      const __m512 pj = _mm512_set1_ps(sc[r * clen + j]);
      float* ar = acc + r * D;
      for (int64_t c = 0; c < nc; ++c)
        _mm512_storeu_ps(ar + 16 * c, _mm512_fmadd_ps(pj, vv[c], _mm512_loadu_ps(ar + 16 * c)));
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / G, h = hkv * G + r % G;
    at::BFloat16* o = out + (q0 + i) * H * D + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<at::BFloat16>(acc[r * D + d] * inv[r]);
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& gather, const at::Tensor& context_lens, const at::Tensor& query_lens,
                           const at::Tensor& k_new, const at::Tensor& v_new, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_attention: q and caches are 3-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16, "paged_attention: bfloat16 only");
  TORCH_CHECK(gather.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  query_lens.scalar_type() == at::kLong, "paged_attention: int64 indices");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t S = gather.size(0), C = gather.size(1);
  TORCH_CHECK(D % 16 == 0 && D / 16 <= kMaxChunks, "paged_attention: head_dim must be a multiple of 16, at most 256");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k_cache.size(2) == D, "paged_attention: head shapes");
  TORCH_CHECK(context_lens.numel() == S && query_lens.numel() == S, "paged_attention: one length per sequence");
  const bool have_new = k_new.numel() > 0;
  if (have_new) {
    TORCH_CHECK(k_new.scalar_type() == at::kBFloat16 && v_new.scalar_type() == at::kBFloat16 &&
                    k_new.size(0) == N && v_new.size(0) == N && k_new.size(1) == Hkv && k_new.size(2) == D,
                "paged_attention: k_new/v_new must be [N, Hkv, D] bfloat16");
  }
  auto qc = q.contiguous();
  auto kc = k_cache.contiguous();
  auto vc = v_cache.contiguous();
  auto gc = gather.contiguous();
  auto cl = context_lens.contiguous();
  auto ql = query_lens.contiguous();
  auto knc = have_new ? k_new.contiguous() : k_new;
  auto vnc = have_new ? v_new.contiguous() : v_new;
  const int64_t* clp = cl.data_ptr<int64_t>();
  const int64_t* qlp = ql.data_ptr<int64_t>();
  std::vector<int64_t> q0(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(qlp[s] >= 1 && qlp[s] <= clp[s] && clp[s] <= C, "paged_attention: lengths out of range");
    q0[s + 1] = q0[s] + qlp[s];
  }
  TORCH_CHECK(q0[S] == N, "paged_attention: query_lens must sum to the rows of q");
  const int64_t slots = kc.size(0);
  const int64_t* gp = gc.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < clp[s] - (have_new ? qlp[s] : 0); ++j)
      TORCH_CHECK(gp[s * C + j] >= 0 && gp[s * C + j] < slots, "paged_attention: slot out of range");
  auto out = at::empty({N, H, D}, q.options());
  const at::BFloat16* qp = qc.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = kc.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = vc.data_ptr<at::BFloat16>();
  const at::BFloat16* knp = have_new ? knc.data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* vnp = have_new ? vnc.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / Hkv, h = w % Hkv;
      attend_one(qp, kp, vp, gp + s * C, knp, vnp, op, clp[s], qlp[s], q0[s], h, H, Hkv, D, sc, window, buf);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor gather, Tensor context_lens, "
        "Tensor query_lens, Tensor k_new, Tensor v_new, float scale, int window) -> Tensor");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("paged_attention", &paged_attention); }
#endif  // __AVX512F__
