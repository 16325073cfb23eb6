// CPU twin of the CUDA mask search: hardware popcount over 64-bit words, the bank split across
// threads, each thread keeping its own best, then a reduction that prefers the lower index on ties.
//
// The bank is the only large operand (10k masks of 14336 bits = 18 MB), so the kernel streams it
// once per call: each bank row is compared with a group of queries while it sits in L1, and the
// word loop keeps four independent accumulators so popcounts of consecutive words overlap.
// x86-64 builds carry an AVX-512 variant (VPOPCNTDQ: one popcount instruction per 512 bits, found
// on Ice Lake and later Xeons and on Zen 4/5 EPYCs) and an AVX2 variant (nibble-table popcount, 256
// bits per step), chosen at run time, so one binary runs on any x86-64 CPU and uses the widest
// popcount it has. With AVX2 alone a single core is compute-bound near 30 GB/s on Zen 5, below
// what its memory delivers; VPOPCNTDQ needs a quarter of the instructions.
#include "mask_search.h"

#include <cstddef>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MEMOIR_X86 1
#endif

namespace {

struct Best {
  int32_t overlap = 0;
  int64_t index = -1;
};

inline int64_t popcount64(uint64_t x) { return __builtin_popcountll(x); }

int32_t overlap_scalar(const int64_t* q, const int64_t* m, int64_t words) {
  int64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  int64_t w = 0;
  for (; w + 4 <= words; w += 4) {
    c0 += popcount64(static_cast<uint64_t>(q[w] & m[w]));
    c1 += popcount64(static_cast<uint64_t>(q[w + 1] & m[w + 1]));
    c2 += popcount64(static_cast<uint64_t>(q[w + 2] & m[w + 2]));
    c3 += popcount64(static_cast<uint64_t>(q[w + 3] & m[w + 3]));
  }
  for (; w < words; ++w) c0 += popcount64(static_cast<uint64_t>(q[w] & m[w]));
  return static_cast<int32_t>(c0 + c1 + c2 + c3);
}

#ifdef MEMOIR_X86
// Popcount of 256-bit lanes with the nibble lookup table (pshufb), summed per byte and widened to
// 64-bit counters with psadbw every step: byte counts never exceed 8, so no overflow.
__attribute__((target("avx2"))) int32_t overlap_avx2(const int64_t* q, const int64_t* m, int64_t words) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                         2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i total0 = zero, total1 = zero;
  int64_t w = 0;
  for (; w + 8 <= words; w += 8) {
    const __m256i a0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + w)),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + w)));
    const __m256i a1 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + w + 4)),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + w + 4)));
    const __m256i p0 = _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(a0, low)),
                                       _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(a0, 4), low)));
    const __m256i p1 = _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(a1, low)),
                                       _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(a1, 4), low)));
    total0 = _mm256_add_epi64(total0, _mm256_sad_epu8(p0, zero));
    total1 = _mm256_add_epi64(total1, _mm256_sad_epu8(p1, zero));
  }
  const __m256i total = _mm256_add_epi64(total0, total1);
  int64_t count = _mm256_extract_epi64(total, 0) + _mm256_extract_epi64(total, 1) + _mm256_extract_epi64(total, 2) +
                  _mm256_extract_epi64(total, 3);
  for (; w < words; ++w) count += popcount64(static_cast<uint64_t>(q[w] & m[w]));
  return static_cast<int32_t>(count);
}

// Two accumulators of eight 64-bit counts; the tail (words % 8, 224 % 8 = 0 for D = 14336) goes
// through a masked load, which reads nothing past the row.
__attribute__((target("avx512f,avx512vpopcntdq"))) int32_t overlap_avx512(const int64_t* q, const int64_t* m,
                                                                         int64_t words) {
  __m512i total0 = _mm512_setzero_si512(), total1 = _mm512_setzero_si512();
  int64_t w = 0;
  for (; w + 16 <= words; w += 16) {
    total0 = _mm512_add_epi64(total0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(q + w),
                                                                           _mm512_loadu_si512(m + w))));
    total1 = _mm512_add_epi64(total1, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(q + w + 8),
                                                                           _mm512_loadu_si512(m + w + 8))));
  }
  for (; w < words; w += 8) {
    const __mmask8 lanes = words - w >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << (words - w)) - 1);
    total0 = _mm512_add_epi64(total0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_maskz_loadu_epi64(lanes, q + w),
                                                                           _mm512_maskz_loadu_epi64(lanes, m + w))));
  }
  return static_cast<int32_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(total0, total1)));
}

__attribute__((target("popcnt"))) int32_t overlap_popcnt(const int64_t* q, const int64_t* m, int64_t words) {
  return overlap_scalar(q, m, words);
}
#endif

using OverlapFn = int32_t (*)(const int64_t*, const int64_t*, int64_t);

// The variant's function if this CPU can run it, else nullptr (numbering: mask_search.h).
OverlapFn overlap_variant(int variant) {
  if (variant == MEMOIR_POPCOUNT_SCALAR) return overlap_scalar;
#ifdef MEMOIR_X86
  __builtin_cpu_init();
  if (variant == MEMOIR_POPCOUNT_POPCNT && __builtin_cpu_supports("popcnt")) return overlap_popcnt;
  if (variant == MEMOIR_POPCOUNT_AVX2 && __builtin_cpu_supports("avx2")) return overlap_avx2;
  if (variant == MEMOIR_POPCOUNT_AVX512 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    return overlap_avx512;
#endif
  return nullptr;
}

int pick_variant() {
  for (int variant = MEMOIR_POPCOUNT_AVX512; variant > MEMOIR_POPCOUNT_SCALAR; --variant)
    if (overlap_variant(variant) != nullptr) return variant;
  return MEMOIR_POPCOUNT_SCALAR;
}

const int kVariant = pick_variant();
const OverlapFn kOverlap = overlap_variant(kVariant);

// Scan bank rows [begin, end) for `count` queries at once, so each bank row is read from memory
// once per group of queries rather than once per query. Strictly greater keeps the lowest index.
void scan_range(const int64_t* query, const int64_t* bank, int64_t count, int64_t words, int64_t begin,
                int64_t end, Best* best) {
  for (int64_t n = begin; n < end; ++n) {
    const int64_t* row = bank + n * words;
    for (int64_t b = 0; b < count; ++b) {
      const int32_t value = kOverlap(query + b * words, row, words);
      if (best[b].index < 0 || value > best[b].overlap) {
        best[b].overlap = value;
        best[b].index = n;
      }
    }
  }
}

// Queries compared with one bank row while it is in L1 (8 x 1792-byte queries = 14 KB).
constexpr int64_t kQueryGroup = 8;
// Below this many bank words a single thread is faster than waking the pool.
constexpr int64_t kMinWordsPerThread = 1 << 15;

}  // namespace

extern "C" int memoir_search_threads(int num_threads, int64_t num_masks, int64_t words, int64_t batch) {
#ifdef _OPENMP
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  int threads = 1;
  (void)num_threads;
#endif
  const int64_t work = num_masks * words * (batch < kQueryGroup ? batch : kQueryGroup);
  if (work / kMinWordsPerThread < threads) threads = static_cast<int>(work / kMinWordsPerThread > 1 ? work / kMinWordsPerThread : 1);
  return threads;
}

extern "C" void memoir_mask_search_cpu(const int64_t* query, const int64_t* bank, int64_t batch,
                                       int64_t num_masks, int64_t words, int64_t* index, int32_t* overlap,
                                       int num_threads) {
  for (int64_t b = 0; b < batch; ++b) {
    index[b] = -1;
    overlap[b] = 0;
  }
  if (num_masks <= 0 || batch <= 0) return;
  const int threads = memoir_search_threads(num_threads, num_masks, words, batch);
  // Each thread owns a contiguous slice of the bank, so slices are ordered by index and the
  // reduction below can resolve ties by slice order.
  const int64_t slices = threads < num_masks ? threads : num_masks;
  std::vector<Best> partial(static_cast<std::size_t>(slices * batch));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t begin = num_masks * s / slices;
    const int64_t end = num_masks * (s + 1) / slices;
    for (int64_t g = 0; g < batch; g += kQueryGroup) {
      const int64_t count = batch - g < kQueryGroup ? batch - g : kQueryGroup;
      scan_range(query + g * words, bank, count, words, begin, end, partial.data() + s * batch + g);
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < slices; ++s) {
      const Best& candidate = partial[s * batch + b];
      if (candidate.index >= 0 && (index[b] < 0 || candidate.overlap > overlap[b])) {
        index[b] = candidate.index;
        overlap[b] = candidate.overlap;
      }
    }
  }
}

extern "C" int32_t memoir_overlap_variant(int variant, const int64_t* query, const int64_t* mask, int64_t words) {
  const OverlapFn overlap = overlap_variant(variant);
  return overlap == nullptr ? -1 : overlap(query, mask, words);
}

extern "C" int memoir_overlap_variant_in_use(void) { return kVariant; }

// kOverlap is set during this file's static initialisation; a caller from another file's static
// initialiser could run first and would see nullptr, so pick the variant again in that case.
extern "C" memoir_overlap_fn memoir_overlap_function(void) {
  return kOverlap != nullptr ? kOverlap : overlap_variant(pick_variant());
}
