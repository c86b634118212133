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

// bfloat16 with bits 0x4300 | v is 128 + v exactly (v < 128: its 7 bits of mantissa), so a value
// becomes a bfloat16 with one OR. A 4- to 7-bit weight is (v - middle) * scale + zero: the 128 +
// middle that 128 + v holds over v - middle comes off with each group's sum of x (middle 8 to 64).
// An 8-bit one, v = 16 * high + low, is two nibbles: its high ones multiply 16 * x (exact in
// bfloat16) into the same sums, and 16 * 128 + 128 + 136 comes off (136: torch's two terms, each u - 8).
// A weight held with its scales alone has a symmetric type's zeros: w = 0 where v is 2^(bits - 1),
// its middle but for 8-bit values (128, not 136).
constexpr uint32_t kMagic = 0x43004300;

// How the part of a value above its low nibble is held: nowhere (4-bit values), in a plane of 1 to
// 3 bits a value, or as a second nibble (8-bit values).
enum High { kNone = 0, kOneBit = 1, kTwoBits = 2, kThreeBits = 3, kNibble = 4 };
constexpr float excess(int high, bool zeros) {
  return high == kNibble ? 16 * 128 + 128 + (zeros ? 136 : 128) : 128 + (8 << high);
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

// Accumulator i holds 16 rows from the block's 16 i-th: the low nibbles of the first and second
// spread (rows 0-15, 16-31), then their high nibbles (rows 32-47, 48-63).
constexpr int kFirstRow[4] = {0, 16, 32, 48};

struct Weight {
  const uint8_t* packed;         // (terms, N, K/2): one term, or an 8-bit value's high and low nibbles
  const uint8_t* high;           // (N/64, K/2, bits, 4) 32-bit masks: the high bits of 5- to 7-bit values
  const uint16_t* scales;        // (N/64, K/32, 64) bfloat16 scales, or pairs of scale and zero
  int form;                      // a High
  bool zeros;                    // scales and zeros, not scales alone
  int64_t N, K;
};

// The 64 rows' 128 + v at columns k, k + 1 as bfloat16 pairs, lanes[i] rows 16i..16i+15: v their
// nibbles (at `columns`) and, with `Bits`, 16 times their high bits. Those are masks (at `high`), one
// per bit and accumulator, a bit per lane half (kvgen/quant.py `pack_high`): each adds its 16 or 32.
template <int Bits>
inline void spread(const uint8_t* columns, const uint8_t* high, __m512i (&lanes)[4]) {
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(kMagic);
  const __mmask64 values_only = 0x5555555555555555ULL;  // the other bytes of each lane are zeroed
  _mm_prefetch(reinterpret_cast<const char*>(columns + kAhead), _MM_HINT_T0);
  const __m512i both = _mm512_loadu_si512(columns);
  for (int h = 0; h < 2; ++h) {
    const __m512i bytes = _mm512_maskz_permutexvar_epi8(values_only, _mm512_load_si512(kSpread.index[h]), both);
    lanes[h] = _mm512_or_si512(_mm512_and_si512(bytes, nibble), magic);
    lanes[2 + h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble), magic);
  }
  if constexpr (Bits > 0) {
    _mm_prefetch(reinterpret_cast<const char*>(high + kAhead * Bits / 4), _MM_HINT_T0);
    uint32_t masks[Bits][4];
    std::memcpy(masks, high, sizeof masks);
    for (int b = 0; b < Bits; ++b)
      for (int i = 0; i < 4; ++i)
        lanes[i] = _mm512_mask_add_epi16(lanes[i], _cvtu32_mask32(masks[b][i]), lanes[i], _mm512_set1_epi16(16 << b));
  }
}

// acc[r][i] += the 64 rows' 128 + v at columns k, k + 1 (`spread`) times x[r][k, k + 1].
template <int Rows, int Bits>
inline void multiply_add(const uint8_t* columns, const uint8_t* high, const uint16_t* x, int64_t K,
                         __m512 (&acc)[Rows][4]) {
  __m512i lanes[4];
  spread<Bits>(columns, high, lanes);
  for (int r = 0; r < Rows; ++r) {
    uint32_t pair;  // x[r][k], x[r][k + 1]
    std::memcpy(&pair, x + r * K, sizeof pair);
    const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)lanes[i], xs);
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

// Group g's scale and zero for rows 16i..16i+15 of a block (`Block::scales`).
template <bool Zeros>
inline void scale_zero(const uint16_t* scales, int64_t g, int i, __m512& scale, __m512& zero) {
  zero = _mm512_setzero_ps();
  if constexpr (Zeros) {
    const __m512i pairs = _mm512_loadu_si512(scales + 2 * (g * kBlockRows + 16 * i));
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
  } else {
    const __m256i alone = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kBlockRows + 16 * i));
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(alone), 16));
  }
}

// One 64-row block of the weight times `Rows` rows of x (and of 16 x, for an 8-bit weight's high
// nibbles), written to out[r][the block's columns].
template <int Rows, int Form, bool Zeros>
void block_product(const Weight& w, int64_t block, const uint16_t* x, const uint16_t* x16, const float* group_sums,
                   uint16_t* out) {
  constexpr bool Eight = Form == kNibble;
  const int64_t groups = w.K / kGroup, column = block * kBlockRows;
  const auto [low, high, scales] = block_at<Form, Zeros>(w, block);
  __m512 result[Rows][4];
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < 4; ++i) result[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Rows][4];
    for (int r = 0; r < Rows; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
      if constexpr (Eight) {
        multiply_add<Rows, 0>(low + k * (kBlockRows / 2), nullptr, x + k, w.K, acc);
        multiply_add<Rows, 0>(high + k * (kBlockRows / 2), nullptr, x16 + k, w.K, acc);
      } else {
        multiply_add<Rows, Form>(low + k * (kBlockRows / 2), high + k * 8 * Form, x + k, w.K, acc);
      }
    }
    for (int i = 0; i < 4; ++i) {
      __m512 scale, zero;
      scale_zero<Zeros>(scales, g, i, scale, zero);
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(excess(Form, Zeros)), scale, zero);
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

// One 64-row block of the weight dequantized to bfloat16, column by column: out[k][the block's rows]
// (out's rows `stride` apart), each value (v - middle) * scale + zero with one rounding.
template <int Form, bool Zeros>
void block_dequantize(const Weight& w, int64_t block, uint16_t* out, int64_t stride) {
  constexpr bool Eight = Form == kNibble;
  const auto [low, high, scales] = block_at<Form, Zeros>(w, block);
  const __m512 excess_ = _mm512_set1_ps(excess(Form, Zeros)), sixteen = _mm512_set1_ps(16.0f);
  const __m512i upper = _mm512_set1_epi32(0xFFFF0000);
  for (int64_t g = 0; g < w.K / kGroup; ++g) {
    __m512 scale[4], zero[4];
    for (int i = 0; i < 4; ++i) scale_zero<Zeros>(scales, g, i, scale[i], zero[i]);
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
      __m512i lanes[4], highs[4];
      if constexpr (Eight) {
        spread<0>(low + k * (kBlockRows / 2), nullptr, lanes);
        spread<0>(high + k * (kBlockRows / 2), nullptr, highs);
      } else {
        spread<Form>(low + k * (kBlockRows / 2), high + k * 8 * Form, lanes);
      }
      for (int i = 0; i < 4; ++i) {
        // Each lane: column k's 128 + v in its low half, column k + 1's in its high half.
        __m512 column[2] = {_mm512_castsi512_ps(_mm512_slli_epi32(lanes[i], 16)),
                            _mm512_castsi512_ps(_mm512_and_si512(lanes[i], upper))};
        if constexpr (Eight) {
          column[0] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(highs[i], 16)), sixteen, column[0]);
          column[1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(highs[i], upper)), sixteen, column[1]);
        }
        for (int c = 0; c < 2; ++c) {  // v - middle is exact: small integers
          const __m512 value = _mm512_fmadd_ps(_mm512_sub_ps(column[c], excess_), scale[i], zero[i]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (k + c) * stride + kFirstRow[i]),
                              (__m256i)_mm512_cvtneps_pbh(value));
        }
      }
    }
  }
}

using BlockProduct = void (*)(const Weight&, int64_t, const uint16_t*, const uint16_t*, const float*, uint16_t*);
using BlockDequantize = void (*)(const Weight&, int64_t, uint16_t*, int64_t);

// A weight's block functions, by its form and whether it has zeros: products by rows of x, and
// dequantization.
struct Functions {
  BlockProduct product[kMaxRows + 1];
  BlockDequantize dequantize;
};
template <int Form, bool Zeros>
constexpr Functions kFunctions = {
    {nullptr, block_product<1, Form, Zeros>, block_product<2, Form, Zeros>, block_product<3, Form, Zeros>,
     block_product<4, Form, Zeros>},
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

float from_bfloat16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
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

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                   const at::Tensor& high) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  const auto xs = x.contiguous();
  const Weight w = weight_of(packed, scales_zeros, high);
  const int64_t M = x.size(0), K = w.K, N = w.N, form = w.form;
  TORCH_CHECK(x.size(1) == K, "int4_mm: x must have as many columns as the weight");
  const auto* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr());
  std::vector<float> sums(M * (K / kGroup));  // each group's sum of x, in float32
  std::vector<uint16_t> x16(form == kNibble ? M * K : 0);  // 16 x in bfloat16 (exact), for high nibbles
  for (int64_t i = 0; i < M * K; ++i) {
    const float value = from_bfloat16(xp[i]);
    sums[i / kGroup] += value;
    if (form == kNibble) {
      const float sixteen = 16.0f * value;
      uint32_t bits;
      std::memcpy(&bits, &sixteen, sizeof bits);
      x16[i] = static_cast<uint16_t>(bits >> 16);  // exact: only the exponent moved
    }
  }
  auto out = at::empty({M, N}, x.options());
  const BlockProduct* products = functions_for(w).product;
  const float* gp = sums.data();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const auto rows = std::min<int64_t>(kMaxRows, M - m);
        products[rows](w, block, xp + m * K, x16.data() + (form == kNibble ? m * K : 0), gp + m * (K / kGroup),
                       op + m * N);
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
