#include "tiling.hpp"
#include "pi.hpp"

#include <algorithm>
#include <cmath>

namespace seesr {
namespace {

std::vector<std::int64_t> starts(std::int64_t extent, std::int64_t tile, std::int64_t overlap) {
    std::int64_t count = 1;
    while ((count - 1) * (tile - overlap) + tile < extent) ++count;
    std::vector<std::int64_t> found;
    for (std::int64_t i = 0; i < count; ++i) found.push_back(i < count - 1 ? i * (tile - overlap) : extent - tile);
    return found;
}

std::vector<double> profile(std::int64_t tile, double midpoint) {
    const double var = 0.01;
    std::vector<double> values;
    for (std::int64_t i = 0; i < tile; ++i) {
        const double offset = static_cast<double>(i) - midpoint;
        values.push_back(std::exp(-(offset * offset) / static_cast<double>(tile * tile) / (2 * var)) /
                         std::sqrt(2 * kPi * var));
    }
    return values;
}

}  // namespace

std::vector<std::pair<std::int64_t, std::int64_t>> tile_origins(std::int64_t height, std::int64_t width,
                                                                std::int64_t tile, std::int64_t overlap) {
    std::vector<std::pair<std::int64_t, std::int64_t>> origins;
    for (std::int64_t x : starts(width, tile, overlap)) {
        for (std::int64_t y : starts(height, tile, overlap)) origins.emplace_back(y, x);
    }
    return origins;
}

std::vector<double> gaussian_tile_weights(std::int64_t tile) {
    const std::vector<double> rows = profile(tile, static_cast<double>(tile) / 2);
    const std::vector<double> cols = profile(tile, static_cast<double>(tile - 1) / 2);
    std::vector<double> weights(static_cast<std::size_t>(tile * tile));
    for (std::int64_t i = 0; i < tile; ++i) {
        for (std::int64_t j = 0; j < tile; ++j) weights[i * tile + j] = rows[i] * cols[j];
    }
    return weights;
}

Tensor blend_tiles(const Shape &shape, std::int64_t tile, std::int64_t overlap,
                   const std::function<Tensor(std::int64_t, std::int64_t, std::int64_t)> &predict) {
    const std::int64_t planes = shape[0] * shape[1], h = shape[2], w = shape[3];
    tile = std::min({tile, h, w});
    const std::vector<double> weights = gaussian_tile_weights(tile);
    std::vector<float> total(element_count(shape), 0.0f), contributors(element_count(shape), 0.0f);
    for (const auto &[y, x] : tile_origins(h, w, tile, overlap)) {
        const Tensor eps = predict(y, x, tile);
        if (eps.shape() != Shape{shape[0], shape[1], tile, tile}) {
            throw Failure(SEESR_ERROR_INTERNAL, "a tile's prediction has shape " + shape_text(eps.shape()));
        }
        for (std::int64_t p = 0; p < planes; ++p) {
            for (std::int64_t i = 0; i < tile; ++i) {
                for (std::int64_t j = 0; j < tile; ++j) {
                    const std::size_t at = static_cast<std::size_t>((p * h + y + i) * w + x + j);
                    const double weight = weights[i * tile + j];
                    // float64 product rounded into the float32 sum, as the official code accumulates
                    total[at] = static_cast<float>(static_cast<double>(total[at]) +
                                                   static_cast<double>(eps.f32_data()[(p * tile + i) * tile + j]) * weight);
                    contributors[at] = static_cast<float>(static_cast<double>(contributors[at]) + weight);
                }
            }
        }
    }
    for (std::size_t i = 0; i < total.size(); ++i) total[i] /= contributors[i];
    return Tensor::f32(shape, std::move(total));
}

}  // namespace seesr
