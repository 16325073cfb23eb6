// Registers the native kernels under the `memoir` namespace: torch.ops.memoir.mask_search_native(query,
// bank) and torch.ops.memoir.mask_search_topk_native(query, bank, r). The public ops memoir::mask_search
// and memoir::mask_search_topk (memoir_kernels/mask_search*.py) call them when the backend is native.
// Inputs are checked here so the raw kernels can assume contiguous int64 data.
#include <torch/extension.h>

#include "mask_search.h"

#include <string>

#ifdef MEMOIR_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

void check_bits(const at::Tensor& bits, const char* name) {
  TORCH_CHECK(bits.dim() == 2, "memoir::mask_search: ", name, " must be 2-D [rows, words], got ", bits.dim(), "-D");
  TORCH_CHECK(bits.scalar_type() == at::kLong, "memoir::mask_search: ", name, " must be int64, got ",
              bits.scalar_type());
  TORCH_CHECK(bits.is_contiguous(), "memoir::mask_search: ", name, " must be contiguous");
}

// query [B, W] int64, bank [N, W] int64 -> (index [B] int64, overlap [B] int32)
std::tuple<at::Tensor, at::Tensor> mask_search_cpu(const at::Tensor& query, const at::Tensor& bank) {
  check_bits(query, "query");
  check_bits(bank, "bank");
  TORCH_CHECK(query.device().is_cpu() && bank.device().is_cpu(), "memoir::mask_search (CPU): tensors must be on CPU");
  TORCH_CHECK(query.size(1) == bank.size(1), "memoir::mask_search: query has ", query.size(1),
              " words per mask, bank has ", bank.size(1));
  auto index = at::empty({query.size(0)}, query.options().dtype(at::kLong));
  auto overlap = at::empty({query.size(0)}, query.options().dtype(at::kInt));
  memoir_mask_search_cpu(query.data_ptr<int64_t>(), bank.data_ptr<int64_t>(), query.size(0), bank.size(0),
                         query.size(1), index.data_ptr<int64_t>(), overlap.data_ptr<int32_t>(),
                         at::get_num_threads());
  return {index, overlap};
}

#ifdef MEMOIR_WITH_CUDA
// Same contract on the GPU: one kernel launch on the current stream, no host synchronisation.
std::tuple<at::Tensor, at::Tensor> mask_search_cuda(const at::Tensor& query, const at::Tensor& bank) {
  check_bits(query, "query");
  check_bits(bank, "bank");
  TORCH_CHECK(query.is_cuda() && bank.is_cuda(), "memoir::mask_search (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(query.device() == bank.device(), "memoir::mask_search: query on ", query.device(), ", bank on ",
              bank.device());
  TORCH_CHECK(query.size(1) == bank.size(1), "memoir::mask_search: query has ", query.size(1),
              " words per mask, bank has ", bank.size(1));
  TORCH_CHECK(bank.size(0) < (int64_t{1} << 32) - 1, "memoir::mask_search (CUDA): at most 2^32 - 2 masks");
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch = query.size(0);
  auto index = at::empty({batch}, query.options().dtype(at::kLong));
  auto overlap = at::empty({batch}, query.options().dtype(at::kInt));
  if (batch == 0) return {index, overlap};
  const int blocks = memoir_mask_search_partial_blocks(batch, bank.size(0));
  // This call's workspace, from the caching allocator on the current stream: the blocks' partial
  // maxima, then one word holding the completion counter (zeroed by the launcher on the stream).
  const int64_t partial_words = static_cast<int64_t>(blocks) * batch;
  auto workspace = at::empty({partial_words + 1}, query.options());
  auto* partial = reinterpret_cast<uint64_t*>(workspace.data_ptr<int64_t>());
  const int status = memoir_mask_search_cuda(
      query.data_ptr<int64_t>(), bank.data_ptr<int64_t>(), batch, bank.size(0), query.size(1), partial,
      reinterpret_cast<uint32_t*>(partial + partial_words), index.data_ptr<int64_t>(), overlap.data_ptr<int32_t>(),
      blocks, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "memoir::mask_search (CUDA): launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {index, overlap};
}
#endif

void check_topk_inputs(const at::Tensor& query, const at::Tensor& bank, int64_t r) {
  TORCH_CHECK(query.dim() == 2 && bank.dim() == 2,
              "memoir::mask_search_topk: query and bank must be 2-D [rows, words], got ", query.dim(), "-D and ",
              bank.dim(), "-D");
  TORCH_CHECK(query.scalar_type() == at::kLong && bank.scalar_type() == at::kLong,
              "memoir::mask_search_topk: query and bank must be int64, got ", query.scalar_type(), " and ",
              bank.scalar_type());
  TORCH_CHECK(query.is_contiguous() && bank.is_contiguous(),
              "memoir::mask_search_topk: query and bank must be contiguous");
  TORCH_CHECK(query.device() == bank.device(), "memoir::mask_search_topk: query on ", query.device(), ", bank on ",
              bank.device());
  TORCH_CHECK(query.size(1) == bank.size(1), "memoir::mask_search_topk: query has ", query.size(1),
              " words per mask, bank has ", bank.size(1));
  TORCH_CHECK(r >= 1, "memoir::mask_search_topk: r must be >= 1, got ", r);
}

// query [B, W] int64, bank [N, W] int64, r -> (index [B, r] int64, overlap [B, r] int32)
std::tuple<at::Tensor, at::Tensor> mask_search_topk_cpu(const at::Tensor& query, const at::Tensor& bank, int64_t r) {
  check_topk_inputs(query, bank, r);
  TORCH_CHECK(query.device().is_cpu(), "memoir::mask_search_topk (CPU): tensors must be on CPU");
  auto index = at::empty({query.size(0), r}, query.options().dtype(at::kLong));
  auto overlap = at::empty({query.size(0), r}, query.options().dtype(at::kInt));
  memoir_mask_search_topk_cpu(query.data_ptr<int64_t>(), bank.data_ptr<int64_t>(), query.size(0), bank.size(0),
                              query.size(1), r, index.data_ptr<int64_t>(), overlap.data_ptr<int32_t>(),
                              at::get_num_threads());
  return {index, overlap};
}

#ifdef MEMOIR_WITH_CUDA
// One launch on the current stream, no scratch and no host synchronisation; r <= 64.
std::tuple<at::Tensor, at::Tensor> mask_search_topk_cuda(const at::Tensor& query, const at::Tensor& bank, int64_t r) {
  check_topk_inputs(query, bank, r);
  TORCH_CHECK(query.is_cuda(), "memoir::mask_search_topk (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(r <= MEMOIR_TOPK_CUDA_MAX_R, "memoir::mask_search_topk (CUDA): r must be at most ",
              static_cast<int>(MEMOIR_TOPK_CUDA_MAX_R), ", got ", r, " (use the CPU or MEMOIR_BACKEND=torch)");
  TORCH_CHECK(bank.size(0) < (int64_t{1} << 32) - 1, "memoir::mask_search_topk (CUDA): at most 2^32 - 2 masks");
  TORCH_CHECK(query.size(0) <= INT32_MAX, "memoir::mask_search_topk (CUDA): at most 2^31 - 1 queries");
  const c10::cuda::CUDAGuard guard(query.device());
  auto index = at::empty({query.size(0), r}, query.options().dtype(at::kLong));
  auto overlap = at::empty({query.size(0), r}, query.options().dtype(at::kInt));
  if (query.size(0) == 0) return {index, overlap};
  const int status = memoir_mask_search_topk_cuda(
      query.data_ptr<int64_t>(), bank.data_ptr<int64_t>(), query.size(0), bank.size(0), query.size(1), r,
      index.data_ptr<int64_t>(), overlap.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "memoir::mask_search_topk (CUDA): launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {index, overlap};
}
#endif

std::tuple<at::Tensor, at::Tensor> mask_search_topk_meta(const at::Tensor& query, const at::Tensor& bank, int64_t r) {
  TORCH_CHECK(r >= 1, "memoir::mask_search_topk: r must be >= 1, got ", r);
  return {at::empty({query.size(0), r}, query.options().dtype(at::kLong)),
          at::empty({query.size(0), r}, query.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> mask_search_meta(const at::Tensor& query, const at::Tensor& bank) {
  return {at::empty({query.size(0)}, query.options().dtype(at::kLong)),
          at::empty({query.size(0)}, query.options().dtype(at::kInt))};
}

bool has_cuda() {
#ifdef MEMOIR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Which popcount the CPU search picked on this machine (benchmarks record it next to their timings).
std::string cpu_popcount() {
  switch (memoir_overlap_variant_in_use()) {
    case MEMOIR_POPCOUNT_AVX512: return "avx512-vpopcntdq";
    case MEMOIR_POPCOUNT_AVX2: return "avx2";
    case MEMOIR_POPCOUNT_POPCNT: return "popcnt";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY(memoir, m) {
  m.def("mask_search_native(Tensor query, Tensor bank) -> (Tensor, Tensor)");
  m.def("mask_search_topk_native(Tensor query, Tensor bank, int r) -> (Tensor, Tensor)");
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("cpu_popcount() -> str", &cpu_popcount);
}

TORCH_LIBRARY_IMPL(memoir, CPU, m) {
  m.impl("mask_search_native", &mask_search_cpu);
  m.impl("mask_search_topk_native", &mask_search_topk_cpu);
}

#ifdef MEMOIR_WITH_CUDA
TORCH_LIBRARY_IMPL(memoir, CUDA, m) {
  m.impl("mask_search_native", &mask_search_cuda);
  m.impl("mask_search_topk_native", &mask_search_topk_cuda);
}
#endif

TORCH_LIBRARY_IMPL(memoir, Meta, m) {
  m.impl("mask_search_native", &mask_search_meta);
  m.impl("mask_search_topk_native", &mask_search_topk_meta);
}

// An importable module, so `import memoir_kernels._C` loads the library and runs the registrations.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.doc() = "memoir native ops (torch.ops.memoir)"; }
