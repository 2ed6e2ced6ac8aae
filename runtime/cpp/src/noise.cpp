#include "noise.hpp"
#include "pi.hpp"

#include <cmath>

namespace seesr {
namespace {

std::uint64_t splitmix64(std::uint64_t &x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

std::uint64_t rotate_left(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

SeededNoise::SeededNoise(std::uint64_t seed) {
    for (std::uint64_t &word : state_) word = splitmix64(seed);
}

std::uint64_t SeededNoise::next() {
    const std::uint64_t result = rotate_left(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotate_left(state_[3], 45);
    return result;
}

double SeededNoise::uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }

Tensor SeededNoise::draw(const std::string &, const Shape &shape) {
    std::vector<float> values(element_count(shape));
    for (float &value : values) {
        if (has_spare_) {
            value = static_cast<float>(spare_);
            has_spare_ = false;
            continue;
        }
        const double radius = std::sqrt(-2.0 * std::log(uniform())), angle = 2.0 * kPi * uniform();
        value = static_cast<float>(radius * std::cos(angle));
        spare_ = radius * std::sin(angle);
        has_spare_ = true;
    }
    return Tensor::f32(shape, std::move(values));
}

Tensor CallbackNoise::draw(const std::string &kind, const Shape &shape) {
    std::vector<float> values(element_count(shape));
    if (callback_(user_data_, kind.c_str(), shape.data(), static_cast<std::int32_t>(shape.size()), values.data(),
                  values.size()) != 0) {
        throw Failure(SEESR_ERROR_CANCELLED, "the noise callback cancelled the upscale (at a '" + kind + "' draw)");
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
        if (!std::isfinite(values[i])) {
            throw Failure(SEESR_ERROR_INVALID_ARGUMENT, "the noise callback gave " + std::to_string(values[i]) +
                                                            " at index " + std::to_string(i) + " of its '" + kind +
                                                            "' draw " + shape_text(shape) + "; expected finite values");
        }
    }
    return Tensor::f32(shape, std::move(values));
}

}  // namespace seesr
