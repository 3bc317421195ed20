// Fused masked SGD step on CUDA tensors: one launch per (device, dtype) group for all its tensors.
//
// A device table (one host-to-device copy per step) lists, per tensor, the addresses of p, g, b, m,
// its size and whether its buffer is created this step; per chunk of kChunk elements, the tensor
// it belongs to and its first element (the layout of apex's multi_tensor_apply, with the table in
// device memory instead of kernel arguments, so any number of tensors takes one launch).
// The per-element formula is the one in masked_sgd.cpp, in fp32 whatever the storage dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastimp {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;
constexpr int64_t kChunk = kThreads * kIlp * 16;  // 32768 elements per block
constexpr int kTensorFields = 6;                  // p, g, b, m, n, init
constexpr int kChunkFields = 2;                   // tensor index, first element

struct Scalars {
  float neg_lr, momentum, one_minus_damp, wd, decay, sign;
  int has_mom, nesterov, wd_mode;  // wd_mode: 0 none, 1 coupled, 2 decoupled
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
masked_sgd_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ chunks,
                  Scalars s) {
  const int64_t t = chunks[int64_t(blockIdx.x) * kChunkFields];
  const int64_t start = chunks[int64_t(blockIdx.x) * kChunkFields + 1];
  const int64_t* e = tensors + t * kTensorFields;
  T* __restrict__ p = reinterpret_cast<T*>(e[0]) + start;
  const T* __restrict__ g = reinterpret_cast<const T*>(e[1]) + start;
  T* __restrict__ b = e[2] ? reinterpret_cast<T*>(e[2]) + start : nullptr;
  const uint8_t* __restrict__ m = e[3] ? reinterpret_cast<const uint8_t*>(e[3]) + start : nullptr;
  const int64_t rem = e[4] - start;
  const int64_t n = rem < kChunk ? rem : kChunk;
  const bool init = e[5] != 0;

  for (int64_t base = 0; base < n; base += int64_t(kThreads) * kIlp) {
    float rp[kIlp], rg[kIlp], rb[kIlp];
    bool keep[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + int64_t(k) * kThreads;
      rp[k] = rg[k] = rb[k] = 0.f;
      keep[k] = true;
      if (i < n) {
        rp[k] = to_f(p[i]);
        rg[k] = to_f(g[i]);
        if (s.has_mom && !init) rb[k] = to_f(b[i]);
        if (m) keep[k] = m[i] != 0;
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      float d = rg[k] * s.sign;
      if (s.wd_mode == 1) d = fmaf(rp[k], s.wd, d);
      float bi = 0.f;
      if (s.has_mom) {
        bi = init ? d : fmaf(d, s.one_minus_damp, rb[k] * s.momentum);
        d = s.nesterov ? fmaf(bi, s.momentum, d) : bi;
      }
      const float pi = s.wd_mode == 2 ? rp[k] * s.decay : rp[k];
      rp[k] = keep[k] ? fmaf(d, s.neg_lr, pi) : 0.f;
      rb[k] = keep[k] ? bi : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + int64_t(k) * kThreads;
      if (i < n) {
        p[i] = from_f<T>(rp[k]);
        if (s.has_mom) b[i] = from_f<T>(rb[k]);
      }
    }
  }
}

// Same elements in the same memory order as p (equal strides, or both contiguous: size-1 dims
// may carry any stride).
bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  return t.sizes() == p.sizes() &&
         (t.strides() == p.strides() || (t.is_contiguous() && p.is_contiguous()));
}

void check(bool cond, const char* name, const std::string& what) {
  TORCH_CHECK_VALUE(cond, "fastimp: argument '", name, "': expected ", what);
}

}  // namespace

void masked_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<c10::optional<at::Tensor>>& bufs,
                     const std::vector<c10::optional<at::Tensor>>& masks,
                     const std::vector<bool>& init, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool decoupled) {
  const size_t nt = params.size();
  check(grads.size() == nt && bufs.size() == nt && masks.size() == nt && init.size() == nt,
        "params", "lists params, grads, bufs, masks, init of one length");
  check(!nesterov || momentum != 0.0, "nesterov", "momentum != 0");
  if (nt == 0) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  check(device.is_cuda(), "params", "CUDA tensors");
  check(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "params",
        "float32, bfloat16 or float16 tensors");
  const bool has_mom = momentum != 0.0;

  std::vector<int64_t> tensors;
  std::vector<int64_t> chunks;
  tensors.reserve(nt * kTensorFields);
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    const std::string idx = "tensor " + std::to_string(i);
    check(p.device() == device && p.scalar_type() == dtype, "params",
          "tensors of one device and dtype (" + idx + " differs)");
    check(p.is_non_overlapping_and_dense(), "params", "dense, non-overlapping tensors");
    const at::Tensor& g = grads[i];
    check(g.device() == device && g.scalar_type() == dtype && same_layout(g, p),
          "grads", idx + " with the device, dtype, shape and strides of its param");
    int64_t bp = 0, mp = 0;
    if (has_mom) {
      check(bufs[i].has_value(), "bufs", "a buffer for every param when momentum != 0");
      const at::Tensor& b = *bufs[i];
      check(b.device() == device && b.scalar_type() == dtype && same_layout(b, p),
            "bufs", idx + " with the device, dtype, shape and strides of its param");
      bp = reinterpret_cast<int64_t>(b.data_ptr());
    }
    if (masks[i].has_value()) {
      const at::Tensor& m = *masks[i];
      check(m.device() == device && (m.scalar_type() == at::kBool || m.scalar_type() == at::kByte) &&
                same_layout(m, p),
            "masks", idx + " of dtype bool/uint8 with the device, shape and strides of its param");
      mp = reinterpret_cast<int64_t>(m.data_ptr());
    }
    const int64_t n = p.numel();
    const int64_t t = static_cast<int64_t>(tensors.size() / kTensorFields);
    tensors.insert(tensors.end(), {reinterpret_cast<int64_t>(p.data_ptr()),
                                   reinterpret_cast<int64_t>(g.data_ptr()), bp, mp, n,
                                   init[i] ? int64_t(1) : int64_t(0)});
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back(t);
      chunks.push_back(start);
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size() / kChunkFields);
  if (n_chunks == 0) return;
  check(n_chunks < (int64_t(1) << 31), "params", "fewer than 2^31 chunks");

  // One pinned host buffer, one async copy: the caching host allocator keeps it alive until the
  // copy on the current stream has finished.
  const int64_t n_table = static_cast<int64_t>(tensors.size() + chunks.size());
  at::Tensor host = at::empty({n_table}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(tensors.begin(), tensors.end(), h);
  std::copy(chunks.begin(), chunks.end(), h + tensors.size());

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  const int64_t* d_tensors = table.data_ptr<int64_t>();
  const int64_t* d_chunks = d_tensors + tensors.size();

  Scalars s;
  s.neg_lr = static_cast<float>(-lr);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_damp = static_cast<float>(1.0 - dampening);
  s.wd = static_cast<float>(weight_decay);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.sign = maximize ? -1.f : 1.f;
  s.has_mom = has_mom ? 1 : 0;
  s.nesterov = nesterov ? 1 : 0;
  s.wd_mode = weight_decay == 0.0 ? 0 : (decoupled ? 2 : 1);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const dim3 grid(static_cast<unsigned>(n_chunks));
  switch (dtype) {
    case at::kFloat:
      masked_sgd_kernel<float><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, s);
      break;
    case at::kBFloat16:
      masked_sgd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, s);
      break;
    default:
      masked_sgd_kernel<__half><<<grid, kThreads, 0, stream>>>(d_tensors, d_chunks, s);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastimp
