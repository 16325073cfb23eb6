// CPU top-r mask search: for each query the r bank rows with the largest popcount(q AND m), ordered
// by overlap descending, ties to the lower index; entries past the bank's rows are (-1, 0).
//
// Same shape as memoir_mask_search_cpu: the bank is split into contiguous slices, one per thread;
// each thread streams its slice once, scoring every row against a group of queries while the row
// sits in L1, and keeps a running top-r per query. The slices' lists are then merged per query.
// The popcount is the one mask_search_cpu.cpp picked for this CPU (memoir_overlap_function), so
// both searches count alike.
//
// Running list rule: rows are visited in increasing index, so a new row enters a full list only
// with an overlap strictly greater than the list's last entry, and is placed after every held entry
// of equal overlap (those have lower indices). The merge compares (overlap desc, index asc), a total
// order because indices are distinct, so the result does not depend on the number of threads.
#include "mask_search.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Entry {
  int32_t overlap;
  int64_t index;
};

inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.overlap > b.overlap || (a.overlap == b.overlap && a.index < b.index);
}

// Offer row n, whose index is larger than every index in `list`, with overlap `value`. `list` holds
// `count` entries best first and has room for `capacity`.
inline void offer(Entry* list, int64_t& count, int64_t capacity, int32_t value, int64_t n) {
  int64_t pos;
  if (count == capacity) {
    if (value <= list[capacity - 1].overlap) return;  // equal: the held row has the lower index
    pos = capacity - 1;                              // the last entry drops out
  } else {
    pos = count++;
  }
  while (pos > 0 && list[pos - 1].overlap < value) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = Entry{value, n};
}

// Queries compared with one bank row while it is in L1 (as in mask_search_cpu.cpp).
constexpr int64_t kQueryGroup = 8;


}  // namespace

extern "C" void memoir_mask_search_topk_cpu(const int64_t* query, const int64_t* bank, int64_t batch,
                                            int64_t num_masks, int64_t words, int64_t r, int64_t* index,
                                            int32_t* overlap, int num_threads) {
  if (batch <= 0 || r <= 0) return;
  for (int64_t i = 0; i < batch * r; ++i) {
    index[i] = -1;
    overlap[i] = 0;
  }
  if (num_masks <= 0) return;
  const memoir_overlap_fn score = memoir_overlap_function();
  int threads = memoir_search_threads(num_threads, num_masks, words, batch);
  const int64_t slices = threads < num_masks ? threads : num_masks;
  // A list never holds more rows than the bank has.
  const int64_t capacity = r < num_masks ? r : num_masks;
  std::vector<Entry> lists(static_cast<std::size_t>(slices * batch * capacity));
  std::vector<int64_t> counts(static_cast<std::size_t>(slices * batch), 0);

#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t begin = num_masks * s / slices;
    const int64_t end = num_masks * (s + 1) / slices;
    Entry* slice_lists = lists.data() + s * batch * capacity;
    int64_t* slice_counts = counts.data() + s * batch;
    for (int64_t g = 0; g < batch; g += kQueryGroup) {
      const int64_t group = batch - g < kQueryGroup ? batch - g : kQueryGroup;
      for (int64_t n = begin; n < end; ++n) {
        const int64_t* row = bank + n * words;
        for (int64_t b = g; b < g + group; ++b) {
          offer(slice_lists + b * capacity, slice_counts[b], capacity, score(query + b * words, row, words), n);
        }
      }
    }
  }

  // Merge the slices' lists per query and keep the first r (fewer when the bank is smaller).
  std::vector<Entry> candidates;
  candidates.reserve(static_cast<std::size_t>(slices * capacity));
  for (int64_t b = 0; b < batch; ++b) {
    candidates.clear();
    for (int64_t s = 0; s < slices; ++s) {
      const Entry* list = lists.data() + (s * batch + b) * capacity;
      candidates.insert(candidates.end(), list, list + counts[s * batch + b]);
    }
    const auto keep = static_cast<std::ptrdiff_t>(std::min<int64_t>(r, static_cast<int64_t>(candidates.size())));
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), ranks_before);
    for (std::ptrdiff_t j = 0; j < keep; ++j) {
      index[b * r + j] = candidates[static_cast<std::size_t>(j)].index;
      overlap[b * r + j] = candidates[static_cast<std::size_t>(j)].overlap;
    }
  }
}
