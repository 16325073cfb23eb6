// CUDA top-r mask search: for query b, the r bank rows n with the largest popcount(q[b] & bank[n]),
// ordered by overlap descending, ties to the lower n; entries past the bank's rows are (-1, 0).
//
// A deliberately simple design: one block per query, ONE launch, no scratch buffer and no state
// kept between calls. Each warp scores the rows n = warp, warp + kWarps, ... (lanes read
// consecutive 64-bit words, so loads coalesce) and lane 0 keeps the warp's running top-r in shared
// memory; then thread 0 merges the kWarps sorted lists. Candidates are one 64-bit key,
//     key = overlap << 32 | (0xFFFFFFFF - n),
// so "larger key" means "larger overlap, then lower index", keys of distinct rows differ, and 0
// (never a real row's key below 2^32 - 1 rows) marks an empty slot. With distinct keys the result
// is the same whatever order the warps visit rows in.
//
// No torch headers: raw pointers, cudaStream_t and an extern "C" launcher, so plain nvcc compiles it.
#include <cuda_runtime.h>

#include <cstdint>

#include "mask_search.h"

namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxR = MEMOIR_TOPK_CUDA_MAX_R;
constexpr int kWordsPerLane = 8;  // loads a lane issues before using them (14336 bits: 7)

__device__ __forceinline__ unsigned long long pack_key(int overlap, long long n) {
  return (static_cast<unsigned long long>(overlap) << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(n));
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// grid = (batch); index/overlap [batch, r]; 1 <= r <= kMaxR (checked by the launcher).
__global__ void __launch_bounds__(kThreads) mask_search_topk_kernel(const unsigned long long* __restrict__ query,
                                                                    const unsigned long long* __restrict__ bank,
                                                                    long long num_masks, long long words, int r,
                                                                    long long* __restrict__ index,
                                                                    int* __restrict__ overlap) {
  __shared__ unsigned long long lists[kWarps][kMaxR];  // per warp, best first, 0 = empty
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const long long b = blockIdx.x;
  const unsigned long long* q = query + b * words;

  for (int i = lane; i < kMaxR; i += 32) lists[warp][i] = 0;
  __syncwarp();

  for (long long n = warp; n < num_masks; n += kWarps) {
    const unsigned long long* row = bank + n * words;
    int acc = 0;
    for (long long base = 0; base < words; base += 32 * kWordsPerLane) {
      unsigned long long m[kWordsPerLane];
#pragma unroll
      for (int i = 0; i < kWordsPerLane; ++i) {
        const long long w = base + i * 32 + lane;
        m[i] = w < words ? __ldg(row + w) : 0ull;
      }
#pragma unroll
      for (int i = 0; i < kWordsPerLane; ++i) {
        const long long w = base + i * 32 + lane;
        if (w < words) acc += __popcll(__ldg(q + w) & m[i]);
      }
    }
    const int total = warp_sum(acc);  // every lane holds the row's overlap
    if (lane == 0) {                  // only lane 0 touches this warp's list
      unsigned long long* list = lists[warp];
      const unsigned long long key = pack_key(total, n);
      if (key > list[r - 1]) {
        int pos = r - 1;  // the last entry drops out
        while (pos > 0 && list[pos - 1] < key) {
          list[pos] = list[pos - 1];
          --pos;
        }
        list[pos] = key;
      }
    }
    __syncwarp();
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    int head[kWarps];
    for (int w = 0; w < kWarps; ++w) head[w] = 0;
    for (int j = 0; j < r; ++j) {
      unsigned long long best = 0;
      int from = -1;
      for (int w = 0; w < kWarps; ++w) {
        if (head[w] < r && lists[w][head[w]] > best) {
          best = lists[w][head[w]];
          from = w;
        }
      }
      const long long out = b * r + j;
      if (from < 0) {  // every list is exhausted: fewer rows than r
        index[out] = -1;
        overlap[out] = 0;
      } else {
        ++head[from];
        index[out] = static_cast<long long>(0xFFFFFFFFull - (best & 0xFFFFFFFFull));
        overlap[out] = static_cast<int>(best >> 32);
      }
    }
  }
}

}  // namespace

extern "C" int memoir_mask_search_topk_cuda(const int64_t* query, const int64_t* bank, int64_t batch,
                                            int64_t num_masks, int64_t words, int64_t r, int64_t* index,
                                            int32_t* overlap, cudaStream_t stream) {
  if (r < 1 || r > kMaxR || num_masks < 0 || num_masks >= static_cast<int64_t>(0xFFFFFFFFll) || words < 0 ||
      batch > 0x7FFFFFFFll)
    return static_cast<int>(cudaErrorInvalidValue);
  if (batch <= 0) return 0;
  mask_search_topk_kernel<<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(query), reinterpret_cast<const unsigned long long*>(bank),
      num_masks, words, static_cast<int>(r), reinterpret_cast<long long*>(index), overlap);
  return static_cast<int>(cudaGetLastError());
}
