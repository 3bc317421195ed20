// Host-side pieces of the 16+16-bit radix select shared by the CPU and CUDA threshold kernels.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace fastimp {
namespace radix {

constexpr int kBins = 1 << 16;  // one 16-bit digit of the float bits of |w|

// First bin b with cum[b] >= k (k >= 1); returns b and sets k_rem = k - cum[b - 1].
inline int select_bin(const std::vector<int64_t>& hist, int64_t k, int64_t& k_rem) {
  int64_t cum = 0;
  for (int b = 0; b < kBins; ++b) {
    if (cum + hist[b] >= k) {
      k_rem = k - cum;
      return b;
    }
    cum += hist[b];
  }
  TORCH_CHECK(false, "fastimp: magnitude_threshold: radix select ran past the histogram");
  return -1;
}

}  // namespace radix
}  // namespace fastimp
