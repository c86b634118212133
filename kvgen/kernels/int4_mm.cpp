// kvgen::int4_mm: bfloat16 rows x times a weight of 4-bit values, or of 8-bit ones as two 4-bit
// terms (kvgen/quant.py) -> (M, N) bfloat16, each row computed alone (the same bits in any batch).
// The nibbles are in torch's CPU int4 layout; one scale and zero a group of 32, laid out by blocks
// of 64 rows so that a block reads its own from one place (in torch's layout a large head's were a
// megabyte apart, group after group, and an 8-bit weight carried a pair per term).
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
// one OR. A 4-bit weight is (u - 8) * scale + zero: the 136 that 128 + u holds over u - 8 comes off
// with each group's sum of x. An 8-bit one is two nibbles, v = 16 * high + low, and (v - 136) *
// scale + zero: its high nibbles multiply 16 * x (exact in bfloat16) into the same sums, and 2312 =
// 16 * 128 + 128 + 136 comes off.
constexpr uint32_t kMagic = 0x43004300;
constexpr float kExcess[2] = {136.0f, 2312.0f};

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
  const uint8_t* packed;         // (terms, N, K/2): one term, or an 8-bit value's high and low nibbles
  const uint32_t* scales_zeros;  // (N/64, K/32, 64) pairs of bfloat16 scale, zero
  bool eight;                    // two terms
  int64_t N, K;
};

// acc[r][i] += the 64 rows' 128 + u at columns k, k + 1 (nibbles at `columns`) times x[r][k, k + 1].
template <int Rows>
inline void multiply_add(const uint8_t* columns, const uint16_t* x, int64_t K, __m512 (&acc)[Rows][4]) {
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(kMagic);
  const __mmask64 values_only = 0x5555555555555555ULL;  // the other bytes of each lane are zeroed
  _mm_prefetch(reinterpret_cast<const char*>(columns + kAhead), _MM_HINT_T0);
  const __m512i both = _mm512_loadu_si512(columns);
  __m512i lanes[4];  // rows 0-15, 16-31, 32-47, 48-63 of the block
  for (int h = 0; h < 2; ++h) {
    const __m512i bytes = _mm512_maskz_permutexvar_epi8(values_only, _mm512_load_si512(kSpread.index[h]), both);
    lanes[h] = _mm512_or_si512(_mm512_and_si512(bytes, nibble), magic);
    lanes[2 + h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble), magic);
  }
  for (int r = 0; r < Rows; ++r) {
    uint32_t pair;  // x[r][k], x[r][k + 1]
    std::memcpy(&pair, x + r * K, sizeof pair);
    const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)lanes[i], xs);
  }
}

// One 64-row block of the weight times `Rows` rows of x (and of 16 x, for an 8-bit weight's high
// nibbles), written to out[r][the block's columns].
template <int Rows, bool Eight>
void block_product(const Weight& w, int64_t block, const uint16_t* x, const uint16_t* x16, const float* group_sums,
                   uint16_t* out) {
  const int64_t groups = w.K / kGroup, column = block * kBlockRows, row_bytes = w.K / 2;
  const uint8_t* low = w.packed + ((Eight ? w.N : 0) + column) * row_bytes;  // the last term: the low nibbles
  const uint8_t* high = w.packed + column * row_bytes;
  const uint32_t* scales_zeros = w.scales_zeros + block * groups * kBlockRows;
  __m512 result[Rows][4];
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) result[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Rows][4];
    for (int r = 0; r < Rows; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
      multiply_add<Rows>(low + k * (kBlockRows / 2), x + k, w.K, acc);
      if (Eight) multiply_add<Rows>(high + k * (kBlockRows / 2), x16 + k, w.K, acc);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512i pairs = _mm512_loadu_si512(scales_zeros + g * kBlockRows + 16 * i);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(kExcess[Eight]), scale, zero);
      for (int r = 0; r < Rows; ++r) {
        result[r][i] = _mm512_fmadd_ps(acc[r][i], scale, result[r][i]);
        result[r][i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(group_sums[r * groups + g]), result[r][i]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * w.N + column + kFirstRow[i]),
                          (__m256i)_mm512_cvtneps_pbh(result[r][i]));
}

using BlockProduct = void (*)(const Weight&, int64_t, const uint16_t*, const uint16_t*, const float*, uint16_t*);
constexpr BlockProduct kBlockProducts[2][kMaxRows + 1] = {
    {nullptr, block_product<1, false>, block_product<2, false>, block_product<3, false>, block_product<4, false>},
    {nullptr, block_product<1, true>, block_product<2, true>, block_product<3, true>, block_product<4, true>}};

float from_bfloat16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(0) <= 2,
              "int4_mm: packed must be (terms, N, K/2) uint8, one term or two");
  const int64_t M = x.size(0), K = x.size(1), terms = packed.size(0), N = packed.size(1);
  TORCH_CHECK(packed.size(2) * 2 == K && N % kBlockRows == 0 && K % kGroup == 0,
              "int4_mm: packed must be (terms, N, K/2) with N a multiple of 64 and K of 32");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 &&
                  scales_zeros.sizes() == at::IntArrayRef({1, N / kBlockRows, K / kGroup, kBlockRows, 2}),
              "int4_mm: scales_zeros must be (1, N/64, K/32, 64, 2) bfloat16");
  const auto xs = x.contiguous(), ps = packed.contiguous(), ss = scales_zeros.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr());
  std::vector<float> sums(M * (K / kGroup));  // each group's sum of x, in float32
  std::vector<uint16_t> x16(terms == 2 ? M * K : 0);  // 16 x in bfloat16 (exact), for high nibbles
  for (int64_t i = 0; i < M * K; ++i) {
    const float value = from_bfloat16(xp[i]);
    sums[i / kGroup] += value;
    if (terms == 2) {
      const float sixteen = 16.0f * value;
      uint32_t bits;
      std::memcpy(&bits, &sixteen, sizeof bits);
      x16[i] = static_cast<uint16_t>(bits >> 16);  // exact: only the exponent moved
    }
  }
  auto out = at::empty({M, N}, x.options());
  const Weight w{ps.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(ss.data_ptr()), terms == 2, N, K};
  const float* gp = sums.data();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const auto rows = std::min<int64_t>(kMaxRows, M - m);
        kBlockProducts[w.eight][rows](w, block, xp + m * K, x16.data() + (w.eight ? m * K : 0),
                                      gp + m * (K / kGroup), op + m * N);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvgen, m) { m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor"); }
TORCH_LIBRARY_IMPL(kvgen, CPU, m) { m.impl("int4_mm", int4_mm); }
