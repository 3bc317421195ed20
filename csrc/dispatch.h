// Compile-time switches: turn run-time values into template arguments without a hand-written
// ladder. with_int<0, 1, 2>(v, f) calls f(std::integral_constant<int, v>{}) for the listed value v
// equal to v; with_bool(b, f) likewise for true/false.
#pragma once
#include <c10/util/Exception.h>

#include <type_traits>

namespace fastimp {

template <int... Vs, typename F>
inline void with_int(int v, F&& f) {
  const bool found = ((v == Vs ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  TORCH_CHECK(found, "fastimp: internal error: no specialization for value ", v);
}

template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace fastimp
