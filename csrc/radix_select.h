// The host driver of the 16+16-bit radix select, shared by the CPU and CUDA threshold kernels.
//
// The key of a weight is the IEEE bit pattern of |float(w)| (sign cleared): for non-negative
// floats, integer order of the bits = numeric order, and NaN/inf have keys >= 0x7f800000. Pass 1
// histograms key >> 16 over the unmasked weights, pass 2 key & 0xffff among keys in the selected
// high bin; ties at the threshold key T: the earliest positions (tensor order, then flat index)
// are pruned first.
#pragma once
#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastimp {
namespace radix {

constexpr int kBins = 1 << 16;             // one 16-bit digit of the float bits of |w|
constexpr uint32_t kNonFiniteHi = 0x7f80;  // hi16 of +inf; NaN/inf keys have hi16 >= this

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

// (n, k, threshold key bits, nonfinite): n unmasked weights, k pruned, the largest pruned key (0
// when k = 0); nonfinite > 0 (NaN/inf among the unmasked weights) means nothing was written.
using Result = std::tuple<int64_t, int64_t, int64_t, int64_t>;

// Runs the selection over `pass`, which provides
//   std::vector<int64_t> histogram(bool second, uint32_t hi)  // kBins counts (see above)
//   void write_kept()                        // k = 0: out = the old mask (ones without one)
//   void write_above(uint32_t t)             // out = live & (key > t): every tie at t pruned
//   void write_ranked(uint32_t t, int64_t r) // out = live & !(key < t or tie of rank < r)
// k: the number to prune, or none: round-half-even(fraction * n).
template <typename Pass>
Result select(Pass& pass, std::optional<int64_t> k_opt, double fraction) {
  std::vector<int64_t> hist = pass.histogram(false, 0);
  int64_t n = 0, nonfinite = 0;
  for (int b = 0; b < kBins; ++b) {
    n += hist[b];
    if (static_cast<uint32_t>(b) >= kNonFiniteHi) nonfinite += hist[b];
  }
  const int64_t k = k_opt.has_value()
                        ? *k_opt
                        : static_cast<int64_t>(std::nearbyint(fraction * static_cast<double>(n)));
  if (nonfinite > 0) return {n, k, 0, nonfinite};
  FASTIMP_CHECK_ARG(k >= 0 && k <= n, "k", "0 <= k <= the number of unmasked weights (",
                    std::to_string(n), "), got ", std::to_string(k));
  if (k == 0) {
    pass.write_kept();
    return {n, 0, 0, 0};
  }
  int64_t k_rem = 0;
  const uint32_t b1 = static_cast<uint32_t>(select_bin(hist, k, k_rem));
  hist = pass.histogram(true, b1);
  int64_t t_rem = 0;
  const uint32_t b2 = static_cast<uint32_t>(select_bin(hist, k_rem, t_rem));
  const uint32_t thr = (b1 << 16) | b2;
  if (t_rem == hist[b2]) {
    pass.write_above(thr);
  } else {
    pass.write_ranked(thr, t_rem);
  }
  return {n, k, static_cast<int64_t>(thr), 0};
}

}  // namespace radix
}  // namespace fastimp
