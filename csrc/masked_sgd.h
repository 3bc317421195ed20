// The masked SGD step, defined once for the CPU (masked_sgd.cpp) and CUDA (masked_sgd_cuda.cu)
// kernels: the hyperparameters, the coefficients derived from them, and the per-element update.
//
// Per element, in acc_t (float for float32/bfloat16/float16 storage, double for float64), in
// torch.optim.SGD's order:
//   d = maximize ? -g : g
//   d = d + wd * p                              (coupled weight decay)
//   b = init ? d : momentum * b + (1 - dampening) * d
//   d = nesterov ? d + momentum * b : b
//   p = (decoupled ? p * (1 - lr * wd) : p) - lr * d
//   p = m ? p : 0,  b = m ? b : 0               (where a mask is given; done by the caller)
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTIMP_HD __host__ __device__ __forceinline__
#else
#define FASTIMP_HD inline __attribute__((always_inline))
#endif

namespace fastimp {
namespace sgd {

enum Mom : int { kNoMom = 0, kMom = 1, kNest = 2 };
enum Wd : int { kNoWd = 0, kCoupled = 1, kDecoupled = 2 };

// One step's hyperparameters as the caller gives them (lr may instead be read on the device).
struct Hyper {
  double lr, momentum, dampening, weight_decay;
  int mom, wd;  // Mom, Wd
  bool maximize;
};

inline Hyper make_hyper(double lr, double momentum, double dampening, double weight_decay,
                        bool nesterov, bool maximize, bool decoupled) {
  Hyper h;
  h.lr = lr;
  h.momentum = momentum;
  h.dampening = dampening;
  h.weight_decay = weight_decay;
  h.mom = momentum == 0.0 ? kNoMom : (nesterov ? kNest : kMom);
  h.wd = weight_decay == 0.0 ? kNoWd : (decoupled ? kDecoupled : kCoupled);
  h.maximize = maximize;
  return h;
}

// What the element loop multiplies with. Computed in double from lr, then rounded once to acc_t,
// on the host (lr given as a number) or on the device (lr read from a tensor): the same values.
template <typename acc_t>
struct Coeffs {
  acc_t neg_lr, momentum, one_minus_damp, wd, decay, sign;
};

template <typename acc_t>
FASTIMP_HD Coeffs<acc_t> coeffs(double lr, const Hyper& h) {
  Coeffs<acc_t> c;
  c.neg_lr = static_cast<acc_t>(-lr);
  c.momentum = static_cast<acc_t>(h.momentum);
  c.one_minus_damp = static_cast<acc_t>(1.0 - h.dampening);
  c.wd = static_cast<acc_t>(h.weight_decay);
  c.decay = static_cast<acc_t>(1.0 - lr * h.weight_decay);
  c.sign = h.maximize ? acc_t(-1) : acc_t(1);
  return c;
}

template <bool FMA, typename acc_t>
FASTIMP_HD acc_t madd(acc_t a, acc_t b, acc_t c) {
  if constexpr (FMA) {
#ifdef __CUDA_ARCH__
    return fma(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  } else {
    return a * b + c;
  }
}

// p, g, b in; p (before the mask) and b out. `b` is read only when mom != kNoMom and !init.
// Called with compile-time constant mom/wd/init by the CPU kernel (the branches fold away) and
// with values uniform over a launch by the CUDA kernel.
template <bool FMA, typename acc_t>
FASTIMP_HD void update(const Coeffs<acc_t>& c, int mom, int wd, bool init, acc_t& p, acc_t g,
                       acc_t& b) {
  acc_t d = g * c.sign;
  if (wd == kCoupled) d = madd<FMA>(p, c.wd, d);
  if (mom != kNoMom) {
    b = init ? d : madd<FMA>(d, c.one_minus_damp, b * c.momentum);
    d = mom == kNest ? madd<FMA>(b, c.momentum, d) : b;
  } else {
    b = acc_t(0);
  }
  p = madd<FMA>(d, c.neg_lr, wd == kDecoupled ? p * c.decay : p);
}

}  // namespace sgd
}  // namespace fastimp
