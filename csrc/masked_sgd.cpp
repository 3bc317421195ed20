// Fused masked SGD step, multi-tensor, C++/OpenMP for the CPU (and the binding of the CUDA one).
//
// Per element, in fp32 whatever the storage dtype (fp32, bf16, fp16), in torch.optim.SGD's order:
//   d = maximize ? -g : g
//   d = d + wd * p                              (coupled weight decay)
//   b = init ? d : momentum * b + (1 - dampening) * d
//   d = nesterov ? d + momentum * b : b
//   p = (decoupled ? p * (1 - lr * wd) : p) - lr * d
//   p = m ? p : 0,  b = m ? b : 0               (where a mask is given)
// One pass: read p, g, b, m; write p, b.
#include "fastimp.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastimp {

#ifdef FASTIMP_WITH_CUDA
void masked_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<c10::optional<at::Tensor>>& bufs,
                     const std::vector<c10::optional<at::Tensor>>& masks,
                     const std::vector<bool>& init, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool decoupled);
#endif

namespace {

enum Mom { kNoMom = 0, kMom = 1, kMomInit = 2, kNest = 3, kNestInit = 4 };
enum Wd { kNoWd = 0, kCoupled = 1, kDecoupled = 2 };

struct Scalars {
  float neg_lr, momentum, one_minus_damp, wd, decay, sign;
};

template <bool FMA>
inline float madd(float a, float b, float c) {
  if constexpr (FMA) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

template <typename T>
inline float load(T x) { return static_cast<float>(x); }

// x & keep on the bits (keep is all ones or 0): a select the vectorizer turns into one AND, and
// it zeroes NaN/inf at masked coordinates too.
inline float and_bits(float x, uint32_t keep) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u &= keep;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The inner loop: no branches that depend on the element, so the compiler vectorizes it.
template <typename T, int MOM, int WD, bool MASK, bool FMA>
__attribute__((always_inline)) inline void step_range(const Scalars s, T* __restrict p,
                                                      const T* __restrict g, T* __restrict b,
                                                      const uint8_t* __restrict m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float pi = load(p[i]);
    float d = load(g[i]) * s.sign;
    if constexpr (WD == kCoupled) d = madd<FMA>(pi, s.wd, d);
    float bi = 0.f;
    if constexpr (MOM == kMomInit || MOM == kNestInit) {
      bi = d;
    } else if constexpr (MOM == kMom || MOM == kNest) {
      bi = madd<FMA>(d, s.one_minus_damp, load(b[i]) * s.momentum);
    }
    if constexpr (MOM == kNest || MOM == kNestInit) {
      d = madd<FMA>(bi, s.momentum, d);
    } else if constexpr (MOM != kNoMom) {
      d = bi;
    }
    float pn;
    if constexpr (WD == kDecoupled) {
      pn = madd<FMA>(d, s.neg_lr, pi * s.decay);
    } else {
      pn = madd<FMA>(d, s.neg_lr, pi);
    }
    if constexpr (MASK) {
      const uint32_t keep = 0u - static_cast<uint32_t>(m[i] != 0);
      pn = and_bits(pn, keep);
      bi = and_bits(bi, keep);
    }
    p[i] = static_cast<T>(pn);
    if constexpr (MOM != kNoMom) b[i] = static_cast<T>(bi);
  }
}

using RangeFn = void (*)(const Scalars, void*, const void*, void*, const uint8_t*, int64_t);

template <typename T, int MOM, int WD, bool MASK>
void range_default(const Scalars s, void* p, const void* g, void* b, const uint8_t* m, int64_t n) {
  step_range<T, MOM, WD, MASK, false>(s, static_cast<T*>(p), static_cast<const T*>(g),
                                      static_cast<T*>(b), m, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTIMP_HAVE_AVX2 1
// Same loop compiled for AVX2 + FMA (chosen at run time): fused multiply-adds, as ATen's kernels use.
template <typename T, int MOM, int WD, bool MASK>
__attribute__((target("avx2,fma,f16c"))) void range_avx2(const Scalars s, void* p, const void* g,
                                                         void* b, const uint8_t* m, int64_t n) {
  step_range<T, MOM, WD, MASK, true>(s, static_cast<T*>(p), static_cast<const T*>(g),
                                     static_cast<T*>(b), m, n);
}
#endif

template <typename T, int MOM, int WD, bool MASK>
RangeFn pick_isa() {
#ifdef FASTIMP_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return &range_avx2<T, MOM, WD, MASK>;
#endif
  return &range_default<T, MOM, WD, MASK>;
}

template <typename T, int MOM, int WD>
RangeFn pick_mask(bool mask) {
  return mask ? pick_isa<T, MOM, WD, true>() : pick_isa<T, MOM, WD, false>();
}

template <typename T, int MOM>
RangeFn pick_wd(int wd, bool mask) {
  switch (wd) {
    case kCoupled: return pick_mask<T, MOM, kCoupled>(mask);
    case kDecoupled: return pick_mask<T, MOM, kDecoupled>(mask);
    default: return pick_mask<T, MOM, kNoWd>(mask);
  }
}

template <typename T>
RangeFn pick(int mom, int wd, bool mask) {
  switch (mom) {
    case kMom: return pick_wd<T, kMom>(wd, mask);
    case kMomInit: return pick_wd<T, kMomInit>(wd, mask);
    case kNest: return pick_wd<T, kNest>(wd, mask);
    case kNestInit: return pick_wd<T, kNestInit>(wd, mask);
    default: return pick_wd<T, kNoMom>(wd, mask);
  }
}

struct Work {
  RangeFn fn;
  char* p;
  const char* g;
  char* b;
  const uint8_t* m;
  int64_t n;
  int64_t elem;  // bytes per element of p, g, b
};

constexpr int64_t kChunk = 16384;  // elements per scheduling unit (fits L1/L2 comfortably)
constexpr int64_t kSerialBelow = 32768;  // total elements under which threads cost more than they save

void check_same_layout(const at::Tensor& t, const at::Tensor& p, const char* name, size_t i,
                       bool same_dtype) {
  FASTIMP_CHECK_ARG(t.device() == p.device(), name,
                    "tensor " + std::to_string(i) + " on the device of its param (" +
                        p.device().str() + "), got " + t.device().str());
  FASTIMP_CHECK_ARG(t.sizes() == p.sizes() && (t.strides() == p.strides() ||
                                                (t.is_contiguous() && p.is_contiguous())),
                    name,
                    "tensor " + std::to_string(i) + " with the shape and strides of its param");
  if (same_dtype) {
    FASTIMP_CHECK_ARG(t.scalar_type() == p.scalar_type(), name,
                      "tensor " + std::to_string(i) + " of the param's dtype " +
                          std::string(c10::toString(p.scalar_type())));
  } else {
    FASTIMP_CHECK_ARG(t.scalar_type() == at::kBool || t.scalar_type() == at::kByte, name,
                      "tensor " + std::to_string(i) + " of dtype bool or uint8");
  }
}

}  // namespace

// One step over a list of tensors (any mix of fp32/bf16/fp16 params, each with its grad, buffer
// and mask of the same shape and strides). Buffers are required when momentum != 0; init[i]
// marks a buffer being created this step (torch.optim.SGD's buf = d, no dampening).
void masked_sgd_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<c10::optional<at::Tensor>>& bufs,
                    const std::vector<c10::optional<at::Tensor>>& masks,
                    const std::vector<bool>& init, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool decoupled) {
  const size_t nt = params.size();
  FASTIMP_CHECK_ARG(grads.size() == nt && bufs.size() == nt && masks.size() == nt &&
                        init.size() == nt,
                    "params", "lists params, grads, bufs, masks, init of one length");
  FASTIMP_CHECK_ARG(!nesterov || momentum != 0.0, "nesterov", "momentum != 0");
  const bool has_mom = momentum != 0.0;
  const int wd = weight_decay == 0.0 ? kNoWd : (decoupled ? kDecoupled : kCoupled);
  Scalars s;
  s.neg_lr = static_cast<float>(-lr);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_damp = static_cast<float>(1.0 - dampening);
  s.wd = static_cast<float>(weight_decay);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.sign = maximize ? -1.f : 1.f;

  std::vector<Work> work;
  work.reserve(nt);
  std::vector<int64_t> first_chunk(nt + 1, 0);
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    FASTIMP_CHECK_ARG(p.device().is_cpu(), "params", "CPU tensors");
    FASTIMP_CHECK_ARG(p.is_non_overlapping_and_dense(), "params",
                      "dense, non-overlapping tensors");
    const auto st = p.scalar_type();
    FASTIMP_CHECK_ARG(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "params",
                      "float32, bfloat16 or float16 tensors");
    check_same_layout(grads[i], p, "grads", i, true);
    char* bp = nullptr;
    if (has_mom) {
      FASTIMP_CHECK_ARG(bufs[i].has_value(), "bufs", "a buffer for every param when momentum != 0");
      check_same_layout(*bufs[i], p, "bufs", i, true);
      bp = static_cast<char*>(bufs[i]->data_ptr());
    }
    const uint8_t* mp = nullptr;
    if (masks[i].has_value()) {
      check_same_layout(*masks[i], p, "masks", i, false);
      mp = static_cast<const uint8_t*>(masks[i]->data_ptr());
    }
    int mom = kNoMom;
    if (has_mom) mom = nesterov ? (init[i] ? kNestInit : kNest) : (init[i] ? kMomInit : kMom);
    RangeFn fn = st == at::kFloat      ? pick<float>(mom, wd, mp != nullptr)
                 : st == at::kBFloat16 ? pick<c10::BFloat16>(mom, wd, mp != nullptr)
                                       : pick<c10::Half>(mom, wd, mp != nullptr);
    const int64_t n = p.numel();
    work.push_back({fn, static_cast<char*>(p.data_ptr()),
                    static_cast<const char*>(grads[i].data_ptr()), bp, mp, n,
                    static_cast<int64_t>(p.element_size())});
    first_chunk[i + 1] = first_chunk[i] + (n + kChunk - 1) / kChunk;
  }
  const int64_t total_chunks = first_chunk[nt];
  int64_t total = 0;
  for (const auto& w : work) total += w.n;

  auto run_chunk = [&](int64_t c) {
    const size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) -
                     first_chunk.begin() - 1;
    const Work& w = work[i];
    const int64_t start = (c - first_chunk[i]) * kChunk;
    const int64_t n = std::min(kChunk, w.n - start);
    w.fn(s, w.p + start * w.elem, w.g + start * w.elem, w.b ? w.b + start * w.elem : nullptr,
         w.m ? w.m + start : nullptr, n);
  };
#ifdef _OPENMP
  const int threads = std::max(1, at::get_num_threads());
  if (total >= kSerialBelow && threads > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < total_chunks; ++c) run_chunk(c);
    return;
  }
#endif
  for (int64_t c = 0; c < total_chunks; ++c) run_chunk(c);
}

void register_masked_sgd(pybind11::module_& m) {
  m.def("masked_sgd_cpu", &masked_sgd_cpu, "Fused multi-tensor masked SGD step on CPU tensors",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("bufs"),
        pybind11::arg("masks"), pybind11::arg("init"), pybind11::arg("lr"),
        pybind11::arg("momentum"), pybind11::arg("dampening"), pybind11::arg("weight_decay"),
        pybind11::arg("nesterov"), pybind11::arg("maximize"), pybind11::arg("decoupled"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef FASTIMP_WITH_CUDA
  m.def("masked_sgd_cuda", &masked_sgd_cuda,
        "Fused multi-tensor masked SGD step on CUDA tensors (one launch per device and dtype)",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("bufs"),
        pybind11::arg("masks"), pybind11::arg("init"), pybind11::arg("lr"),
        pybind11::arg("momentum"), pybind11::arg("dampening"), pybind11::arg("weight_decay"),
        pybind11::arg("nesterov"), pybind11::arg("maximize"), pybind11::arg("decoupled"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
#endif
}

}  // namespace fastimp
