// Global magnitude threshold on the GPU: the CPU kernel's algorithm (see magnitude_threshold.cpp)
// with global-memory atomic histograms. One CUDA block per chunk of one tensor; the segment and
// chunk tables live on the device. The two 65536-bin histograms are scanned on the host (256 KB
// each), which keeps the selection identical to the CPU code.
#include "checks.h"
#include "radix_select.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace fastimp {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;
using radix::kBins;

// seg table: per tensor 5 int64: weight ptr, mask ptr (0: none), out ptr, numel, dtype
// (0 = float32, 1 = float16, 2 = bfloat16). chunk table: per block 3 int64: seg, begin, end.
struct SegView {
  const void* w;
  const uint8_t* m;
  uint8_t* o;
  int dt;
};

__device__ __forceinline__ SegView load_seg(const int64_t* segs, int64_t s) {
  SegView v;
  v.w = reinterpret_cast<const void*>(segs[5 * s + 0]);
  v.m = reinterpret_cast<const uint8_t*>(segs[5 * s + 1]);
  v.o = reinterpret_cast<uint8_t*>(segs[5 * s + 2]);
  v.dt = static_cast<int>(segs[5 * s + 4]);
  return v;
}

__device__ __forceinline__ uint32_t key_of(const SegView& v, int64_t i) {
  if (v.dt == 0) return static_cast<const uint32_t*>(v.w)[i] & 0x7fffffffu;
  if (v.dt == 2)
    return (static_cast<uint32_t>(static_cast<const uint16_t*>(v.w)[i]) << 16) & 0x7fffffffu;
  float f = __half2float(static_cast<const __half*>(v.w)[i]);
  return __float_as_uint(f) & 0x7fffffffu;
}

__device__ __forceinline__ bool live_of(const SegView& v, int64_t i) {
  return v.m == nullptr || v.m[i] != 0;
}

// second == 0: hist[key >> 16]; second == 1: hist[key & 0xffff] for keys with key >> 16 == hi.
__global__ void histogram_kernel(const int64_t* segs, const int64_t* chunks, int second,
                                 uint32_t hi, unsigned int* hist) {
  const int64_t c = blockIdx.x;
  const SegView v = load_seg(segs, chunks[3 * c]);
  const int64_t begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (!live_of(v, i)) continue;
    const uint32_t k = key_of(v, i);
    if (!second) {
      atomicAdd(&hist[k >> 16], 1u);
    } else if ((k >> 16) == hi) {
      atomicAdd(&hist[k & 0xffffu], 1u);
    }
  }
}

// out = live & (key > T): every tie at T pruned (also k = 0 with T = -1 handled by the caller
// passing all_keep = 1).
__global__ void write_simple_kernel(const int64_t* segs, const int64_t* chunks, uint32_t T,
                                    int all_keep) {
  const int64_t c = blockIdx.x;
  const SegView v = load_seg(segs, chunks[3 * c]);
  const int64_t begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const bool live = live_of(v, i);
    v.o[i] = static_cast<uint8_t>(live && (all_keep || key_of(v, i) > T));
  }
}

// eq[c] = unmasked keys == T in chunk c.
__global__ void count_equal_kernel(const int64_t* segs, const int64_t* chunks, uint32_t T,
                                   long long* eq) {
  const int64_t c = blockIdx.x;
  const SegView v = load_seg(segs, chunks[3 * c]);
  const int64_t begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  unsigned int cnt = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    cnt += (live_of(v, i) && key_of(v, i) == T) ? 1u : 0u;
  using Scan = cub::BlockScan<unsigned int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  unsigned int total = 0, excl = 0;
  Scan(tmp).ExclusiveSum(cnt, excl, total);
  if (threadIdx.x == 0) eq[c] = static_cast<long long>(total);
}

// Ties split: the tie with global rank r (position order) is pruned when r < t_rem.
// eq_before[c] = ties in chunks before c. Tiles of kThreads elements keep the position order.
__global__ void write_ranked_kernel(const int64_t* segs, const int64_t* chunks, uint32_t T,
                                    long long t_rem, const long long* eq_before) {
  const int64_t c = blockIdx.x;
  const SegView v = load_seg(segs, chunks[3 * c]);
  const int64_t begin = chunks[3 * c + 1], end = chunks[3 * c + 2];
  using Scan = cub::BlockScan<unsigned int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  long long base = eq_before[c];
  for (int64_t t0 = begin; t0 < end; t0 += kThreads) {
    const int64_t i = t0 + threadIdx.x;
    bool live = false, tie = false;
    uint32_t k = 0;
    if (i < end) {
      live = live_of(v, i);
      k = key_of(v, i);
      tie = live && k == T;
    }
    unsigned int rank = 0, tile_total = 0;
    Scan(tmp).ExclusiveSum(tie ? 1u : 0u, rank, tile_total);
    __syncthreads();  // tmp is reused by the next tile
    if (i < end) {
      const bool pruned = k < T || (tie && base + static_cast<long long>(rank) < t_rem);
      v.o[i] = static_cast<uint8_t>(live && !pruned);
    }
    base += tile_total;
  }
}


std::vector<int64_t> to_host(const at::Tensor& hist_u32) {
  auto h = hist_u32.to(at::kLong).cpu();  // the int32 view of uint32 counts < 2^31 per bin
  const int64_t* p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + kBins);
}

// The CUDA passes of radix::select: one block per chunk, tables on the device.
struct CudaPass {
  const int64_t* segs;
  const int64_t* chunks;
  int64_t nc;
  at::Tensor hist;
  cudaStream_t stream;

  std::vector<int64_t> histogram(bool second, uint32_t hi) {
    hist.zero_();
    if (nc > 0) {
      histogram_kernel<<<nc, kThreads, 0, stream>>>(
          segs, chunks, second ? 1 : 0, hi, reinterpret_cast<unsigned int*>(hist.data_ptr<int>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return to_host(hist);
  }
  void write(uint32_t t, int all_keep) {
    if (nc == 0) return;
    write_simple_kernel<<<nc, kThreads, 0, stream>>>(segs, chunks, t, all_keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void write_kept() { write(0u, 1); }
  void write_above(uint32_t t) { write(t, 0); }
  void write_ranked(uint32_t t, int64_t t_rem) {
    auto eq = at::zeros({nc}, hist.options().dtype(at::kLong));
    count_equal_kernel<<<nc, kThreads, 0, stream>>>(
        segs, chunks, t, reinterpret_cast<long long*>(eq.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto before = at::cumsum(eq, 0) - eq;  // exclusive scan in chunk (= position) order
    write_ranked_kernel<<<nc, kThreads, 0, stream>>>(
        segs, chunks, t, t_rem, reinterpret_cast<const long long*>(before.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

radix::Result magnitude_threshold_cuda(std::vector<at::Tensor> weights,
                                       std::vector<at::Tensor> masks,
                                       std::vector<at::Tensor> out, std::optional<int64_t> k,
                                       double fraction) {
  const size_t T = weights.size();
  FASTIMP_CHECK_ARG(masks.empty() || masks.size() == T, "masks",
                    "an empty list or one mask per weight tensor");
  FASTIMP_CHECK_ARG(out.size() == T, "out", "one output mask per weight tensor");
  FASTIMP_CHECK_ARG(T > 0, "weights", "at least one tensor");
  const auto device = weights[0].device();
  FASTIMP_CHECK_ARG(device.is_cuda(), "weights", "CUDA tensors, got ",
                    check::describe(weights[0]));
  const c10::cuda::CUDAGuard guard(device);
  std::vector<int64_t> seg_tab, chunk_tab;
  int64_t total = 0;
  for (size_t i = 0; i < T; ++i) {
    const auto& w = weights[i];
    FASTIMP_CHECK_ARG(w.device() == device && w.is_contiguous(), "weights",
                      "contiguous tensors on one device (", device.str(), "), ", check::entry(i),
                      " is ", check::describe(w));
    int dt = 0;
    if (w.scalar_type() == at::kFloat) dt = 0;
    else if (w.scalar_type() == at::kHalf) dt = 1;
    else if (w.scalar_type() == at::kBFloat16) dt = 2;
    else FASTIMP_CHECK_ARG(false, "weights", "float32, float16 or bfloat16 tensors (",
                           check::entry(i), " is ", check::describe(w), ")");
    FASTIMP_CHECK_ARG(out[i].device() == device && out[i].is_contiguous() &&
                          out[i].scalar_type() == at::kBool && out[i].numel() == w.numel(),
                      "out", "contiguous bool tensors shaped like the weights on ", device.str());
    int64_t mptr = 0;
    if (!masks.empty()) {
      FASTIMP_CHECK_ARG(masks[i].device() == device && masks[i].is_contiguous() &&
                            masks[i].scalar_type() == at::kBool &&
                            masks[i].numel() == w.numel(),
                        "masks", "contiguous bool tensors shaped like the weights on ",
                        device.str());
      mptr = reinterpret_cast<int64_t>(masks[i].data_ptr());
    }
    const int64_t s = static_cast<int64_t>(i);
    seg_tab.insert(seg_tab.end(), {reinterpret_cast<int64_t>(w.data_ptr()), mptr,
                                   reinterpret_cast<int64_t>(out[i].data_ptr()), w.numel(),
                                   static_cast<int64_t>(dt)});
    for (int64_t b = 0; b < w.numel(); b += kChunk)
      chunk_tab.insert(chunk_tab.end(), {s, b, std::min(w.numel(), b + kChunk)});
    total += w.numel();
  }
  FASTIMP_CHECK_ARG(total < (int64_t(1) << 31), "weights", "fewer than 2^31 weights in all");
  const int64_t nc = static_cast<int64_t>(chunk_tab.size() / 3);
  auto opts_long = at::TensorOptions().dtype(at::kLong);
  auto segs = at::from_blob(seg_tab.data(), {static_cast<int64_t>(seg_tab.size())}, opts_long)
                  .to(device);
  at::Tensor chunks = at::empty({0}, opts_long.device(device));
  if (nc > 0) chunks = at::from_blob(chunk_tab.data(), {nc * 3}, opts_long).to(device);
  CudaPass pass{segs.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(), nc,
                at::zeros({kBins}, at::TensorOptions().dtype(at::kInt).device(device)),
                c10::cuda::getCurrentCUDAStream(device.index()).stream()};
  return radix::select(pass, k, fraction);
}

}  // namespace fastimp
