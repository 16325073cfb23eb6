// Bit-packed mask search: for each query, the stored mask with the largest popcount(q AND m).
// Layout: masks are `words` int64 words, row-major, padding bits zero. Ties go to the lowest index;
// an empty bank gives index -1 and overlap 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(MEMOIR_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

// CPU kernel. query [batch, words], bank [num_masks, words] -> index [batch], overlap [batch].
// Threads split the bank; num_threads <= 0 lets OpenMP choose.
void memoir_mask_search_cpu(const int64_t* query, const int64_t* bank, int64_t batch, int64_t num_masks,
                            int64_t words, int64_t* index, int32_t* overlap, int num_threads);

// Popcount variants of the CPU kernel, fastest last; the kernel uses the fastest this CPU runs.
enum { MEMOIR_POPCOUNT_SCALAR = 0, MEMOIR_POPCOUNT_POPCNT = 1, MEMOIR_POPCOUNT_AVX2 = 2, MEMOIR_POPCOUNT_AVX512 = 3 };
// popcount(query AND mask) over `words` words with one variant (for tests), or -1 when this CPU
// cannot run it.
int32_t memoir_overlap_variant(int variant, const int64_t* query, const int64_t* mask, int64_t words);
// The variant memoir_mask_search_cpu uses on this CPU.
int memoir_overlap_variant_in_use(void);
// That variant as a function, for the other CPU kernels (mask_search_topk_cpu.cpp), so every search
// counts with the same popcount.
typedef int32_t (*memoir_overlap_fn)(const int64_t* query, const int64_t* mask, int64_t words);
memoir_overlap_fn memoir_overlap_function(void);
// Threads a CPU search over num_masks x words bank words (for batch queries) should use: the
// requested count (<= 0: OpenMP's), fewer when the bank is too small to pay for waking the pool.
int memoir_search_threads(int num_threads, int64_t num_masks, int64_t words, int64_t batch);

// Top-r form (csrc/mask_search_topk_cpu.cpp): for each query the r rows of largest overlap, ordered
// by overlap descending then index ascending; entries past the bank's rows are (-1, 0).
// query [batch, words], bank [num_masks, words] -> index [batch, r], overlap [batch, r]; r >= 1.
// Threads split the bank; num_threads <= 0 lets OpenMP choose.
void memoir_mask_search_topk_cpu(const int64_t* query, const int64_t* bank, int64_t batch, int64_t num_masks,
                                 int64_t words, int64_t r, int64_t* index, int32_t* overlap, int num_threads);

// CUDA kernel (csrc/mask_search_cuda.cu): a cudaMemsetAsync and one launch on `stream`, no host
// synchronisation, no allocation, no state kept between calls (safe on concurrent streams, capturable
// in a CUDA graph). Per-call scratch on the current device, owned by the caller until the stream passes
// the call: `partial` of partial_blocks * batch uint64 words and `blocks_done`, one uint32 completion
// counter (the launcher zeroes it on `stream`). Take partial_blocks from
// memoir_mask_search_partial_blocks (it reads the current device's SM count, cached per device).
// Returns the cudaError_t of the memset or the launch.
int memoir_mask_search_partial_blocks(int64_t batch, int64_t num_masks);
#if defined(__CUDACC__) || defined(MEMOIR_WITH_CUDA)
int memoir_mask_search_cuda(const int64_t* query, const int64_t* bank, int64_t batch, int64_t num_masks,
                            int64_t words, uint64_t* partial, uint32_t* blocks_done, int64_t* index, int32_t* overlap,
                            int partial_blocks, cudaStream_t stream);
#endif

// CUDA top-r search (csrc/mask_search_topk_cuda.cu): one launch on `stream`, no scratch, no state
// kept between calls. r must be in [1, MEMOIR_TOPK_CUDA_MAX_R] and num_masks below 2^32 - 1; the
// launcher returns cudaErrorInvalidValue otherwise, else the cudaError_t of the launch.
enum { MEMOIR_TOPK_CUDA_MAX_R = 64 };
#if defined(__CUDACC__) || defined(MEMOIR_WITH_CUDA)
int memoir_mask_search_topk_cuda(const int64_t* query, const int64_t* bank, int64_t batch, int64_t num_masks,
                                 int64_t words, int64_t r, int64_t* index, int32_t* overlap, cudaStream_t stream);
#endif

#ifdef __cplusplus
}
#endif
