#include "fastimp.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastimp compiled kernels (C++/OpenMP for the CPU, CUDA for NVIDIA GPUs)";
  m.def("cuda_compiled", []() {
#ifdef FASTIMP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "OpenMP threads the CPU kernels use (1 without OpenMP).");
  fastimp::register_masked_sgd(m);
  fastimp::register_magnitude_threshold(m);
  fastimp::register_weight_points(m);
}
