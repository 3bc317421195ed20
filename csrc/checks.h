// Argument checks shared by every compiled op, host code of .cpp and .cu files alike (ATen only,
// no pybind11, so nvcc can include it). Errors are ValueErrors naming the argument:
//   fastimp: argument 'grads': expected tensor 3 with the dtype of its param (float32), got ...
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstddef>
#include <optional>
#include <string>

#define FASTIMP_CHECK_ARG(cond, name, ...) \
  TORCH_CHECK_VALUE(cond, "fastimp: argument '", name, "': expected ", __VA_ARGS__)

namespace fastimp {
namespace check {

inline std::string entry(size_t i) { return "tensor " + std::to_string(i); }

// Every list has n entries (argument `name`: "lists ... of one length").
template <typename... Lists>
inline void same_length(const char* name, const char* what, size_t n,
                        const Lists&... lists) {
  FASTIMP_CHECK_ARG(((lists.size() == n) && ...), name, what);
}

inline std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " " + c10::str(t.sizes()) + " on " +
         t.device().str();
}

// Same elements in the same memory order as p: equal strides, or both contiguous (size-1 dims
// may carry any stride).
inline bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  return t.sizes() == p.sizes() &&
         (t.strides() == p.strides() || (t.is_contiguous() && p.is_contiguous()));
}

// t (entry i of argument `name`) has p's device, shape and memory layout, and p's dtype.
inline void like_param(const at::Tensor& t, const at::Tensor& p, const char* name, size_t i) {
  FASTIMP_CHECK_ARG(t.device() == p.device() && t.scalar_type() == p.scalar_type() &&
                        same_layout(t, p),
                    name, entry(i), " with the dtype, device, shape and strides of its param (",
                    describe(p), "), got ", describe(t));
}

// A mask: bool or uint8, laid out like p on p's device.
inline void mask_like_param(const at::Tensor& m, const at::Tensor& p, const char* name,
                            size_t i) {
  FASTIMP_CHECK_ARG(m.device() == p.device() &&
                        (m.scalar_type() == at::kBool || m.scalar_type() == at::kByte) &&
                        same_layout(m, p),
                    name, entry(i), " of dtype bool or uint8 with the device, shape and strides "
                    "of its param (", describe(p), "), got ", describe(m));
}

// Entry i of `a` and of `b` share no memory (an op writing one while reading the other);
// fastimp/ops/_overlap.py says the same in Python.
inline void no_overlap(const at::Tensor& x, const char* a, const at::Tensor& y, const char* b,
                       size_t i) {
  TORCH_CHECK_VALUE(at::get_overlap_status(x, y) == at::MemOverlapStatus::No,
                    "fastimp: arguments '", a, "' and '", b, "': ", entry(i),
                    " of each overlap in memory; expected separate tensors");
}

// Masked SGD writes p and b and reads g and m: none of p, b may share memory with another.
inline void sgd_no_overlap(const at::Tensor& p, const at::Tensor& g,
                           const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& m, size_t i) {
  no_overlap(p, "params", g, "grads", i);
  if (b.has_value()) no_overlap(p, "params", *b, "bufs", i);
  if (m.has_value()) no_overlap(p, "params", *m, "masks", i);
  if (b.has_value()) {
    no_overlap(g, "grads", *b, "bufs", i);
    if (m.has_value()) no_overlap(*b, "bufs", *m, "masks", i);
  }
}

inline bool is_float_kind(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}

// A 0-dim (or one-element) float32/float64 tensor on `device`: a learning rate read on the device.
inline void device_scalar(const at::Tensor& t, const at::Device& device, const char* name) {
  FASTIMP_CHECK_ARG(t.numel() == 1 && (t.scalar_type() == at::kFloat ||
                                       t.scalar_type() == at::kDouble) && t.device() == device,
                    name, "a one-element float32 or float64 tensor on ", device.str(), ", got ",
                    describe(t));
}

}  // namespace check
}  // namespace fastimp
