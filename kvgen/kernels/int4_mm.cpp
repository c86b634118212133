// kvgen::int4_mm: bfloat16 rows x times a weight of 4-bit values, of 5- to 7-bit ones as 4-bit
// values and a plane of their 1 to 3 high bits, or of 8-bit ones as two 4-bit terms (kvgen/quant.py)
// -> (M, N) bfloat16, each row computed alone (the same bits in any batch).
// The nibbles are in torch's CPU int4 layout; one scale and zero a group of 32 (or a scale alone,
// where the zeros are a symmetric type's: half a bit a weight less to read), laid out by blocks
// of 64 rows so that a block reads its own from one place (in torch's layout a large head's were a
// megabyte apart, group after group, and an 8-bit weight carried a pair per term).
//
// torch's own kernel widens every nibble to float32 and is bound by that arithmetic (about 17 GB/s
// of weights on two cores). Here two nibbles of a row become two bfloat16 lanes with a mask and an
// OR, and one vdpbf16ps multiplies 32 of them by x: the product streams the weights at about the
// speed of memory. An 8-bit weight's two nibbles become one 16-bit integer lane instead, multiplied
// by x rounded to 16-bit integers (vpdpwssd): one instruction for 32 weights, not two, where a
// batch makes the product compute-bound. Needs AVX-512 BF16, VNNI and VBMI; docs/speed.md has the
// figures.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kGroup = 32;      // values per scale and zero
constexpr int kBlockRows = 64;  // rows that one block of the layout interleaves
constexpr int kMaxRows = 8;     // rows of x multiplied per pass over a block: 1, 2, 4 or 8
// How far ahead of its reads the kernel asks for weights: the hardware's own prefetch left a
// weight larger than the cache streaming at ~60 % of memory speed.
constexpr int kAhead = 4096;

// bfloat16 with bits 0x4300 | v is 128 + v exactly (v < 128: its 7 bits of mantissa), so a value
// becomes a bfloat16 with one OR. A 4- to 7-bit weight is (v - middle) * scale + zero: the 128 +
// middle that 128 + v holds over v - middle comes off with each group's sum of x (middle 8 to 64).
// An 8-bit one, v = 16 * high + low, is two nibbles, joined into one integer lane (no 128 added):
// its middle is 136 (torch's two terms, each u - 8). A weight held with its scales alone has a
// symmetric type's zeros: w = 0 where v is 2^(bits - 1), its middle but for 8-bit values (128).
constexpr uint32_t kMagic = 0x43004300;

// How the part of a value above its low nibble is held: nowhere (4-bit values), in a plane of 1 to
// 3 bits a value, or as a second nibble (8-bit values).
enum High { kNone = 0, kOneBit = 1, kTwoBits = 2, kThreeBits = 3, kNibble = 4 };
constexpr float excess(int high, bool zeros) {
  return high == kNibble ? (zeros ? 136 : 128) : 128 + (8 << high);
}

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

// A block's rows in two halves, each the rows of one spread of its bytes: their low nibbles (rows
// 16h..16h+15) and high ones (rows 32 + 16h..), kFirstRow[h][0] and [1]. A pass over the block takes
// `Halves` of them from half `First`: both for up to 4 rows of x (16 accumulators), one at a time for
// 8 (16 again, where both would take all 32 registers). A pass's lane l holds the rows
// kFirstRow[First + l / 2][l % 2].
constexpr int kFirstRow[2][2] = {{0, 32}, {16, 48}};
template <int First>
constexpr int first_row(int lane) { return kFirstRow[First + lane / 2][lane % 2]; }

struct Weight {
  const uint8_t* packed;         // (terms, N, K/2): one term, or an 8-bit value's high and low nibbles
  const uint8_t* high;           // (N/64, K/2, bits, 4) 32-bit masks: the high bits of 5- to 7-bit values
  const uint16_t* scales;        // (N/64, K/32, 64) bfloat16 scales, or pairs of scale and zero
  int form;                      // a High
  bool zeros;                    // scales and zeros, not scales alone
  int64_t N, K;
};

// A pass's rows' 128 + v at columns k, k + 1 as bfloat16 pairs: v their nibbles (at `columns`) and,
// with `Bits`, 16 times their high bits. Those are masks (at `high`), one per bit and 16 rows, a bit
// per lane half (kvgen/quant.py `pack_high`): each adds its 16 or 32. Without `Magic`, v alone as
// 16-bit integers.
template <int First, int Halves, int Bits, bool Magic = true>
inline void spread(const uint8_t* columns, const uint8_t* high, __m512i (&lanes)[2 * Halves]) {
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(Magic ? kMagic : 0);
  const __mmask64 values_only = 0x5555555555555555ULL;  // the other bytes of each lane are zeroed
  // The pass that ends a block's second half asks for the weights ahead: from a first half's pass,
  // a large head read ~10 % slower.
  constexpr bool ask = First + Halves == 2;
  if constexpr (ask) _mm_prefetch(reinterpret_cast<const char*>(columns + kAhead), _MM_HINT_T0);
  const __m512i both = _mm512_loadu_si512(columns);
  for (int h = 0; h < Halves; ++h) {
    const __m512i bytes =
        _mm512_maskz_permutexvar_epi8(values_only, _mm512_load_si512(kSpread.index[First + h]), both);
    lanes[2 * h] = _mm512_or_si512(_mm512_and_si512(bytes, nibble), magic);
    lanes[2 * h + 1] = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), magic);  // the lane's other byte is 0
  }
  if constexpr (Bits > 0) {
    if constexpr (ask) _mm_prefetch(reinterpret_cast<const char*>(high + kAhead * Bits / 4), _MM_HINT_T0);
    uint32_t masks[Bits][4];  // per bit, for rows 0-15, 16-31, 32-47, 48-63
    std::memcpy(masks, high, sizeof masks);
    for (int b = 0; b < Bits; ++b)
      for (int l = 0; l < 2 * Halves; ++l)
        lanes[l] = _mm512_mask_add_epi16(lanes[l], _cvtu32_mask32(masks[b][first_row<First>(l) / 16]),
                                         lanes[l], _mm512_set1_epi16(16 << b));
  }
}

// A pass's rows of an 8-bit weight at columns k, k + 1 as pairs of 16-bit integers
// v = 16 * high + low, from its low and high nibbles (at `low` and `high`).
template <int First, int Halves>
inline void spread_bytes(const uint8_t* low, const uint8_t* high, __m512i (&lanes)[2 * Halves]) {
  __m512i highs[2 * Halves];
  spread<First, Halves, 0, false>(low, nullptr, lanes);
  spread<First, Halves, 0, false>(high, nullptr, highs);
  for (int l = 0; l < 2 * Halves; ++l) lanes[l] = _mm512_or_si512(lanes[l], _mm512_slli_epi16(highs[l], 4));
}

// acc[r][l] += a pass's rows' 128 + v at columns k, k + 1 (`spread`) times x[r][k, k + 1].
template <int Rows, int First, int Halves, int Bits>
inline void multiply_add(const uint8_t* columns, const uint8_t* high, const uint16_t* x, int64_t K,
                         __m512 (&acc)[Rows][2 * Halves]) {
  __m512i lanes[2 * Halves];
  spread<First, Halves, Bits>(columns, high, lanes);
  for (int r = 0; r < Rows; ++r) {
    uint32_t pair;  // x[r][k], x[r][k + 1]
    std::memcpy(&pair, x + r * K, sizeof pair);
    const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
    for (int l = 0; l < 2 * Halves; ++l) acc[r][l] = _mm512_dpbf16_ps(acc[r][l], (__m512bh)lanes[l], xs);
  }
}

// acc += pairs of 16-bit integers a times b, summed (vpdpwssd). In assembly: GCC 12's intrinsic copied
// every accumulator to a new register and spilled some, each step of the loop.
inline void dot_add(__m512i& acc, __m512i a, __m512i b) { asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)); }

// The same for an 8-bit weight, exact in integers: acc[r][l] += v at columns k, k + 1 times
// x[r][k, k + 1], x here 16-bit integers.
template <int Rows, int First, int Halves>
inline void multiply_add_bytes(const uint8_t* low, const uint8_t* high, const uint16_t* x, int64_t K,
                               __m512i (&acc)[Rows][2 * Halves]) {
  __m512i lanes[2 * Halves];
  spread_bytes<First, Halves>(low, high, lanes);
  for (int r = 0; r < Rows; ++r) {
    uint32_t pair;
    std::memcpy(&pair, x + r * K, sizeof pair);
    const __m512i xs = _mm512_set1_epi32(pair);
    for (int l = 0; l < 2 * Halves; ++l) dot_add(acc[r][l], lanes[l], xs);
  }
}

// Where a 64-row block's nibbles, high parts (an 8-bit value's high nibbles, or a plane) and scales start.
struct Block {
  const uint8_t *low, *high;
  const uint16_t* scales;
};
template <int Form, bool Zeros>
Block block_at(const Weight& w, int64_t block) {
  constexpr bool Eight = Form == kNibble;
  const int64_t column = block * kBlockRows, row_bytes = w.K / 2;
  return {w.packed + ((Eight ? w.N : 0) + column) * row_bytes,  // the last term: the low nibbles
          Eight ? w.packed + column * row_bytes : w.high + column * (w.K * Form / 8),
          w.scales + block * (w.K / kGroup) * kBlockRows * (Zeros ? 2 : 1)};
}

// Group g's scale and zero for rows first..first+15 of a block (`Block::scales`).
template <bool Zeros>
inline void scale_zero(const uint16_t* scales, int64_t g, int first, __m512& scale, __m512& zero) {
  zero = _mm512_setzero_ps();
  if constexpr (Zeros) {
    const __m512i pairs = _mm512_loadu_si512(scales + 2 * (g * kBlockRows + first));
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
  } else {
    const __m256i alone = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kBlockRows + first));
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(alone), 16));
  }
}

// Group g of a pass over a 64-row block times `Rows` rows of x, before the group's scales: acc[r][l] =
// the sum of (128 + v) x over the group for lane l's rows, or for an 8-bit weight of v x, x then
// 16-bit integers x * 2^e (`units[r * groups]` = 2^-e), their sums exact in 32-bit integers (< 2^28).
template <int Rows, int Form, int First, int Halves>
inline void group_product(const Block& b, int64_t g, const uint16_t* x, int64_t K, const float* units,
                          __m512 (&acc)[Rows][2 * Halves]) {
  const int64_t groups = K / kGroup;
  if constexpr (Form == kNibble) {
    __m512i sums[Rows][2 * Halves];
    for (int r = 0; r < Rows; ++r)
      for (int l = 0; l < 2 * Halves; ++l) sums[r][l] = _mm512_setzero_si512();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2)
      multiply_add_bytes<Rows, First, Halves>(b.low + k * (kBlockRows / 2), b.high + k * (kBlockRows / 2), x + k, K,
                                              sums);
    for (int r = 0; r < Rows; ++r)
      for (int l = 0; l < 2 * Halves; ++l)
        acc[r][l] = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[r][l]), _mm512_set1_ps(units[r * groups + g]));
  } else {
    for (int r = 0; r < Rows; ++r)
      for (int l = 0; l < 2 * Halves; ++l) acc[r][l] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2)
      multiply_add<Rows, First, Halves, Form>(b.low + k * (kBlockRows / 2), b.high + k * 8 * Form, x + k, K, acc);
  }
}

// result[r][row / 16] += group g of a pass over a block times `Rows` rows of x, scaled:
// `group_product` times the scales, and each group's sum of x (`sums[r][g]`) times its offsets.
template <int Rows, int Form, bool Zeros, int First, int Halves>
inline void add_group(const Block& b, int64_t g, const uint16_t* x, int64_t K, const float* units,
                      const float* sums, __m512 (&result)[Rows][4]) {
  const int64_t groups = K / kGroup;
  __m512 acc[Rows][2 * Halves];
  group_product<Rows, Form, First, Halves>(b, g, x, K, units, acc);
  for (int l = 0; l < 2 * Halves; ++l) {
    const int row = first_row<First>(l);
    __m512 scale, zero;
    scale_zero<Zeros>(b.scales, g, row, scale, zero);
    const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(excess(Form, Zeros)), scale, zero);
    for (int r = 0; r < Rows; ++r) {
      __m512& out = result[r][row / 16];
      out = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * groups + g]), _mm512_fmadd_ps(acc[r][l], scale, out));
    }
  }
}

// One 64-row block of the weight times `Rows` rows of x (bfloat16, or for an 8-bit weight integers
// and units: `group_product`), written to out[r][the block's columns]; `sums[r][g]` is each
// group's sum of x.
template <int Rows, int Form, bool Zeros>
void block_product(const Weight& w, int64_t block, const uint16_t* x, const float* units, const float* sums,
                   uint16_t* out) {
  const Block b = block_at<Form, Zeros>(w, block);
  __m512 result[Rows][4];
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) result[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.K / kGroup; ++g) {
    if constexpr (Rows <= 4) {
      add_group<Rows, Form, Zeros, 0, 2>(b, g, x, w.K, units, sums, result);
    } else {  // a group's bytes, 1 KB, stay in cache for the second half
      add_group<Rows, Form, Zeros, 0, 1>(b, g, x, w.K, units, sums, result);
      add_group<Rows, Form, Zeros, 1, 1>(b, g, x, w.K, units, sums, result);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * w.N + block * kBlockRows + 16 * i),
                          (__m256i)_mm512_cvtneps_pbh(result[r][i]));
}

// One 64-row block of the weight dequantized to bfloat16, column by column: out[k][the block's
// rows] (out's rows `stride` apart), each value (v - middle) * scale + zero with one rounding.
template <int Form, bool Zeros>
void block_dequantize(const Weight& w, int64_t block, uint16_t* out, int64_t stride) {
  const Block b = block_at<Form, Zeros>(w, block);
  for (int64_t g = 0; g < w.K / kGroup; ++g) {
    __m512 scale[4], zero[4];
    for (int l = 0; l < 4; ++l) scale_zero<Zeros>(b.scales, g, first_row<0>(l), scale[l], zero[l]);
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
      __m512i lanes[4];
      if constexpr (Form == kNibble)
        spread_bytes<0, 2>(b.low + k * (kBlockRows / 2), b.high + k * (kBlockRows / 2), lanes);
      else
        spread<0, 2, Form>(b.low + k * (kBlockRows / 2), b.high + k * 8 * Form, lanes);
      for (int l = 0; l < 4; ++l) {
        // Each lane: column k's value in its low half, column k + 1's in its high half (128 + v as
        // bfloat16, or an 8-bit weight's v as an integer).
        __m512 column[2];
        if constexpr (Form == kNibble)
          column[0] = _mm512_cvtepi32_ps(_mm512_and_si512(lanes[l], _mm512_set1_epi32(0xFFFF))),
          column[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(lanes[l], 16));
        else
          column[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lanes[l], 16)),
          column[1] = _mm512_castsi512_ps(_mm512_and_si512(lanes[l], _mm512_set1_epi32(0xFFFF0000)));
        for (int c = 0; c < 2; ++c) {  // v - middle is exact: small integers
          const __m512 value =
              _mm512_fmadd_ps(_mm512_sub_ps(column[c], _mm512_set1_ps(excess(Form, Zeros))), scale[l], zero[l]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (k + c) * stride + first_row<0>(l)),
                              (__m256i)_mm512_cvtneps_pbh(value));
        }
      }
    }
  }
}

using BlockProduct = void (*)(const Weight&, int64_t, const uint16_t*, const float*, const float*, uint16_t*);
using BlockDequantize = void (*)(const Weight&, int64_t, uint16_t*, int64_t);

// A weight's block functions, by its form and whether it has zeros: products by rows of x, and
// dequantization.
struct Functions {
  BlockProduct product[kMaxRows + 1];
  BlockDequantize dequantize;
};
template <int Form, bool Zeros>
constexpr Functions kFunctions = {
    {nullptr, block_product<1, Form, Zeros>, block_product<2, Form, Zeros>, nullptr, block_product<4, Form, Zeros>,
     nullptr, nullptr, nullptr, block_product<8, Form, Zeros>},
    block_dequantize<Form, Zeros>};
template <bool Zeros>
const Functions& functions_for(int form) {
  switch (form) {
    case kOneBit: return kFunctions<kOneBit, Zeros>;
    case kTwoBits: return kFunctions<kTwoBits, Zeros>;
    case kThreeBits: return kFunctions<kThreeBits, Zeros>;
    case kNibble: return kFunctions<kNibble, Zeros>;
    default: return kFunctions<kNone, Zeros>;
  }
}
const Functions& functions_for(const Weight& w) {
  return w.zeros ? functions_for<true>(w.form) : functions_for<false>(w.form);
}

// The weight's tensors, checked; they must stay alive (and contiguous) while it is used.
Weight weight_of(const at::Tensor& packed, const at::Tensor& scales_zeros, const at::Tensor& high) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(0) <= 2 && packed.is_contiguous(),
              "kvgen int4: packed must be contiguous (terms, N, K/2) uint8, one term or two");
  const int64_t terms = packed.size(0), N = packed.size(1), K = packed.size(2) * 2;
  TORCH_CHECK(N % kBlockRows == 0 && K % kGroup == 0, "kvgen int4: N must be a multiple of 64 and K of 32");
  const bool zeros = scales_zeros.dim() == 5;
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && (scales_zeros.dim() == 4 || zeros) &&
                  scales_zeros.is_contiguous() &&
                  scales_zeros.sizes().slice(0, 4) == at::IntArrayRef({1, N / kBlockRows, K / kGroup, kBlockRows}) &&
                  (!zeros || scales_zeros.size(4) == 2),
              "kvgen int4: scales_zeros must be (1, N/64, K/32, 64) bfloat16 scales, or (..., 2) scales and zeros");
  const int64_t high_bits = high.numel() == 0 ? 0 : high.size(-1) * 8 / K;
  TORCH_CHECK(high.scalar_type() == at::kByte && high.is_contiguous() &&
                  (high.numel() == 0 || (terms == 1 && high_bits <= 3 &&
                                         high.sizes() == at::IntArrayRef({N, K * high_bits / 8}))),
              "kvgen int4: high must be empty, or (N, K * bits / 8) uint8 beside one term, bits 1 to 3");
  return {packed.data_ptr<uint8_t>(), high.data_ptr<uint8_t>(),
          reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr()),
          terms == 2 ? kNibble : static_cast<int>(high_bits), zeros, N, K};
}

// x as `block_product` reads it: each group's sum, and for an 8-bit weight 16-bit integers and their
// units. A group's integers are x * 2^e with e as large as keeps its largest below 2^15: that one
// exact (8 significant bits), each smaller value rounded to the nearest multiple of 2^-e, an error
// at most 2^-15 of the largest; the products and their sums are then exact in 32-bit integers.
struct Input {
  std::vector<uint16_t> integers;
  std::vector<float> units, sums;
};
Input input_for(const uint16_t* x, int64_t M, int64_t K, bool integers) {
  const int64_t groups = M * (K / kGroup);
  Input in{std::vector<uint16_t>(integers ? M * K : 0), std::vector<float>(integers ? groups : 0),
           std::vector<float>(groups)};
  for (int64_t g = 0; g < groups; ++g) {
    __m512 halves[2];
    bool finite = true;
    for (int h = 0; h < 2; ++h) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kGroup + 16 * h));
      const __m256i exponent = _mm256_set1_epi16(0x7F80);  // all ones: infinite or NaN
      finite = finite && !_mm256_cmpeq_epi16_mask(_mm256_and_si256(bits, exponent), exponent);
      halves[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    if (!integers) {
      in.sums[g] = _mm512_reduce_add_ps(_mm512_add_ps(halves[0], halves[1]));
      continue;
    }
    if (!finite) {  // no integers for it: the row's products are NaN
      in.units[g] = in.sums[g] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(halves[0]), _mm512_abs_ps(halves[1])));
    int exponent = 0;  // largest = m * 2^exponent, 0.5 <= m < 1
    std::frexp(largest, &exponent);
    const int e = largest > 0 ? std::min(15 - exponent, 120) : 0;
    const __m512 scale = _mm512_set1_ps(std::ldexp(1.0f, e));
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {  // multiplying by 2^e is exact; rounding to integers, to the nearest even
      const __m512i values = _mm512_cvtps_epi32(_mm512_mul_ps(halves[h], scale));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(in.integers.data() + g * kGroup + 16 * h),
                          _mm512_cvtepi32_epi16(values));
      sum = _mm512_add_epi32(sum, values);
    }
    in.units[g] = std::ldexp(1.0f, -e);
    in.sums[g] = std::ldexp(static_cast<float>(_mm512_reduce_add_epi32(sum)), -e);  // exact: |sum| < 2^20
  }
  return in;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                   const at::Tensor& high) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  const auto xs = x.contiguous();
  const Weight w = weight_of(packed, scales_zeros, high);
  const int64_t M = x.size(0), K = w.K, N = w.N, groups = K / kGroup;
  TORCH_CHECK(x.size(1) == K, "int4_mm: x must have as many columns as the weight");
  const bool integers = w.form == kNibble;
  const Input in = input_for(reinterpret_cast<const uint16_t*>(xs.data_ptr()), M, K, integers);
  const uint16_t* xp = integers ? in.integers.data() : reinterpret_cast<const uint16_t*>(xs.data_ptr());
  auto out = at::empty({M, N}, x.options());
  const BlockProduct* products = functions_for(w).product;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t m = 0, rows; m < M; m += rows) {
        rows = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        products[rows](w, block, xp + m * K, integers ? in.units.data() + m * groups : nullptr,
                       in.sums.data() + m * groups, op + m * N);
      }
  });
  return out;
}

// Rows start:start + out.size(1) of the weight (start a multiple of 64), dequantized into `out`
// (K, rows) bfloat16: transposed, as the layout holds them, for a prompt's matrix product.
void int4_dequantize(const at::Tensor& packed, const at::Tensor& scales_zeros, const at::Tensor& high, int64_t start,
                     at::Tensor& out) {
  const Weight w = weight_of(packed, scales_zeros, high);
  const int64_t rows = out.size(1);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.size(0) == w.K,
              "int4_dequantize: out must be contiguous (K, rows) bfloat16");
  TORCH_CHECK(start % kBlockRows == 0 && rows % kBlockRows == 0 && start + rows <= w.N,
              "int4_dequantize: rows must be whole blocks of 64 within the weight");
  const BlockDequantize dequantize = functions_for(w).dequantize;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(start / kBlockRows, (start + rows) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      dequantize(w, block, op + block * kBlockRows - start, rows);
  });
}

}  // namespace

TORCH_LIBRARY(kvgen, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros, Tensor high) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scales_zeros, Tensor high, int start, Tensor(a!) out) -> ()");
}
TORCH_LIBRARY_IMPL(kvgen, CPU, m) {
  m.impl("int4_mm", int4_mm);
  m.impl("int4_dequantize", int4_dequantize);
}
