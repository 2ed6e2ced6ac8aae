// The decoded image to 8 bits and the colour fixes against the working image, computed in float32 as
// seesr_runtime/imaging.py computes them with numpy (its pairwise sums included), so that results agree to
// the level.
#pragma once

#include "resample.hpp"
#include "tensor.hpp"

#include <string>

namespace seesr {

// VAE output [1, 3, H, W] in about [-1, 1] -> RGB8, rounding half to even as numpy (to_uint8_rounded).
Rgb8Image to_uint8_rounded(const Tensor &image);

// `target` corrected against `source` (same size) by `kind`: "adain" (per-channel mean and std),
// "wavelet" (target's high frequencies over source's low one) or "none" (target unchanged); an option
// error for any other kind.
Rgb8Image color_fix(const std::string &kind, const Rgb8Image &target, const Rgb8Image &source);

// numpy's float32 sum of n values `stride` apart (pairwise, blocks of 8 lanes up to 128 values).
float pairwise_sum(const float *values, std::size_t n, std::size_t stride = 1);

}  // namespace seesr
