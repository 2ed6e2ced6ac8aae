// Image steps of the pipeline, computed as seesr_runtime/imaging.py computes them in float32.
#pragma once

#include "tensor.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace seesr {

// A caller's RGB8 image: `height` rows of `width` pixels, rows `stride` bytes apart. Not owned.
struct RgbView {
    const std::uint8_t *pixels;
    std::int32_t width, height, stride;
};

// An image error for a side under `min_side` pixels or more than `max_pixels` pixels, worded as
// options.check_image_size words it.
void check_image_size(std::int64_t width, std::int64_t height, std::int64_t max_pixels);

// [1, 3, H, W] float32 in [0, 1] (to_chw).
Tensor to_chw(const RgbView &image);

// torch's bilinear interpolate (align_corners=False, no antialias) of [N, C, H, W] to out_h x out_w.
Tensor resize_bilinear(const Tensor &x, std::int64_t out_h, std::int64_t out_w);

// DAPE's input: the image bilinear-resized to size x size, normalised by mean and std per channel.
Tensor dape_input(const RgbView &image, std::int64_t size, const std::vector<float> &mean, const std::vector<float> &std);

// The tags whose sigmoid(logit) is strictly above their threshold, in class order, joined with ", ".
std::string select_tags(const float *logits, const std::vector<std::string> &tags, const std::vector<float> &thresholds);

}  // namespace seesr
