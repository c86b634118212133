// kvgen::int4_mm: bfloat16 rows x times an int4 weight, summed over its terms (kvgen/quant.py) ->
// (M, N) bfloat16, each row computed alone (the same bits in any batch). The nibbles are in torch's
// CPU int4 layout; the scales are laid out by blocks of 64 rows, so that a block reads its own from
// one place (in torch's layout a large head's were a megabyte apart, group after group).
//
// torch's own kernel widens every nibble to float32 and is bound by that arithmetic (about 17 GB/s
// of weights on two cores). Here two nibbles of a row become two bfloat16 lanes with a mask and an
// OR, and one vdpbf16ps multiplies 32 of them by x: the product streams the weights at about the
// speed of memory. Needs AVX-512 BF16 and VBMI; docs/speed.md has the figures.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int kGroup = 32;      // values per scale and zero
constexpr int kBlockRows = 64;  // rows that one block of the layout interleaves
constexpr int kMaxRows = 4;     // rows of x multiplied per pass over a block
// How far ahead of its reads the kernel asks for weights: the hardware's own prefetch left a
// weight larger than the cache streaming at ~60 % of memory speed.
constexpr int kAhead = 4096;

// bfloat16 with bits 0x4300 | u is 128 + u exactly (u < 16), so a nibble becomes a bfloat16 with
// one OR. A weight is (u - 8) * scale + zero: the 136 that 128 + u holds over u - 8 comes off with
// each group's sum of x.
constexpr uint32_t kMagic = 0x43004300;
constexpr float kExcess = 136.0f;

// From the 64 bytes of columns k and k + 1 of a block (32 bytes each: byte j holds rows j and
// j + 32 in its low and high nibble), rows 16h..16h+15 as 16 lanes of [byte of k, 0, byte of k + 1, 0].
struct Spread {
  alignas(64) uint8_t index[2][64] = {};
  Spread() {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 16; ++j) index[h][4 * j] = 16 * h + j, index[h][4 * j + 2] = 32 + 16 * h + j;
  }
};
const Spread kSpread;

// Accumulator i holds 16 rows from the block's 16 i-th: the low nibbles of the first and second
// spread (rows 0-15, 16-31), then their high nibbles (rows 32-47, 48-63).
constexpr int kFirstRow[4] = {0, 16, 32, 48};

struct Weight {
  const uint8_t* packed;         // (terms, N, K/2)
  const uint32_t* scales_zeros;  // (terms, N/64, K/32, 64) pairs of bfloat16 scale, zero
  int64_t terms, N, K;
};

// One 64-row block of term t of the weight times `Rows` rows of x. The terms' sums add up in
// float32 in `partial` (Rows, N); the last term writes them to `out` (Rows, N) in bfloat16.
template <int Rows>
void block_product(const Weight& w, int64_t t, int64_t block, const uint16_t* x, const float* group_sums,
                   float* partial, uint16_t* out) {
  const int64_t groups = w.K / kGroup, column = block * kBlockRows;
  const __m512i spread[2] = {_mm512_load_si512(kSpread.index[0]), _mm512_load_si512(kSpread.index[1])};
  const __mmask64 values_only = 0x5555555555555555ULL;  // the other bytes of each lane are zeroed
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(kMagic);
  __m512 result[Rows][4];
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i)
      result[r][i] = t == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + r * w.N + column + 16 * i);
  const uint8_t* rows = w.packed + (t * w.N + column) * (w.K / 2);
  const uint32_t* scales_zeros = w.scales_zeros + (t * (w.N / kBlockRows) + block) * groups * kBlockRows;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Rows][4];
    for (int r = 0; r < Rows; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(rows + k * (kBlockRows / 2) + kAhead), _MM_HINT_T0);
      const __m512i both = _mm512_loadu_si512(rows + k * (kBlockRows / 2));
      __m512i lanes[4];  // rows 0-15, 16-31, 32-47, 48-63 of the block
      for (int h = 0; h < 2; ++h) {
        const __m512i bytes = _mm512_maskz_permutexvar_epi8(values_only, spread[h], both);
        lanes[h] = _mm512_or_si512(_mm512_and_si512(bytes, nibble), magic);
        lanes[2 + h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble), magic);
      }
      for (int r = 0; r < Rows; ++r) {
        uint32_t pair;  // x[r][k], x[r][k + 1]
        std::memcpy(&pair, x + r * w.K + k, sizeof pair);
        const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)lanes[i], xs);
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m512i pairs = _mm512_loadu_si512(scales_zeros + g * kBlockRows + 16 * i);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(kExcess), scale, zero);
      for (int r = 0; r < Rows; ++r) {
        result[r][i] = _mm512_fmadd_ps(acc[r][i], scale, result[r][i]);
        result[r][i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(group_sums[r * groups + g]), result[r][i]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) {
      const int64_t at = r * w.N + column + 16 * i;
      if (t + 1 < w.terms)
        _mm512_storeu_ps(partial + at, result[r][i]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), (__m256i)_mm512_cvtneps_pbh(result[r][i]));
    }
}

using BlockProduct = void (*)(const Weight&, int64_t, int64_t, const uint16_t*, const float*, float*, uint16_t*);
constexpr BlockProduct kBlockProducts[kMaxRows + 1] = {
    nullptr, block_product<1>, block_product<2>, block_product<3>, block_product<4>};

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte, "int4_mm: packed must be (terms, N, K/2) uint8");
  const int64_t M = x.size(0), K = x.size(1), terms = packed.size(0), N = packed.size(1);
  TORCH_CHECK(packed.size(2) * 2 == K && N % kBlockRows == 0 && K % kGroup == 0,
              "int4_mm: packed must be (terms, N, K/2) with N a multiple of 64 and K of 32");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 &&
                  scales_zeros.sizes() == at::IntArrayRef({terms, N / kBlockRows, K / kGroup, kBlockRows, 2}),
              "int4_mm: scales_zeros must be (terms, N/64, K/32, 64, 2) bfloat16");
  const auto xs = x.contiguous(), ps = packed.contiguous(), ss = scales_zeros.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr());
  std::vector<float> sums(M * (K / kGroup));  // each group's sum of x, in float32
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t bits = static_cast<uint32_t>(xp[i]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    sums[i / kGroup] += value;
  }
  auto out = at::empty({M, N}, x.options());
  auto partial = at::empty({terms > 1 ? M : 0, N}, x.options().dtype(at::kFloat));
  const Weight w{ps.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(ss.data_ptr()), terms, N, K};
  const float* gp = sums.data();
  float* pp = partial.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    // Term by term over this thread's blocks: one stream of weights at a time.
    for (int64_t t = 0; t < terms; ++t)
      for (int64_t block = begin; block < end; ++block)
        for (int64_t m = 0; m < M; m += kMaxRows) {
          const auto rows = std::min<int64_t>(kMaxRows, M - m);
          kBlockProducts[rows](w, t, block, xp + m * K, gp + m * (K / kGroup), pp + m * N, op + m * N);
        }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvgen, m) { m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor"); }
TORCH_LIBRARY_IMPL(kvgen, CPU, m) { m.impl("int4_mm", int4_mm); }
