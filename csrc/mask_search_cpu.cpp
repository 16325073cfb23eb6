// CPU twin of the CUDA mask search: hardware popcount over 64-bit words, the bank split across
// threads, each thread keeping its own best, then a reduction that prefers the lower index on ties.
#include "mask_search.h"

#include <cstddef>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Best {
  int32_t overlap = 0;
  int64_t index = -1;
};

inline int32_t overlap_of(const int64_t* q, const int64_t* m, int64_t words) {
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) {
    total += __builtin_popcountll(static_cast<uint64_t>(q[w] & m[w]));
  }
  return static_cast<int32_t>(total);
}

// Scan bank rows [begin, end) for `count` queries at once, so each bank row is read from memory
// once per group of queries rather than once per query.
void scan_range(const int64_t* query, const int64_t* bank, int64_t count, int64_t words, int64_t begin,
                int64_t end, Best* best) {
  for (int64_t n = begin; n < end; ++n) {
    const int64_t* row = bank + n * words;
    for (int64_t b = 0; b < count; ++b) {
      const int32_t value = overlap_of(query + b * words, row, words);
      if (best[b].index < 0 || value > best[b].overlap) {
        best[b].overlap = value;
        best[b].index = n;
      }
    }
  }
}

constexpr int64_t kQueryGroup = 8;

}  // namespace

extern "C" void memoir_mask_search_cpu(const int64_t* query, const int64_t* bank, int64_t batch,
                                       int64_t num_masks, int64_t words, int64_t* index, int32_t* overlap,
                                       int num_threads) {
  for (int64_t b = 0; b < batch; ++b) {
    index[b] = -1;
    overlap[b] = 0;
  }
  if (num_masks <= 0 || batch <= 0) return;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int threads = 1;
  (void)num_threads;
#endif
  // Each thread owns a contiguous slice of the bank, so slices are ordered by index and the
  // reduction below can resolve ties by slice order.
  const int64_t slices = threads < num_masks ? threads : num_masks;
  std::vector<Best> partial(static_cast<std::size_t>(slices * batch));
#pragma omp parallel for num_threads(threads) schedule(static)
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
