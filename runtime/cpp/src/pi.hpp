// pi as a double: standard C++17 has no constant for it (M_PI is POSIX's, std::numbers::pi C++20's).
#pragma once

namespace seesr {

inline constexpr double kPi = 3.141592653589793238462643383279502884;

}  // namespace seesr
