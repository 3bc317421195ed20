// fastimp._C: one pybind11 module; each op's file registers its own functions.
#pragma once
#include <torch/extension.h>

#include "checks.h"

namespace fastimp {
void register_masked_sgd(pybind11::module_& m);
void register_magnitude_threshold(pybind11::module_& m);
void register_weight_points(pybind11::module_& m);
}  // namespace fastimp
