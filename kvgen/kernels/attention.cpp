// kvgen::attention: a few bfloat16 queries per row attending over a bfloat16 KV cache, one call for
// every row of a batch (kvgen/models/layers.py).
//
// SDPA's CPU kernel costs ~100 us a call whatever its size, and a batch's rows must attend one call
// each: its sums depend on how many slots a call has, even where they are masked, so a row in a
// batch would not compute what it computes alone. Here each (row, query, head) is computed alone,
// its slots visited in order and masked ones skipped: the same bits in any batch, over any cache
// (dynamic, static with an unwritten tail, left-padded), and for a query of a decode step or of a
// verification step. Scores and sums are float32. Needs AVX-512 BF16; docs/speed.md has the figures.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// e^x for x <= 0 to about an ulp: 2^n e^r with |r| <= ln 2 / 2, e^r by its Taylor series to r^7
// (the next term is below 1e-8 of it). Below -88 it is 0 or a subnormal, which makes no difference
// beside the largest score's e^0 = 1.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __m512 widen(const uint16_t* bf16) {  // 16 bfloat16 -> float32, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)bf16)), 16));
}

struct View {  // a (B, H, T | S, D) tensor's data and strides, in elements
  const uint16_t* data;
  int64_t row, head, pos;
  View(const at::Tensor& t)
      : data(reinterpret_cast<const uint16_t*>(t.data_ptr())), row(t.stride(0)), head(t.stride(1)), pos(t.stride(2)) {}
  const uint16_t* at(int64_t b, int64_t h, int64_t s) const { return data + b * row + h * head + s * pos; }
};

// One query head's scores over slots first .. last - 1, four slots at a time (four independent
// chains of dot products), scaled. Masked slots among them are computed and never read.
void score(const uint16_t* query, const View& k, int64_t b, int64_t g, int64_t first, int64_t last, int64_t D,
           float scale, float* scores) {
  int64_t s = first;
  for (; s + 4 <= last; s += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t d = 0; d < D; d += 32) {
      const auto x = (__m512bh)_mm512_loadu_si512(query + d);
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], x, (__m512bh)_mm512_loadu_si512(k.at(b, g, s + j) + d));
    }
    for (int j = 0; j < 4; ++j) scores[s + j] = _mm512_reduce_add_ps(acc[j]) * scale;
  }
  for (; s < last; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(query + d), (__m512bh)_mm512_loadu_si512(k.at(b, g, s) + d));
    scores[s] = _mm512_reduce_add_ps(acc) * scale;
  }
}

// Scores -> e^(score - max) over the visible slots (others never read); returns their sum, added
// in slot order: the same bits wherever the visible slots lie.
float soften(float* scores, const bool* visible, int64_t first, int64_t last) {
  float top = -INFINITY;
  for (int64_t s = first; s < last; ++s)
    if (visible[s]) top = std::max(top, scores[s]);
  const __m512 high = _mm512_set1_ps(top);
  int64_t s = first;
  for (; s + 16 <= last; s += 16) _mm512_storeu_ps(scores + s, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + s), high)));
  if (s < last) {
    const __mmask16 tail = (1u << (last - s)) - 1;
    _mm512_mask_storeu_ps(scores + s, tail, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + s), high)));
  }
  float total = 0.0f;
  for (int64_t s = first; s < last; ++s)
    if (visible[s]) total += scores[s];
  return total;
}

// For N heads at once, dimensions d .. d + 16C - 1 of the weighted sum of the visible slots'
// values, in slot order, divided by each head's total, into `out` (one row of D per head).
template <int N, int C>
void weigh(const float* const* weights, const float* totals, const uint16_t* const* values, const bool* visible,
           int64_t first, int64_t last, int64_t d, uint16_t* const* out) {
  __m512 acc[N][C];
  for (int i = 0; i < N; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t s = first; s < last; ++s) {
    if (!visible[s]) continue;
    __m512 value[C];
    for (int c = 0; c < C; ++c) value[c] = widen(values[s] + d + 16 * c);
    for (int i = 0; i < N; ++i) {
      const __m512 p = _mm512_set1_ps(weights[i][s]);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(p, value[c], acc[i][c]);
    }
  }
  for (int i = 0; i < N; ++i) {
    const __m512 inverse = _mm512_set1_ps(1.0f / totals[i]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256((__m256i*)(out[i] + d + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][c], inverse)));
  }
}

template <int C>
void weigh_heads(int n, const float* const* weights, const float* totals, const uint16_t* const* values,
                 const bool* visible, int64_t first, int64_t last, int64_t d, uint16_t* const* out) {
  switch (n) {  // at most 4 heads x 4 chunks of 16: 16 accumulators in registers
    case 1: return weigh<1, C>(weights, totals, values, visible, first, last, d, out);
    case 2: return weigh<2, C>(weights, totals, values, visible, first, last, d, out);
    case 3: return weigh<3, C>(weights, totals, values, visible, first, last, d, out);
    default: return weigh<4, C>(weights, totals, values, visible, first, last, d, out);
  }
}

// Heads h0 .. h1 - 1 (of kv head g) of query t of row b. `scores` has room for (h1 - h0) x S floats,
// `values` for S pointers; `result` points at this row's and query's place in head 0 of the output.
void attend(const View& q, const View& k, const View& v, const bool* visible, int64_t S, int64_t D, float scale,
            int64_t b, int64_t g, int64_t t, int64_t h0, int64_t h1, float* scores, const uint16_t** values,
            uint16_t* result, int64_t result_head) {
  int64_t first = 0, last = S;  // the span of visible slots: nothing outside it is read
  while (first < S && !visible[first]) ++first;
  while (last > first && !visible[last - 1]) --last;
  const int64_t heads = h1 - h0;
  std::vector<float> totals(heads);
  std::vector<const float*> weights(heads);
  std::vector<uint16_t*> out(heads);
  for (int64_t i = 0; i < heads; ++i) {
    weights[i] = scores + i * S;
    out[i] = result + (h0 + i) * result_head;
    score(q.at(b, h0 + i, t), k, b, g, first, last, D, scale, scores + i * S);
    totals[i] = soften(scores + i * S, visible, first, last);
  }
  for (int64_t s = first; s < last; ++s) values[s] = v.at(b, g, s);
  for (int64_t i = 0; i < heads; i += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, heads - i));
    for (int64_t d = 0; d < D; d += D % 64 == 0 ? 64 : 32) {
      if (D % 64 == 0)
        weigh_heads<4>(n, &weights[i], &totals[i], values, visible, first, last, d, &out[i]);
      else
        weigh_heads<2>(n, &weights[i], &totals[i], values, visible, first, last, d, &out[i]);
    }
  }
}

// q (B, H, T, D), k and v (B, Hkv, S, D) bfloat16 with D a multiple of 32, mask (B, 1, T, S) bool
// (True: may attend; each query sees at least one slot) -> (B, H, T, D) bfloat16.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 4,
              "attention: q (B, H, T, D), k and v (B, Hkv, S, D), mask (B, 1, T, S)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attention: q, k and v must be bfloat16");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && D % 32 == 0 && H % Hkv == 0,
              "attention: rows, head sizes (a multiple of 32) and head groups must match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: head dimensions must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T &&
                  mask.size(3) == S,
              "attention: mask must be (B, 1, T, S) bool");
  const auto visible = mask.contiguous();
  auto out = at::empty({B, H, T, D}, q.options());
  const View qv(q), kv(k), vv(v);
  const int64_t group = H / Hkv;
  // Work items: (row, kv head, query) and, where there are fewer of those than threads, halves of
  // a kv head's query heads. How heads are shared out changes no number: each is computed alone.
  const int64_t split = B * Hkv * T < at::get_num_threads() && group > 1 ? 2 : 1;
  const int64_t per = (group + split - 1) / split;
  const auto* vp = visible.data_ptr<bool>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * Hkv * T * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(per * S);
    std::vector<const uint16_t*> values(S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item % split, t = item / split % T, g = item / split / T % Hkv, b = item / split / T / Hkv;
      const int64_t h0 = g * group + part * per, h1 = std::min(h0 + per, (g + 1) * group);
      attend(qv, kv, vv, vp + (b * T + t) * S, S, D, static_cast<float>(scale), b, g, t, h0, h1, scores.data(),
             values.data(), op + (b * H * T + t) * D, T * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvgen, m) { m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(kvgen, CPU, m) { m.impl("attention", attention); }
