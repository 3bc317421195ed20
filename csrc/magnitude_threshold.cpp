// Placeholder until the op's kernels land; see docs/ARCHITECTURE.md.
#include "fastimp.h"

namespace fastimp {
void register_magnitude_threshold(pybind11::module_& m) {}
}  // namespace fastimp
