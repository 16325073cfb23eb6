// ctest: the CPU mask search (arg-max and top-r) against brute-force loops written independently here.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "mask_search.h"

static int brute_force(const std::vector<int64_t>& q, const std::vector<int64_t>& bank, int64_t n, int64_t words,
                       int64_t* best_index) {
  int best = -1;
  *best_index = -1;
  for (int64_t i = 0; i < n; ++i) {
    int count = 0;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t x = static_cast<uint64_t>(q[w] & bank[i * words + w]);
      while (x) {
        x &= x - 1;
        ++count;
      }
    }
    if (count > best) {
      best = count;
      *best_index = i;
    }
  }
  return best < 0 ? 0 : best;
}

static int popcount_and(const int64_t* q, const int64_t* m, int64_t words) {
  int count = 0;
  for (int64_t w = 0; w < words; ++w)
    for (uint64_t x = static_cast<uint64_t>(q[w] & m[w]); x; x &= x - 1) ++count;
  return count;
}

// Every popcount variant this CPU runs, on every length that exercises its unrolled loop and its
// tail (0-40 words, and 224 = D 14336), from an offset that leaves the rows unaligned.
static int check_variants(std::mt19937_64& rng) {
  int failures = 0;
  std::vector<int64_t> q(241), m(241);
  for (auto& w : q) w = static_cast<int64_t>(rng());
  for (auto& w : m) w = static_cast<int64_t>(rng());
  for (int variant = MEMOIR_POPCOUNT_SCALAR; variant <= MEMOIR_POPCOUNT_AVX512; ++variant) {
    if (memoir_overlap_variant(variant, q.data(), m.data(), 1) < 0) {
      std::printf("popcount variant %d: not supported by this CPU\n", variant);
      continue;
    }
    for (int64_t words = 0; words <= 224; words += words < 40 ? 1 : 184) {
      const int got = memoir_overlap_variant(variant, q.data() + 1, m.data() + 1, words);
      const int want = popcount_and(q.data() + 1, m.data() + 1, words);
      if (got != want) {
        std::printf("popcount variant %d, %lld words: got %d want %d\n", variant, (long long)words, got, want);
        ++failures;
      }
    }
  }
  std::printf("popcount variant in use: %d\n", memoir_overlap_variant_in_use());
  return failures;
}

// Top-r by brute force: every row's overlap, then a stable sort of the row numbers by overlap
// descending (equal overlaps keep ascending row order), the first r kept, (-1, 0) past the bank.
static int check_topk(std::mt19937_64& rng) {
  int failures = 0;
  const int64_t words = 3;
  const int64_t batch = 11;
  // 6000 rows x 3 words x 8 queries is enough work for the kernel to use 4 slices when asked.
  for (int64_t n : {0, 1, 5, 64, 6000}) {
    std::vector<int64_t> bank(static_cast<std::size_t>(n * words));
    for (auto& w : bank) w = static_cast<int64_t>(rng() & rng() & rng() & rng());  // sparse: many ties
    std::vector<int64_t> query(static_cast<std::size_t>(batch * words));
    for (auto& w : query) w = static_cast<int64_t>(rng() & rng());
    for (int64_t r : {1, 3, 8, 70}) {
      std::vector<int64_t> index(static_cast<std::size_t>(batch * r));
      std::vector<int32_t> overlap(static_cast<std::size_t>(batch * r));
      for (int threads : {1, 4}) {
        memoir_mask_search_topk_cpu(query.data(), bank.data(), batch, n, words, r, index.data(), overlap.data(),
                                    threads);
        for (int64_t b = 0; b < batch; ++b) {
          std::vector<int> value(static_cast<std::size_t>(n));
          for (int64_t i = 0; i < n; ++i) value[i] = popcount_and(&query[b * words], &bank[i * words], words);
          std::vector<int64_t> order(static_cast<std::size_t>(n));
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return value[x] > value[y]; });
          for (int64_t j = 0; j < r; ++j) {
            const int64_t want_index = j < n ? order[j] : -1;
            const int want = j < n ? value[want_index] : 0;
            if (index[b * r + j] != want_index || overlap[b * r + j] != want) {
              std::printf("topk mismatch n=%lld r=%lld threads=%d row=%lld entry=%lld: got (%lld, %d) "
                          "want (%lld, %d)\n", (long long)n, (long long)r, threads, (long long)b, (long long)j,
                          (long long)index[b * r + j], overlap[b * r + j], (long long)want_index, want);
              ++failures;
            }
          }
        }
      }
    }
  }
  return failures;
}

int main() {
  std::mt19937_64 rng(7);
  int failures = check_variants(rng);
  const int64_t words = 3;  // 192 bits: sparse enough that ties happen
  for (int64_t n : {0, 1, 5, 64, 1000}) {
    std::vector<int64_t> bank(static_cast<std::size_t>(n * words));
    for (auto& w : bank) w = static_cast<int64_t>(rng() & rng() & rng());
    const int64_t batch = 11;
    std::vector<int64_t> query(static_cast<std::size_t>(batch * words));
    for (auto& w : query) w = static_cast<int64_t>(rng() & rng());
    std::vector<int64_t> index(batch);
    std::vector<int32_t> overlap(batch);
    for (int threads : {1, 4}) {
      memoir_mask_search_cpu(query.data(), bank.data(), batch, n, words, index.data(), overlap.data(), threads);
      for (int64_t b = 0; b < batch; ++b) {
        std::vector<int64_t> q(query.begin() + b * words, query.begin() + (b + 1) * words);
        int64_t want_index;
        const int want = brute_force(q, bank, n, words, &want_index);
        if (want_index != index[b] || want != overlap[b]) {
          std::printf("mismatch n=%lld threads=%d row=%lld: got (%lld, %d) want (%lld, %d)\n", (long long)n, threads,
                      (long long)b, (long long)index[b], overlap[b], (long long)want_index, want);
          ++failures;
        }
      }
    }
  }
  failures += check_topk(rng);
  std::printf("%s\n", failures ? "FAILED" : "all mask search cases passed");
  return failures ? 1 : 0;
}
