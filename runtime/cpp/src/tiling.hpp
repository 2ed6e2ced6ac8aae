// Latent tiling as seesr_runtime/imaging.py and pipeline.py tile: overlapping windows in the official order,
// blended with the official (asymmetric) Gaussian weights.
#pragma once

#include "tensor.hpp"

#include <functional>
#include <utility>
#include <vector>

namespace seesr {

// Top-left corners (y, x) of the tiles in the official order (x outer, y inner); tiles step by
// tile - overlap and the last row and column are pushed against the far edge.
std::vector<std::pair<std::int64_t, std::int64_t>> tile_origins(std::int64_t height, std::int64_t width,
                                                                std::int64_t tile, std::int64_t overlap);

// float64 [tile, tile] blend weights (row-major); the official code centres x at (T-1)/2 but y at T/2.
std::vector<double> gaussian_tile_weights(std::int64_t tile);

// The latents [N, C, H, W] predicted window by window (`predict` maps a window's origin (y, x) and size to
// its eps [N, C, tile, tile]) and blended: each eps times its float64 weights accumulated in float32, then
// divided by the accumulated weights, as predict_noise_tiled does.
Tensor blend_tiles(const Shape &shape, std::int64_t tile, std::int64_t overlap,
                   const std::function<Tensor(std::int64_t y, std::int64_t x, std::int64_t tile)> &predict);

}  // namespace seesr
