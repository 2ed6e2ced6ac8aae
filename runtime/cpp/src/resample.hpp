// Bicubic resizing of RGB8 images with the arithmetic of PIL's Image.resize(..., Image.BICUBIC), which the
// official code (and so the Python runtime's working_image and final resize) uses: a separable cubic
// convolution (a = -0.5) widened by the scale when shrinking, fixed-point weights, one axis after the other,
// each pass rounded to 8 bits, in Pillow 13's order of the passes (see resize_bicubic).
#pragma once

#include "imaging.hpp"

#include <cstdint>
#include <vector>

namespace seesr {

struct Rgb8Image {
    std::vector<std::uint8_t> pixels;  // rows of 3 * width bytes
    std::int32_t width = 0, height = 0;
    RgbView view() const { return {pixels.data(), width, height, 3 * width}; }
};

Rgb8Image resize_bicubic(const RgbView &image, std::int32_t width, std::int32_t height);

// The image at the size SeeSR denoises (imaging.working_image): the short side raised to
// process_size / upscale if smaller, then x upscale, then resampled (not cropped) to multiples of 8.
Rgb8Image working_image(const RgbView &lr, std::int64_t process_size, std::int64_t upscale);

}  // namespace seesr
