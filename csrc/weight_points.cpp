// weight_points: theta[k, i] = origin[i] + sum_j c_kj(i) * U[j, i], with c_kj(i) the coefficient
// clamped to [lo_j, hi_j] where clip[i] (non-prunable coordinates; paper, Appendix B).
// One pass over the output; OpenMP over blocks of coordinates (all K points of a block).
#include "fastimp.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <initializer_list>
#include <vector>

namespace fastimp {
namespace {

constexpr int64_t kBlock = 2048;

// out[i] += (clip[i] ? cc : c) * u[i] over one block. The select is done on the bits (all-ones
// or zero masks from the clip byte) and the pointers are restrict: GCC vectorizes this form (a
// plain ?: on a bool it left scalar).
template <typename T>
inline void axpy_clipped(T* __restrict__ o, const T* __restrict__ u,
                         const bool* __restrict__ clip, T c, T cc, int64_t n) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  U bc, b0;
  std::memcpy(&bc, &cc, sizeof(T));
  std::memcpy(&b0, &c, sizeof(T));
  const uint8_t* __restrict__ m = reinterpret_cast<const uint8_t*>(clip);
  for (int64_t i = 0; i < n; ++i) {
    const U sel = U(0) - static_cast<U>(m[i] != 0);
    const U bits = (bc & sel) | (b0 & ~sel);
    T coef;
    std::memcpy(&coef, &bits, sizeof(T));
    o[i] += coef * u[i];
  }
}

// One task per block of coordinates: its origin, directions and clip flags are read from memory
// once and stay in cache while the K outputs of the block are written.
template <typename T>
void weight_points_kernel(const T* origin, const T* U, const T* C, const bool* clip, const T* lo,
                          const T* hi, T* out, int64_t K, int64_t J, int64_t D) {
  const int64_t nblocks = (D + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t start = blk * kBlock;
    const int64_t n = std::min(D, start + kBlock) - start;
    for (int64_t k = 0; k < K; ++k) {
      T* o = out + k * D + start;
      std::copy(origin + start, origin + start + n, o);
      for (int64_t j = 0; j < J; ++j) {
        const T c = C[k * J + j];
        const T cc = std::min(std::max(c, lo[j]), hi[j]);
        axpy_clipped(o, U + j * D + start, clip + start, c, cc, n);
      }
    }
  }
}

void weight_points_cpu(const torch::Tensor& origin, const torch::Tensor& directions,
                       const torch::Tensor& coeffs, const torch::Tensor& clip,
                       const torch::Tensor& lo, const torch::Tensor& hi, torch::Tensor out) {
  FASTIMP_CHECK_ARG(origin.dim() == 1 && origin.is_contiguous() && origin.device().is_cpu(),
                    "origin", "a contiguous 1-D CPU tensor");
  const int64_t D = origin.size(0);
  FASTIMP_CHECK_ARG(directions.dim() == 2 && directions.size(1) == D && directions.is_contiguous(),
                    "directions", "a contiguous tensor [J, D]");
  const int64_t J = directions.size(0);
  FASTIMP_CHECK_ARG(coeffs.dim() == 2 && coeffs.size(1) == J && coeffs.is_contiguous(), "coeffs",
                    "a contiguous tensor [K, J]");
  const int64_t K = coeffs.size(0);
  FASTIMP_CHECK_ARG(clip.scalar_type() == torch::kBool && clip.numel() == D && clip.is_contiguous(),
                    "clip", "a contiguous bool tensor [D]");
  FASTIMP_CHECK_ARG(lo.numel() == J && hi.numel() == J && lo.is_contiguous() && hi.is_contiguous(),
                    "lo/hi", "contiguous tensors [J]");
  FASTIMP_CHECK_ARG(out.dim() == 2 && out.size(0) == K && out.size(1) == D && out.is_contiguous(),
                    "out", "a contiguous tensor [K, D]");
  const auto dt = origin.scalar_type();
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&directions, &coeffs, &lo, &hi, &out}) {
    FASTIMP_CHECK_ARG(t->scalar_type() == dt && t->device().is_cpu(), "directions/coeffs/lo/hi/out",
                      "CPU tensors of origin's dtype");
  }
  FASTIMP_CHECK_ARG(clip.device().is_cpu(), "clip", "a CPU tensor");
  if (K == 0 || D == 0) return;
  if (dt == torch::kFloat) {
    weight_points_kernel<float>(origin.data_ptr<float>(), directions.data_ptr<float>(),
                                coeffs.data_ptr<float>(), clip.data_ptr<bool>(), lo.data_ptr<float>(),
                                hi.data_ptr<float>(), out.data_ptr<float>(), K, J, D);
  } else if (dt == torch::kDouble) {
    weight_points_kernel<double>(origin.data_ptr<double>(), directions.data_ptr<double>(),
                                 coeffs.data_ptr<double>(), clip.data_ptr<bool>(),
                                 lo.data_ptr<double>(), hi.data_ptr<double>(),
                                 out.data_ptr<double>(), K, J, D);
  } else {
    FASTIMP_CHECK_ARG(false, "origin", "dtype float32 or float64");
  }
}

}  // namespace

void register_weight_points(pybind11::module_& m) {
  m.def("weight_points_cpu", &weight_points_cpu, "theta = origin + coeffs @ directions (clamped "
        "coefficients where clip), written into out [K, D]",
        pybind11::arg("origin"), pybind11::arg("directions"), pybind11::arg("coeffs"),
        pybind11::arg("clip"), pybind11::arg("lo"), pybind11::arg("hi"), pybind11::arg("out"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace fastimp
