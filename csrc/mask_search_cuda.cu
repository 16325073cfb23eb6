// CUDA mask search over a bit-packed bank: index[b] = argmax_n popcount(q[b] & bank[n]), ties to the
// lowest n, overlap[b] = that popcount; an empty bank gives (-1, 0).
//
// Bandwidth-bound: the bank (10k x 14336 bits = 18 MB) is read once per call, spread over every SM.
// One warp scores one bank row at a time (lanes read consecutive 64-bit words, so loads coalesce)
// against a group of up to kQueries queries, so at batch > 1 each bank word fetched from memory is
// used by several queries. Candidates are packed into one 64-bit key,
//     key = overlap << 32 | (0xFFFFFFFF - n),
// so "larger key" means "larger overlap, then lower index" and every reduction is a plain max.
// The whole search is ONE launch (CUDA-graph friendly, no host sync): blocks write their partial
// maxima, and the last block to finish reduces them and writes the outputs. "Last" is counted in a
// per-call counter that the caller passes with the partials (its workspace, e.g. from the caching
// allocator) and the launcher zeroes with cudaMemsetAsync on the call's stream just before the
// kernel, so searches in flight on different streams never share it, an aborted launch leaves
// nothing behind for the next call, and the memset + kernel pair is capturable in a CUDA graph.
//
// No torch headers: raw pointers, cudaStream_t and extern "C" launchers, so plain nvcc compiles it.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "mask_search.h"

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kQueries = 8;  // queries sharing each bank word; grid.y tiles larger batches
constexpr int kMaxWordsPerLane = 8;  // words a lane loads before using them (14336 bits: 7)

__device__ __forceinline__ unsigned long long pack_key(int overlap, long long n) {
  return (static_cast<unsigned long long>(overlap) << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(n));
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Run by the last block: combines every block's partial maxima into the outputs. The reads are
// spread over the whole block and issued kUnroll at a time, because a serial loop would pay one L2
// latency (~0.15 us) per block: ~80 us for the ~500 blocks of a batch-1 search, an order of
// magnitude more than the search itself. Each query gets `warps_per_query` warps (all 8 at batch 1);
// their lanes stride over the blocks, then a shuffle and a shared-memory step combine them.
// __ldcg reads L2, where the other blocks' fenced writes are, never a stale L1 line.
__device__ void reduce_partials(const unsigned long long* __restrict__ partial, long long batch, unsigned int blocks,
                                long long* __restrict__ index, int* __restrict__ overlap) {
  constexpr int kUnroll = 4;
  __shared__ unsigned long long warp_best[kWarpsPerBlock];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps_per_query = batch >= kWarpsPerBlock ? 1 : kWarpsPerBlock / static_cast<int>(batch);  // 8, 4, 2 or 1
  const int queries_per_round = kWarpsPerBlock / warps_per_query;
  const int part = warp % warps_per_query;
  const unsigned int stride = static_cast<unsigned int>(warps_per_query) * 32;
  for (long long first = 0; first < batch; first += queries_per_round) {  // same trip count for every thread
    const long long b = first + warp / warps_per_query;
    unsigned long long value = 0;
    if (b < batch) {
      for (unsigned int block = part * 32 + lane; block < blocks; block += kUnroll * stride) {
        unsigned long long v[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
          const unsigned int from = block + i * stride;
          v[i] = from < blocks ? __ldcg(partial + static_cast<long long>(from) * batch + b) : 0ull;
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) value = v[i] > value ? v[i] : value;
      }
    }
    value = warp_max(value);
    if (lane == 0) warp_best[warp] = value;
    __syncthreads();
    if (part == 0 && lane == 0 && b < batch) {
      for (int w = 1; w < warps_per_query; ++w) value = warp_best[warp + w] > value ? warp_best[warp + w] : value;
      if (value == 0) {  // empty bank
        index[b] = -1;
        overlap[b] = 0;
      } else {
        index[b] = static_cast<long long>(0xFFFFFFFFull - (value & 0xFFFFFFFFull));
        overlap[b] = static_cast<int>(value >> 32);
      }
    }
    __syncthreads();  // warp_best is reused by the next round
  }
}

// grid = (row_blocks, query_groups); partial [gridDim.x, batch] keys; blocks_done is this call's
// completion counter, zero at launch.
template <int Q>
__global__ void __launch_bounds__(kThreads) mask_search_kernel(const unsigned long long* __restrict__ query,
                                                               const unsigned long long* __restrict__ bank,
                                                               long long batch, long long num_masks, long long words,
                                                               unsigned long long* __restrict__ partial,
                                                               unsigned int* __restrict__ blocks_done,
                                                               long long* __restrict__ index,
                                                               int* __restrict__ overlap) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const long long q0 = static_cast<long long>(blockIdx.y) * Q;
  const int count = batch - q0 < Q ? static_cast<int>(batch - q0) : Q;

  unsigned long long best[Q];
#pragma unroll
  for (int j = 0; j < Q; ++j) best[j] = 0;  // 0 = "no row yet" (a real row's key is never 0 below 2^32 rows)

  const long long warps_total = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
  for (long long n = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + warp; n < num_masks; n += warps_total) {
    const unsigned long long* row = bank + n * words;
    int acc[Q];
#pragma unroll
    for (int j = 0; j < Q; ++j) acc[j] = 0;
    for (long long base = 0; base < words; base += 32 * kMaxWordsPerLane) {
      // Issue every load of this stretch before using any, so many bytes are in flight per warp.
      unsigned long long m[kMaxWordsPerLane];
#pragma unroll
      for (int i = 0; i < kMaxWordsPerLane; ++i) {
        const long long w = base + i * 32 + lane;
        m[i] = w < words ? __ldg(row + w) : 0ull;
      }
#pragma unroll
      for (int i = 0; i < kMaxWordsPerLane; ++i) {
        const long long w = base + i * 32 + lane;
        if (w < words) {
#pragma unroll
          for (int j = 0; j < Q; ++j) {
            if (j < count) acc[j] += __popcll(__ldg(query + (q0 + j) * words + w) & m[i]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      const int total = warp_sum(acc[j]);
      const unsigned long long key = pack_key(total, n);
      best[j] = key > best[j] ? key : best[j];
    }
  }

  // Block reduction over warps, then one partial per (block, query).
  __shared__ unsigned long long shared_best[kWarpsPerBlock][Q];
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < Q; ++j) shared_best[warp][j] = best[j];
  }
  __syncthreads();
  if (threadIdx.x < count) {
    unsigned long long value = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const unsigned long long v = shared_best[w][threadIdx.x];
      value = v > value ? v : value;
    }
    partial[static_cast<long long>(blockIdx.x) * batch + q0 + threadIdx.x] = value;
  }

  // Last block to finish reduces the partials of every block (threadfence: make them visible first).
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int total_blocks = gridDim.x * gridDim.y;
    is_last = atomicAdd(blocks_done, 1u) == total_blocks - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  reduce_partials(partial, batch, gridDim.x, index, overlap);
}

// SM count of each device, looked up once per device id. Lock-free: a slot is 0 until its first
// lookup stores the attribute; two threads racing on a first lookup store the same value.
// Devices past the table are looked up on every call (no process has that many).
constexpr int kMaxCachedDevices = 256;
std::atomic<int> g_sm_counts[kMaxCachedDevices];  // static storage: zero-initialised

int sm_count() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) device = 0;
  if (device < kMaxCachedDevices) {
    const int cached = g_sm_counts[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    cudaGetLastError();  // a failed lookup must not surface as the next launch's error
    return 1;            // not cached: a later call asks again
  }
  if (device < kMaxCachedDevices) g_sm_counts[device].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace

extern "C" int memoir_mask_search_partial_blocks(int64_t batch, int64_t num_masks) {
  (void)batch;
  // Enough blocks to keep every SM busy (4 resident blocks of 8 warps each), never more than rows
  // need: at batch 1 over 10k masks that is every SM streaming its share of the bank.
  const long long rows_per_block = kWarpsPerBlock;
  long long blocks = (num_masks + rows_per_block - 1) / rows_per_block;
  const long long cap = static_cast<long long>(sm_count()) * 4;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks);
}

extern "C" int memoir_mask_search_cuda(const int64_t* query, const int64_t* bank, int64_t batch, int64_t num_masks,
                                       int64_t words, uint64_t* partial, uint32_t* blocks_done, int64_t* index,
                                       int32_t* overlap, int partial_blocks, cudaStream_t stream) {
  if (batch <= 0) return 0;
  // The counter is zeroed on the call's stream, so it is ready when the kernel starts, whatever an
  // earlier (possibly aborted) launch left in that memory.
  const cudaError_t zeroed = cudaMemsetAsync(blocks_done, 0, sizeof(uint32_t), stream);
  if (zeroed != cudaSuccess) return static_cast<int>(zeroed);
  const dim3 grid(static_cast<unsigned int>(partial_blocks), static_cast<unsigned int>((batch + kQueries - 1) / kQueries));
  const auto* q = reinterpret_cast<const unsigned long long*>(query);
  const auto* m = reinterpret_cast<const unsigned long long*>(bank);
  auto* p = reinterpret_cast<unsigned long long*>(partial);
  auto* done = reinterpret_cast<unsigned int*>(blocks_done);
  auto* out_index = reinterpret_cast<long long*>(index);
  if (batch == 1) {
    mask_search_kernel<1><<<grid, kThreads, 0, stream>>>(q, m, batch, num_masks, words, p, done, out_index, overlap);
  } else {
    mask_search_kernel<kQueries>
        <<<grid, kThreads, 0, stream>>>(q, m, batch, num_masks, words, p, done, out_index, overlap);
  }
  return static_cast<int>(cudaGetLastError());
}
