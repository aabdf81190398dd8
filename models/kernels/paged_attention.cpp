// dspark::paged_attention: attention of a few queries per sequence (decodes, verification blocks,
// short prompt chunks) read straight from the paged KV pool, in one pass over each sequence's
// context: no gathered copy of the context, no padding to the batch's longest context.
//
//   q        [N, H, D]        the step's tokens, sequence by sequence (query_lens[s] rows each)
//   k_cache  [slots, Hkv, D]  the pool (v_cache likewise)
//   gather   [S, C]           int64, pool slot of context entry j of sequence s (C >= context_lens[s])
//   context_lens, query_lens  [S] int64; a sequence's last query_lens[s] entries are its new tokens
//   k_new    [N, Hkv, D]      the new tokens' keys where the pool does not hold them yet
//                             (empty: read them from the pool as well); v_new likewise
//   window   0, or a sliding window (entry j is visible to position p when p - window < j <= p)
// q, the pool and k_new / v_new share one dtype: bfloat16 or float32; the output has it too.
//
// Query i of sequence s sits at position p = context_lens[s] - query_lens[s] + i and attends to the
// entries j <= p (causal). Arithmetic in float32: scores q.k * scale, softmax with its max taken
// first, then sum_j p_j v_j / sum_j p_j, rounded to the dtype once at the end.
//
// Batch invariance: every (query, head) row is computed by its own loops over j in ascending order,
// whatever the other queries, sequences and the thread split are, so a token's output has the same
// bits in a decode step, a verification block, or a step shared with any other requests.
//
// Built for AVX-512 (16 floats per vector) or AVX2 + FMA (8 floats per vector; models/kernels/
// __init__.py picks the build): the two builds share every loop below and differ only in `Vec`, so
// each is batch-invariant; their bits differ from each other (the vector width orders the sums).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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

// Cephes-style exp for x <= 0: 2^n * P(r), r = x - n ln 2, |rel. error| ~ 2e-7; x < -87 -> ~0.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

#if defined(__AVX512F__)
struct Vec {
  static constexpr int W = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const at::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half of the float
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Vec pow2_mul(Vec y, Vec n) { return {_mm512_scalef_ps(y.v, n.v)}; }  // y * 2^n
  float sum() const { return _mm512_reduce_add_ps(v); }
};
#else
struct Vec {
  static constexpr int W = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const at::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec round(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Vec pow2_mul(Vec y, Vec n) {  // y * 2^n for integral n in [-126, 127]: n + 127 is the exponent field
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(y.v, _mm256_castsi256_ps(e))};
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

inline Vec exp_ps(Vec x) {
  x = Vec::max(x, Vec::set1(-87.0f));
  const Vec n = Vec::round(x * Vec::set1(kLog2e));
  Vec r = Vec::fnmadd(n, Vec::set1(kLn2Hi), x);
  r = Vec::fnmadd(n, Vec::set1(kLn2Lo), r);
  Vec y = Vec::set1(kP0);
  y = Vec::fmadd(y, r, Vec::set1(kP1));
  y = Vec::fmadd(y, r, Vec::set1(kP2));
  y = Vec::fmadd(y, r, Vec::set1(kP3));
  y = Vec::fmadd(y, r, Vec::set1(kP4));
  y = Vec::fmadd(y, r, Vec::set1(kP5));
  y = Vec::fmadd(y, r * r, r);
  y = y + Vec::set1(1.0f);
  return Vec::pow2_mul(y, n);
}

constexpr int kMaxChunks = 256 / Vec::W;  // head_dim up to 256

// One (sequence, kv head): its query rows (query_lens x heads per kv head) over its context.
template <typename T>
void attend_one(const T* q, const T* kc, const T* vc, const int64_t* gather, const T* kn, const T* vn, T* out,
                int64_t clen, int64_t qlen, int64_t q0, int64_t hkv, int64_t H, int64_t Hkv, int64_t D, float scale,
                int64_t window, std::vector<float>& buf) {
  constexpr int W = Vec::W;
  const int64_t G = H / Hkv;
  const int64_t R = qlen * G;  // query rows of this item
  const int64_t nc = D / W;
  const int64_t first_new = clen - qlen;
  const int64_t stride = Hkv * D;  // between rows of the pool and of k_new
  // scores [R][clen], then their exps in place
  buf.assign(static_cast<size_t>(R * clen + R * D), 0.f);
  float* sc = buf.data();
  float* acc = sc + R * clen;
  std::vector<int64_t> lo(R), hi(R);  // visible entries [lo, hi] of each row
  std::vector<Vec> qv(static_cast<size_t>(R * nc));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / G, h = hkv * G + r % G;
    const int64_t p = first_new + i;
    hi[r] = p;
    lo[r] = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    const T* qr = q + (q0 + i) * H * D + h * D;
    for (int64_t c = 0; c < nc; ++c) qv[r * nc + c] = Vec::load(qr + W * c);
  }
  auto key = [&](int64_t j, const T* cache, const T* fresh) -> const T* {
    if (fresh != nullptr && j >= first_new) return fresh + (q0 + j - first_new) * stride + hkv * D;
    return cache + gather[j] * stride + hkv * D;
  };
  const bool have_new = kn != nullptr;
  // pass 1: scores
  for (int64_t j = 0; j < clen; ++j) {
    const T* kr = key(j, kc, have_new ? kn : nullptr);
    Vec kv[kMaxChunks];
    for (int64_t c = 0; c < nc; ++c) kv[c] = Vec::load(kr + W * c);
    for (int64_t r = 0; r < R; ++r) {
      if (j < lo[r] || j > hi[r]) continue;
      Vec s = qv[r * nc] * kv[0];
      for (int64_t c = 1; c < nc; ++c) s = Vec::fmadd(qv[r * nc + c], kv[c], s);
      sc[r * clen + j] = s.sum() * scale;
    }
  }
  // pass 2: softmax numerators (exp(s - max)) and their sum, per row; a row's tail of fewer than W
  // entries goes through a zero-padded vector whose padding lanes are zeroed after the exp
  std::vector<float> inv(R);
  for (int64_t r = 0; r < R; ++r) {
    float* row = sc + r * clen;
    const int64_t a = lo[r], n = hi[r] - lo[r] + 1;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = a; j < a + n; ++j) m = std::max(m, row[j]);
    const Vec mv = Vec::set1(m);
    Vec sum = Vec::zero();
    int64_t j = a;
    for (; j + W <= a + n; j += W) {
      const Vec e = exp_ps(Vec::load(row + j) - mv);
      e.store(row + j);
      sum = sum + e;
    }
    if (j < a + n) {
      const int64_t t = a + n - j;
      alignas(64) float tail[W] = {};
      std::memcpy(tail, row + j, sizeof(float) * t);
      exp_ps(Vec::load(tail) - mv).store(tail);
      std::fill(tail + t, tail + W, 0.f);
      std::memcpy(row + j, tail, sizeof(float) * t);
      sum = sum + Vec::load(tail);
    }
    inv[r] = 1.0f / sum.sum();
  }
  // pass 3: sum_j p_j v_j
  for (int64_t j = 0; j < clen; ++j) {
    const T* vr = key(j, vc, have_new ? vn : nullptr);
    Vec vv[kMaxChunks];
    for (int64_t c = 0; c < nc; ++c) vv[c] = Vec::load(vr + W * c);
    for (int64_t r = 0; r < R; ++r) {
      if (j < lo[r] || j > hi[r]) continue;
      const Vec pj = Vec::set1(sc[r * clen + j]);
      float* ar = acc + r * D;
      for (int64_t c = 0; c < nc; ++c) Vec::fmadd(pj, vv[c], Vec::load(ar + W * c)).store(ar + W * c);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / G, h = hkv * G + r % G;
    T* o = out + (q0 + i) * H * D + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv[r]);
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
         const at::Tensor& v_new, const int64_t* gp, const int64_t* clp, const int64_t* qlp,
         const std::vector<int64_t>& q0, int64_t C, float scale, int64_t window, at::Tensor& out) {
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(1), S = static_cast<int64_t>(q0.size()) - 1;
  const bool have_new = k_new.numel() > 0;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const T* knp = have_new ? k_new.data_ptr<T>() : nullptr;
  const T* vnp = have_new ? v_new.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / Hkv, h = w % Hkv;
      attend_one<T>(qp, kp, vp, gp + s * C, knp, vnp, op, clp[s], qlp[s], q0[s], h, H, Hkv, D, scale, window, buf);
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& gather, const at::Tensor& context_lens, const at::Tensor& query_lens,
                           const at::Tensor& k_new, const at::Tensor& v_new, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_attention: q and caches are 3-d");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && k_cache.scalar_type() == dt &&
                  v_cache.scalar_type() == dt, "paged_attention: q and the pool must be all bfloat16 or all float32");
  TORCH_CHECK(gather.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  query_lens.scalar_type() == at::kLong, "paged_attention: int64 indices");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t S = gather.size(0), C = gather.size(1);
  TORCH_CHECK(D % 16 == 0 && D <= 256, "paged_attention: head_dim must be a multiple of 16, at most 256");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k_cache.size(2) == D && v_cache.size(1) == Hkv && v_cache.size(2) == D &&
                  v_cache.size(0) == k_cache.size(0), "paged_attention: head shapes");
  TORCH_CHECK(context_lens.numel() == S && query_lens.numel() == S, "paged_attention: one length per sequence");
  const bool have_new = k_new.numel() > 0;
  if (have_new) {
    TORCH_CHECK(k_new.scalar_type() == dt && v_new.scalar_type() == dt && k_new.dim() == 3 && v_new.dim() == 3 &&
                    k_new.size(0) == N && v_new.size(0) == N && k_new.size(1) == Hkv && k_new.size(2) == D &&
                    v_new.size(1) == Hkv && v_new.size(2) == D,
                "paged_attention: k_new/v_new must be [N, Hkv, D] in q's dtype");
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
  const float sc = static_cast<float>(scale);
  if (dt == at::kFloat)
    run<float>(qc, kc, vc, knc, vnc, gp, clp, qlp, q0, C, sc, window, out);
  else
    run<at::BFloat16>(qc, kc, vc, knc, vnc, gp, clp, qlp, q0, C, sc, window, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor gather, Tensor context_lens, "
        "Tensor query_lens, Tensor k_new, Tensor v_new, float scale, int window) -> Tensor");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("paged_attention", &paged_attention); }
#endif  // __AVX512F__ || (__AVX2__ && __FMA__)
