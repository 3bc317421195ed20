// Fused masked SGD step, multi-tensor, C++/OpenMP for the CPU (and the bindings of the CUDA one).
// The per-element formula and the hyperparameters are in masked_sgd.h. One pass: read p, g, b, m;
// write p, b.
#include "masked_sgd.h"

#include "dispatch.h"
#include "fastimp.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastimp {

#ifdef FASTIMP_WITH_CUDA
void masked_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<std::optional<at::Tensor>>& bufs,
                     const std::vector<std::optional<at::Tensor>>& masks,
                     const std::vector<bool>& init, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize,
                     bool decoupled);
std::tuple<at::Tensor, int64_t, int64_t, bool> masked_sgd_cuda_table(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& bufs,
    const std::vector<std::optional<at::Tensor>>& masks);
void masked_sgd_cuda_launch(const at::Tensor& table, int64_t n_tensors, int64_t n_chunks,
                            const at::Tensor& like, bool init, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double momentum,
                            double dampening, double weight_decay, bool nesterov, bool maximize,
                            bool decoupled);
#endif

namespace {

using sgd::Coeffs;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// x & keep on the bits (keep is all ones or 0): a select the vectorizer turns into one AND, and
// it zeroes NaN/inf at masked coordinates too.
template <typename acc_t>
inline acc_t and_bits(acc_t x, bool keep) {
  using U = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  U u;
  std::memcpy(&u, &x, sizeof(u));
  u &= U(0) - static_cast<U>(keep);
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The inner loop: MOM, WD, INIT, MASK are compile-time constants, so the loop has no branches
// that depend on the element and the compiler vectorizes it.
template <typename T, int MOM, int WD, bool INIT, bool MASK, bool FMA>
__attribute__((always_inline)) inline void step_range(const Coeffs<typename Acc<T>::type> c,
                                                      T* __restrict p, const T* __restrict g,
                                                      T* __restrict b,
                                                      const uint8_t* __restrict m, int64_t n) {
  using acc_t = typename Acc<T>::type;
  for (int64_t i = 0; i < n; ++i) {
    acc_t pi = static_cast<acc_t>(p[i]);
    acc_t bi = (MOM != sgd::kNoMom && !INIT) ? static_cast<acc_t>(b[i]) : acc_t(0);
    sgd::update<FMA>(c, MOM, WD, INIT, pi, static_cast<acc_t>(g[i]), bi);
    if constexpr (MASK) {
      const bool keep = m[i] != 0;
      pi = and_bits(pi, keep);
      bi = and_bits(bi, keep);
    }
    p[i] = static_cast<T>(pi);
    if constexpr (MOM != sgd::kNoMom) b[i] = static_cast<T>(bi);
  }
}

struct Work;
using RangeFn = void (*)(const Work&, int64_t start, int64_t n);

struct Work {
  RangeFn fn;
  void* p;
  const void* g;
  void* b;
  const uint8_t* m;
  int64_t n;
  Coeffs<float> cf;
  Coeffs<double> cd;
};

template <typename T, int MOM, int WD, bool INIT, bool MASK, bool FMA>
void run_range(const Work& w, int64_t start, int64_t n) {
  const auto& c = [&]() -> const Coeffs<typename Acc<T>::type>& {
    if constexpr (std::is_same_v<T, double>) return w.cd; else return w.cf;
  }();
  step_range<T, MOM, WD, INIT, MASK, FMA>(c, static_cast<T*>(w.p) + start,
                                          static_cast<const T*>(w.g) + start,
                                          w.b ? static_cast<T*>(w.b) + start : nullptr,
                                          w.m ? w.m + start : nullptr, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTIMP_HAVE_AVX2 1
// The same loop compiled for AVX2 + FMA (chosen at run time): fused multiply-adds, as ATen uses.
template <typename T, int MOM, int WD, bool INIT, bool MASK>
__attribute__((target("avx2,fma,f16c"))) void run_range_avx2(const Work& w, int64_t start,
                                                             int64_t n) {
  run_range<T, MOM, WD, INIT, MASK, true>(w, start, n);
}
#endif

template <typename T, int MOM, int WD, bool INIT, bool MASK>
RangeFn pick_isa() {
#ifdef FASTIMP_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return &run_range_avx2<T, MOM, WD, INIT, MASK>;
#endif
  return &run_range<T, MOM, WD, INIT, MASK, false>;
}

template <typename T>
RangeFn pick(int mom, int wd, bool init, bool mask) {
  RangeFn fn = nullptr;
  with_int<sgd::kNoMom, sgd::kMom, sgd::kNest>(mom, [&](auto M) {
    with_int<sgd::kNoWd, sgd::kCoupled, sgd::kDecoupled>(wd, [&](auto W) {
      with_bool(init && decltype(M)::value != sgd::kNoMom, [&](auto I) {
        with_bool(mask, [&](auto K) {
          fn = pick_isa<T, decltype(M)::value, decltype(W)::value, decltype(I)::value,
                        decltype(K)::value>();
        });
      });
    });
  });
  return fn;
}

RangeFn pick_dtype(at::ScalarType st, int mom, int wd, bool init, bool mask) {
  switch (st) {
    case at::kFloat: return pick<float>(mom, wd, init, mask);
    case at::kDouble: return pick<double>(mom, wd, init, mask);
    case at::kBFloat16: return pick<c10::BFloat16>(mom, wd, init, mask);
    default: return pick<c10::Half>(mom, wd, init, mask);
  }
}

constexpr int64_t kChunk = 16384;        // elements per scheduling unit (fits L1/L2 comfortably)
constexpr int64_t kSerialBelow = 32768;  // total elements under which threads cost more than they save

}  // namespace

// lr from the number, or from lr_tensor when given (read on the host here: a CPU tensor).
double host_lr(double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value()) return lr;
  check::device_scalar(*lr_tensor, at::Device(at::kCPU), "lr");
  return lr_tensor->item<double>();
}

// One step over a list of tensors (any mix of float32/float64/bf16/fp16 params, each with its
// grad, buffer and mask laid out alike). Buffers are required when momentum != 0; init[i] marks a
// buffer being created this step (torch.optim.SGD's buf = d, no dampening).
void masked_sgd_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
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
  const sgd::Hyper h = sgd::make_hyper(host_lr(lr, lr_tensor), momentum, dampening,
                                       weight_decay, nesterov, maximize, decoupled);
  const bool has_mom = h.mom != sgd::kNoMom;
  const Coeffs<float> cf = sgd::coeffs<float>(h.lr, h);
  const Coeffs<double> cd = sgd::coeffs<double>(h.lr, h);

  std::vector<Work> work;
  work.reserve(nt);
  std::vector<int64_t> first_chunk(nt + 1, 0);
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    FASTIMP_CHECK_ARG(p.device().is_cpu(), "params", "CPU tensors, got ", check::describe(p));
    FASTIMP_CHECK_ARG(p.is_non_overlapping_and_dense(), "params", "dense, non-overlapping tensors");
    FASTIMP_CHECK_ARG(check::is_float_kind(p.scalar_type()), "params",
                      "float32, float64, bfloat16 or float16 tensors, got ", check::describe(p));
    check::like_param(grads[i], p, "grads", i);
    void* bp = nullptr;
    if (has_mom) {
      FASTIMP_CHECK_ARG(bufs[i].has_value(), "bufs", "a buffer for every param when momentum != 0");
      check::like_param(*bufs[i], p, "bufs", i);
      bp = bufs[i]->data_ptr();
    }
    const uint8_t* mp = nullptr;
    if (masks[i].has_value()) {
      check::mask_like_param(*masks[i], p, "masks", i);
      mp = static_cast<const uint8_t*>(masks[i]->data_ptr());
    }
    check::sgd_no_overlap(p, grads[i], has_mom ? bufs[i] : std::nullopt, masks[i], i);
    const int64_t n = p.numel();
    work.push_back({pick_dtype(p.scalar_type(), h.mom, h.wd, init[i], mp != nullptr), p.data_ptr(),
                    grads[i].data_ptr(), bp, mp, n, cf, cd});
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
    w.fn(w, start, std::min(kChunk, w.n - start));
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
  namespace py = pybind11;
  m.def("masked_sgd_cpu", &masked_sgd_cpu, "Fused multi-tensor masked SGD step on CPU tensors",
        py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("masks"), py::arg("init"),
        py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("decoupled"),
        py::call_guard<py::gil_scoped_release>());
#ifdef FASTIMP_WITH_CUDA
  m.def("masked_sgd_cuda", &masked_sgd_cuda,
        "Fused multi-tensor masked SGD step on CUDA tensors of one device and dtype (checks, "
        "builds the device table and launches; one launch per init value)",
        py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("masks"), py::arg("init"),
        py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("decoupled"),
        py::call_guard<py::gil_scoped_release>());
  m.def("masked_sgd_cuda_table", &masked_sgd_cuda_table,
        "Checks a group and uploads its device table; returns (table, n_tensors, n_chunks, "
        "aligned). Refuses during CUDA graph capture.",
        py::arg("params"), py::arg("grads"), py::arg("bufs"), py::arg("masks"),
        py::call_guard<py::gil_scoped_release>());
  m.def("masked_sgd_cuda_launch", &masked_sgd_cuda_launch,
        "One launch over a table from masked_sgd_cuda_table: no host-to-device copy, no sync",
        py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("like"),
        py::arg("init"), py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("decoupled"), py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace fastimp
