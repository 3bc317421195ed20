// Global magnitude threshold on the CPU: two-pass 16+16-bit radix select over the float bits of
// |w| among unmasked weights (per-thread histograms, OpenMP), then one mask-writing pass.
// The key of a weight is the IEEE bit pattern of |float(w)| (sign cleared): for non-negative
// floats, integer order of the bits = numeric order, and NaN/inf have keys >= 0x7f800000.
// Ties at the threshold key T: the earliest positions (tensor order, then flat index) go first.
#include "radix_select.h"
#include "fastimp.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastimp {
namespace {

constexpr int64_t kChunk = 1 << 16;
using radix::kBins;

enum class DT { F32, F16, BF16 };

struct Seg {
  const void* w;
  const uint8_t* m;  // nullptr: nothing masked
  uint8_t* o;
  int64_t n;
  DT dt;
};

struct Chunk {
  int seg;
  int64_t begin, end;
};

inline uint32_t key_f32(const uint32_t* w, int64_t i) { return w[i] & 0x7fffffffu; }
inline uint32_t key_bf16(const uint16_t* w, int64_t i) {
  return (static_cast<uint32_t>(w[i]) << 16) & 0x7fffffffu;
}
inline uint32_t key_f16(const at::Half* w, int64_t i) {
  float f = static_cast<float>(w[i]);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b & 0x7fffffffu;
}

// Calls body(key_fn) with a lambda key(i) -> uint32 specialised for the segment's dtype.
template <typename Body>
inline void with_keys(const Seg& s, Body&& body) {
  switch (s.dt) {
    case DT::F32: {
      auto p = static_cast<const uint32_t*>(s.w);
      body([p](int64_t i) { return key_f32(p, i); });
      break;
    }
    case DT::BF16: {
      auto p = static_cast<const uint16_t*>(s.w);
      body([p](int64_t i) { return key_bf16(p, i); });
      break;
    }
    case DT::F16: {
      auto p = static_cast<const at::Half*>(s.w);
      body([p](int64_t i) { return key_f16(p, i); });
      break;
    }
  }
}

// hist[digit] over unmasked weights; digit = key >> 16 (pass 1) or key & 0xffff among keys whose
// hi16 == hi (pass 2).
void histogram(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, bool second,
               uint32_t hi, std::vector<int64_t>& hist) {
  hist.assign(kBins, 0);
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel
  {
    std::vector<uint32_t> h(kBins + 16, 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t c = 0; c < nc; ++c) {
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
      with_keys(s, [&](auto key) {
        if (!second) {
          if (s.m) {
            for (int64_t i = ch.begin; i < ch.end; ++i) h[key(i) >> 16] += s.m[i];
          } else {
            for (int64_t i = ch.begin; i < ch.end; ++i) h[key(i) >> 16] += 1;
          }
        } else {
          // Keys of the selected high bin are rare: test 16 at a time without branches, and
          // count a group with a match branch-free (a non-matching key goes to one of 16 spare
          // bins past the end), which also stays fast when the bin is dense.
          auto run = [&](auto live) {
            int64_t i = ch.begin;
            for (; i + 16 <= ch.end; i += 16) {
              uint32_t any = 0;
              for (int j = 0; j < 16; ++j)
                any |= static_cast<uint32_t>((key(i + j) >> 16) == hi) & live(i + j);
              if (!any) continue;
              for (int j = 0; j < 16; ++j) {
                const uint32_t k = key(i + j);
                const uint32_t sel = 0u - (static_cast<uint32_t>((k >> 16) == hi) & live(i + j));
                h[((k & 0xffffu) & sel) | ((kBins + j) & ~sel)] += 1;
              }
            }
            for (; i < ch.end; ++i) {
              const uint32_t k = key(i);
              if ((k >> 16) == hi && live(i)) h[k & 0xffffu] += 1;
            }
          };
          if (s.m) {
            const uint8_t* m = s.m;
            run([m](int64_t i) { return static_cast<uint32_t>(m[i]); });
          } else {
            run([](int64_t) { return 1u; });
          }
        }
      });
    }
#pragma omp critical
    for (int b = 0; b < kBins; ++b) hist[b] += h[b];
  }
}


// out = mask & !(key < T or (key == T and rank of this tie < t_rem)). t_rem < 0: key <= T pruned
// (every tie); T = -1 (k = 0): nothing pruned.
void write_masks(const std::vector<Seg>& segs, const std::vector<Chunk>& chunks, int64_t T,
                 int64_t t_rem) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
  if (t_rem < 0) {
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t c = 0; c < nc; ++c) {
      const Chunk& ch = chunks[c];
      const Seg& s = segs[ch.seg];
      uint8_t* __restrict__ o = s.o;
      const uint8_t* __restrict__ m = s.m;
      const int64_t b = ch.begin, e = ch.end;
      if (T < 0) {  // k = 0: the new mask is the old one
        if (m) std::memcpy(o + b, m + b, static_cast<size_t>(e - b));
        else std::memset(o + b, 1, static_cast<size_t>(e - b));
        continue;
      }
      const uint32_t t = static_cast<uint32_t>(T);
      with_keys(s, [&](auto key) {
        if (m) {
          for (int64_t i = b; i < e; ++i)
            o[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(key(i) > t));
        } else {
          for (int64_t i = b; i < e; ++i) o[i] = static_cast<uint8_t>(key(i) > t);
        }
      });
    }
    return;
  }
  // Ties split: count the unmasked keys == T per chunk, scan in position order, then write.
  const uint32_t t = static_cast<uint32_t>(T);
  std::vector<int64_t> eq(nc + 1, 0);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& ch = chunks[c];
    const Seg& s = segs[ch.seg];
    int64_t cnt = 0;
    with_keys(s, [&](auto key) {
      if (s.m) {
        for (int64_t i = ch.begin; i < ch.end; ++i) cnt += (key(i) == t) & s.m[i];
      } else {
        for (int64_t i = ch.begin; i < ch.end; ++i) cnt += (key(i) == t);
      }
    });
    eq[c + 1] = cnt;
  }
  for (int64_t c = 0; c < nc; ++c) eq[c + 1] += eq[c];
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& ch = chunks[c];
    const Seg& s = segs[ch.seg];
    int64_t rank = eq[c];
    with_keys(s, [&](auto key) {
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        const uint32_t k = key(i);
        const uint32_t live = s.m ? s.m[i] : 1u;
        const int64_t tie = static_cast<int64_t>((k == t) & live);
        const uint32_t pruned = static_cast<uint32_t>(k < t) |
                                static_cast<uint32_t>(tie & static_cast<int64_t>(rank < t_rem));
        rank += tie;
        s.o[i] = static_cast<uint8_t>(live & (pruned ^ 1u));
      }
    });
  }
}

DT dtype_of(const at::Tensor& w, size_t i) {
  switch (w.scalar_type()) {
    case at::kFloat: return DT::F32;
    case at::kHalf: return DT::F16;
    case at::kBFloat16: return DT::BF16;
    default:
      FASTIMP_CHECK_ARG(false, "weights", "float32, float16 or bfloat16 tensors (",
                        check::entry(i), " is ", check::describe(w), ")");
  }
  return DT::F32;
}

// The CPU passes of radix::select.
struct CpuPass {
  const std::vector<Seg>& segs;
  const std::vector<Chunk>& chunks;
  std::vector<int64_t> histogram(bool second, uint32_t hi) {
    std::vector<int64_t> h;
    fastimp::histogram(segs, chunks, second, hi, h);
    return h;
  }
  void write_kept() { write_masks(segs, chunks, -1, -1); }
  void write_above(uint32_t t) { write_masks(segs, chunks, t, -1); }
  void write_ranked(uint32_t t, int64_t t_rem) { write_masks(segs, chunks, t, t_rem); }
};

}  // namespace

// Returns (n, k, threshold key bits, nonfinite); k none: k = round-half-even(fraction * n).
// When some unmasked weight is NaN/inf, nothing is written and nonfinite > 0.
radix::Result magnitude_threshold_cpu(std::vector<at::Tensor> weights,
                                      std::vector<at::Tensor> masks, std::vector<at::Tensor> out,
                                      std::optional<int64_t> k, double fraction) {
  const size_t T = weights.size();
  FASTIMP_CHECK_ARG(masks.empty() || masks.size() == T, "masks",
                    "an empty list or one mask per weight tensor");
  FASTIMP_CHECK_ARG(out.size() == T, "out", "one output mask per weight tensor");
  std::vector<Seg> segs;
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < T; ++i) {
    const auto& w = weights[i];
    FASTIMP_CHECK_ARG(w.device().is_cpu() && w.is_contiguous(), "weights",
                      "contiguous CPU tensors, got ", check::describe(w));
    FASTIMP_CHECK_ARG(out[i].device().is_cpu() && out[i].is_contiguous() &&
                          out[i].scalar_type() == at::kBool && out[i].numel() == w.numel(),
                      "out", "contiguous CPU bool tensors shaped like the weights");
    const uint8_t* m = nullptr;
    if (!masks.empty()) {
      FASTIMP_CHECK_ARG(masks[i].device().is_cpu() && masks[i].is_contiguous() &&
                            masks[i].scalar_type() == at::kBool &&
                            masks[i].numel() == w.numel(),
                        "masks", "contiguous CPU bool tensors shaped like the weights");
      m = reinterpret_cast<const uint8_t*>(masks[i].data_ptr<bool>());
    }
    Seg s{w.data_ptr(), m, reinterpret_cast<uint8_t*>(out[i].data_ptr<bool>()), w.numel(),
          dtype_of(w, i)};
    for (int64_t b = 0; b < s.n; b += kChunk)
      chunks.push_back({static_cast<int>(segs.size()), b, std::min(s.n, b + kChunk)});
    segs.push_back(s);
    total += s.n;
  }
  FASTIMP_CHECK_ARG(total < (int64_t(1) << 32), "weights", "fewer than 2^32 weights in all");
  CpuPass pass{segs, chunks};
  return radix::select(pass, k, fraction);
}

#ifdef FASTIMP_WITH_CUDA
radix::Result magnitude_threshold_cuda(std::vector<at::Tensor> weights,
                                       std::vector<at::Tensor> masks,
                                       std::vector<at::Tensor> out, std::optional<int64_t> k,
                                       double fraction);
#endif

void register_magnitude_threshold(pybind11::module_& m) {
  m.def("magnitude_threshold_cpu", &magnitude_threshold_cpu, pybind11::arg("weights"),
        pybind11::arg("masks"), pybind11::arg("out"), pybind11::arg("k"),
        pybind11::arg("fraction"),
        "Remove the k smallest unmasked |w| (k None: round(fraction * n)), ties by position; "
        "writes out; returns (n, k, threshold bits, nonfinite).",
        pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef FASTIMP_WITH_CUDA
  m.def("magnitude_threshold_cuda", &magnitude_threshold_cuda, pybind11::arg("weights"),
        pybind11::arg("masks"), pybind11::arg("out"), pybind11::arg("k"),
        pybind11::arg("fraction"),
        "CUDA version of magnitude_threshold_cpu (tensors on one CUDA device).",
        pybind11::call_guard<pybind11::gil_scoped_release>());
#endif
}

}  // namespace fastimp
