// Fused masked SGD step on CUDA tensors: one launch per (device, dtype) group for all its tensors.
//
// A device table lists, per tensor, the addresses of p, g, b, m (0 when absent) and its size; per
// chunk of kChunk elements, the tensor it belongs to and its first element (apex's
// multi_tensor_apply layout, with the table in device memory instead of kernel arguments, so any
// number of tensors takes one launch). masked_sgd_cuda_table builds and uploads it once; callers
// cache it (fastimp.ops.masked_sgd) and masked_sgd_cuda_launch reuses it: a cached step makes no
// host-to-device copy and no sync, so it can be captured in a CUDA graph. lr is a number or is
// read on the device from a one-element tensor. The formula is masked_sgd.h's.
#include "checks.h"
#include "masked_sgd.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastimp {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;
constexpr int kChunk = kThreads * kIlp * 16;  // 32768 elements per block: 32-bit offsets inside
constexpr int kTensorFields = 5;              // p, g, b, m, n
constexpr int kChunkFields = 2;               // tensor index, first element

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
template <typename T, typename A> __device__ __forceinline__ T from_acc(A x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
masked_sgd_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ chunks,
                  const sgd::Hyper h, const float* lr32, const double* lr64, const bool init) {
  using acc_t = typename Acc<T>::type;
  const double lr = lr32 != nullptr ? static_cast<double>(*lr32) : (lr64 != nullptr ? *lr64 : h.lr);
  const sgd::Coeffs<acc_t> c = sgd::coeffs<acc_t>(lr, h);
  const int64_t t = chunks[int64_t(blockIdx.x) * kChunkFields];
  const int64_t start = chunks[int64_t(blockIdx.x) * kChunkFields + 1];
  const int64_t* e = tensors + t * kTensorFields;
  // the chunk start folded into the base pointers: 32-bit offsets below
  T* __restrict__ p = reinterpret_cast<T*>(e[0]) + start;
  const T* __restrict__ g = reinterpret_cast<const T*>(e[1]) + start;
  T* __restrict__ b = e[2] ? reinterpret_cast<T*>(e[2]) + start : nullptr;
  const uint8_t* __restrict__ m = e[3] ? reinterpret_cast<const uint8_t*>(e[3]) + start : nullptr;
  const int64_t rem = e[4] - start;
  const int n = rem < kChunk ? static_cast<int>(rem) : kChunk;
  // a tensor without a buffer in the table takes no momentum (callers always give one with it)
  const int mom = b != nullptr ? h.mom : int(sgd::kNoMom);
  const bool has_mom = mom != sgd::kNoMom;

  for (int base = 0; base < n; base += kThreads * kIlp) {
    acc_t rp[kIlp], rg[kIlp], rb[kIlp];
    bool keep[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kThreads;
      rp[k] = rg[k] = rb[k] = acc_t(0);
      keep[k] = true;
      if (i < n) {
        rp[k] = to_acc(p[i]);
        rg[k] = to_acc(g[i]);
        if (has_mom && !init) rb[k] = to_acc(b[i]);
        if (m) keep[k] = m[i] != 0;
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      sgd::update<true>(c, mom, h.wd, init, rp[k], rg[k], rb[k]);
      rp[k] = keep[k] ? rp[k] : acc_t(0);
      rb[k] = keep[k] ? rb[k] : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * kThreads;
      if (i < n) {
        p[i] = from_acc<T>(rp[k]);
        if (has_mom) b[i] = from_acc<T>(rb[k]);
      }
    }
  }
}

bool capturing(const at::Device& device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(),
                                       &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

std::tuple<at::Tensor, int64_t, int64_t, bool> masked_sgd_cuda_table(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& bufs,
    const std::vector<std::optional<at::Tensor>>& masks) {
  const size_t nt = params.size();
  check::same_length("params", "lists params, grads, bufs, masks of one length", nt, grads,
                     bufs, masks);
  FASTIMP_CHECK_ARG(nt > 0, "params", "at least one tensor");
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  FASTIMP_CHECK_ARG(device.is_cuda(), "params", "CUDA tensors, got ", check::describe(params[0]));
  FASTIMP_CHECK_ARG(check::is_float_kind(dtype), "params",
                    "float32, float64, bfloat16 or float16 tensors, got ",
                    check::describe(params[0]));
  TORCH_CHECK(!capturing(device),
              "fastimp: masked SGD: the tensor table must be built before CUDA graph capture "
              "(run one step with the same params, grads, buffers and masks first; keep the grads "
              "with zero_grad(set_to_none=False))");
  std::vector<int64_t> tab;
  std::vector<int64_t> chunks;
  tab.reserve(nt * kTensorFields);
  bool aligned = true;
  auto addr = [&](const void* ptr) {
    const int64_t a = reinterpret_cast<int64_t>(ptr);
    aligned = aligned && (a % 16 == 0);
    return a;
  };
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    FASTIMP_CHECK_ARG(p.device() == device && p.scalar_type() == dtype, "params",
                      "tensors of one device and dtype (", check::describe(params[0]), "); ",
                      check::entry(i), " is ", check::describe(p));
    FASTIMP_CHECK_ARG(p.is_non_overlapping_and_dense(), "params", "dense, non-overlapping tensors");
    check::like_param(grads[i], p, "grads", i);
    int64_t bp = 0, mp = 0;
    if (bufs[i].has_value()) {
      check::like_param(*bufs[i], p, "bufs", i);
      bp = addr(bufs[i]->data_ptr());
    }
    if (masks[i].has_value()) {
      check::mask_like_param(*masks[i], p, "masks", i);
      mp = addr(masks[i]->data_ptr());
    }
    check::sgd_no_overlap(p, grads[i], bufs[i], masks[i], i);
    const int64_t n = p.numel();
    tab.insert(tab.end(), {addr(p.data_ptr()), addr(grads[i].data_ptr()), bp, mp, n});
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back(static_cast<int64_t>(i));
      chunks.push_back(start);
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size() / kChunkFields);
  FASTIMP_CHECK_ARG(n_chunks < (int64_t(1) << 31), "params", "fewer than 2^31 chunks");
  // One pinned host buffer, one async copy: the caching host allocator keeps it alive until the
  // copy on the current stream has finished.
  at::Tensor host = at::empty({static_cast<int64_t>(tab.size() + chunks.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* hp = host.data_ptr<int64_t>();
  std::copy(tab.begin(), tab.end(), hp);
  std::copy(chunks.begin(), chunks.end(), hp + tab.size());
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  return {table, static_cast<int64_t>(nt), n_chunks, aligned};
}

void masked_sgd_cuda_launch(const at::Tensor& table, int64_t n_tensors, int64_t n_chunks,
                            const at::Tensor& like, bool init, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double momentum,
                            double dampening, double weight_decay, bool nesterov, bool maximize,
                            bool decoupled) {
  const at::Device device = like.device();
  FASTIMP_CHECK_ARG(device.is_cuda() && check::is_float_kind(like.scalar_type()), "like",
                    "a float CUDA tensor of the group's dtype, got ", check::describe(like));
  FASTIMP_CHECK_ARG(table.device() == device && table.scalar_type() == at::kLong &&
                        table.is_contiguous() && n_tensors >= 0 && n_chunks >= 0 &&
                        table.numel() == n_tensors * kTensorFields + n_chunks * kChunkFields,
                    "table", "the int64 table of masked_sgd_cuda_table on ", device.str());
  FASTIMP_CHECK_ARG(!nesterov || momentum != 0.0, "nesterov", "momentum != 0");
  const float* lr32 = nullptr;
  const double* lr64 = nullptr;
  if (lr_tensor.has_value()) {
    check::device_scalar(*lr_tensor, device, "lr");
    if (lr_tensor->scalar_type() == at::kFloat) lr32 = lr_tensor->data_ptr<float>();
    else lr64 = lr_tensor->data_ptr<double>();
  }
  if (n_chunks == 0) return;
  const sgd::Hyper h = sgd::make_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                       decoupled);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t* d_tensors = table.data_ptr<int64_t>();
  const int64_t* d_chunks = d_tensors + n_tensors * kTensorFields;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  switch (like.scalar_type()) {
    case at::kFloat:
      masked_sgd_kernel<float><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, h, lr32, lr64,
                                                              init);
      break;
    case at::kDouble:
      masked_sgd_kernel<double><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, h, lr32,
                                                               lr64, init);
      break;
    case at::kBFloat16:
      masked_sgd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, h,
                                                                      lr32, lr64, init);
      break;
    default:
      masked_sgd_kernel<__half><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, h, lr32, lr64,
                                                               init);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<std::optional<at::Tensor>>& bufs,
                     const std::vector<std::optional<at::Tensor>>& masks,
                     const std::vector<bool>& init, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize,
                     bool decoupled) {
  const size_t nt = params.size();
  check::same_length("params", "lists params, grads, bufs, masks, init of one length", nt,
                     grads, bufs, masks, init);
  FASTIMP_CHECK_ARG(!nesterov || momentum != 0.0, "nesterov", "momentum != 0");
  if (nt == 0) return;
  const bool has_mom = momentum != 0.0;
  for (size_t i = 0; i < nt && has_mom; ++i)
    FASTIMP_CHECK_ARG(bufs[i].has_value(), "bufs", "a buffer for every param when momentum != 0");
  // The table holds no init flag: new buffers (init) and old ones go to separate launches.
  for (const bool first : {true, false}) {
    std::vector<at::Tensor> p, g;
    std::vector<std::optional<at::Tensor>> b, m;
    for (size_t i = 0; i < nt; ++i) {
      if ((has_mom && init[i]) != first) continue;
      p.push_back(params[i]);
      g.push_back(grads[i]);
      b.push_back(has_mom ? bufs[i] : std::nullopt);
      m.push_back(masks[i]);
    }
    if (p.empty()) continue;
    auto [table, n_tensors, n_chunks, aligned] = masked_sgd_cuda_table(p, g, b, m);
    (void)aligned;
    masked_sgd_cuda_launch(table, n_tensors, n_chunks, p[0], first, lr, lr_tensor, momentum,
                           dampening, weight_decay, nesterov, maximize, decoupled);
  }
}

}  // namespace fastimp
