// ctest: the CPU mask search against a brute-force loop written independently here.
#include <cstdio>
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

int main() {
  std::mt19937_64 rng(7);
  int failures = 0;
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
  std::printf("%s\n", failures ? "FAILED" : "all mask search cases passed");
  return failures ? 1 : 0;
}
