// fastimp._C: one pybind11 module; each op's file registers its own functions.
#pragma once
#include <torch/extension.h>

namespace fastimp {
void register_masked_sgd(pybind11::module_& m);
void register_magnitude_threshold(pybind11::module_& m);
void register_weight_points(pybind11::module_& m);
}  // namespace fastimp

#define FASTIMP_CHECK_ARG(cond, name, what) \
  TORCH_CHECK_VALUE(cond, "fastimp: argument '", name, "': expected ", what)
