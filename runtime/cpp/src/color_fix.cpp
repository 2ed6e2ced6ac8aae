#include "color_fix.hpp"

#include <algorithm>
#include <cmath>

namespace seesr {
namespace {

constexpr std::size_t kPairwiseBlock = 128;  // numpy's PW_BLOCKSIZE

// A [1, 3, h, w] float tensor as interleaved RGB8, each value turned into a byte by `to_byte`.
template <typename ToByte>
Rgb8Image interleaved_bytes(const Tensor &x, ToByte to_byte) {
    const std::int64_t h = x.shape()[2], w = x.shape()[3];
    const std::size_t plane = static_cast<std::size_t>(h * w);
    Rgb8Image image;
    image.width = static_cast<std::int32_t>(w);
    image.height = static_cast<std::int32_t>(h);
    image.pixels.resize(3 * plane);
    for (std::size_t c = 0; c < 3; ++c) {
        for (std::size_t i = 0; i < plane; ++i) {
            image.pixels[3 * i + c] = to_byte(x.f32_data()[c * plane + i]);
        }
    }
    return image;
}

// torchvision's ToPILImage as the official code uses it: clip to [0, 1], times 255, truncated to a byte.
Rgb8Image truncated(const Tensor &x) {
    return interleaved_bytes(x, [](float v) {
        return static_cast<std::uint8_t>(std::min(std::max(v, 0.0f), 1.0f) * 255.0f);
    });
}

struct ChannelStats {
    float mean[3], std[3];
};

// Per-channel mean and unbiased std (+1e-5 under the root) as numpy's mean and var(ddof=1) compute them.
ChannelStats channel_stats(const Tensor &x) {
    const std::size_t plane = x.count() / 3;
    ChannelStats stats;
    std::vector<float> squares(plane);
    for (std::size_t c = 0; c < 3; ++c) {
        const float *values = x.f32_data() + c * plane;
        const float mean = pairwise_sum(values, plane) / static_cast<float>(plane);
        for (std::size_t i = 0; i < plane; ++i) {
            const float deviation = values[i] - mean;
            squares[i] = deviation * deviation;
        }
        const float var = pairwise_sum(squares.data(), plane) / static_cast<float>(plane - 1);
        stats.mean[c] = mean;
        stats.std[c] = std::sqrt(var + 1e-5f);
    }
    return stats;
}

Rgb8Image adain(const Rgb8Image &target, const Rgb8Image &source) {
    Tensor t = to_chw(target.view());
    const ChannelStats from = channel_stats(t), to = channel_stats(to_chw(source.view()));
    const std::size_t plane = t.count() / 3;
    float *values = t.f32_data();
    for (std::size_t c = 0; c < 3; ++c) {
        for (std::size_t i = 0; i < plane; ++i) {
            float &v = values[c * plane + i];
            v = (v - from.mean[c]) / from.std[c] * to.std[c] + to.mean[c];
        }
    }
    return truncated(t);
}

// The [1, 2, 1] x [1, 2, 1] / 16 kernel dilated by `radius`, edges replicated.
std::vector<float> wavelet_blur(const std::vector<float> &x, std::int64_t h, std::int64_t w, std::int64_t radius) {
    static const float kTaps[3] = {1.0f, 2.0f, 1.0f};
    std::vector<float> out(x.size(), 0.0f);
    const std::int64_t planes = static_cast<std::int64_t>(x.size()) / (h * w);
    for (int dy = 0; dy < 3; ++dy) {
        for (int dx = 0; dx < 3; ++dx) {
            const float weight = kTaps[dy] * kTaps[dx] / 16.0f;
            for (std::int64_t p = 0; p < planes; ++p) {
                for (std::int64_t i = 0; i < h; ++i) {
                    const std::int64_t row = std::clamp<std::int64_t>(i + (dy - 1) * radius, 0, h - 1);
                    for (std::int64_t j = 0; j < w; ++j) {
                        const std::int64_t col = std::clamp<std::int64_t>(j + (dx - 1) * radius, 0, w - 1);
                        out[(p * h + i) * w + j] += weight * x[(p * h + row) * w + col];
                    }
                }
            }
        }
    }
    return out;
}

// Five levels of the a-trous wavelet: (sum of the high frequencies, the remaining low frequency).
std::pair<std::vector<float>, std::vector<float>> wavelet_split(std::vector<float> x, std::int64_t h, std::int64_t w) {
    std::vector<float> high(x.size(), 0.0f);
    for (int level = 0; level < 5; ++level) {
        std::vector<float> low = wavelet_blur(x, h, w, std::int64_t{1} << level);
        for (std::size_t i = 0; i < x.size(); ++i) high[i] += x[i] - low[i];
        x = std::move(low);
    }
    return {std::move(high), std::move(x)};
}

Rgb8Image wavelet(const Rgb8Image &target, const Rgb8Image &source) {
    const Tensor t = to_chw(target.view()), s = to_chw(source.view());
    const std::int64_t h = t.shape()[2], w = t.shape()[3];
    auto [high, unused_low] = wavelet_split(std::vector<float>(t.f32_data(), t.f32_data() + t.count()), h, w);
    auto [unused_high, low] = wavelet_split(std::vector<float>(s.f32_data(), s.f32_data() + s.count()), h, w);
    for (std::size_t i = 0; i < high.size(); ++i) high[i] += low[i];
    return truncated(Tensor::f32(t.shape(), std::move(high)));
}

}  // namespace

float pairwise_sum(const float *values, std::size_t n, std::size_t stride) {
    if (n < 8) {
        float sum = -0.0f;
        for (std::size_t i = 0; i < n; ++i) sum += values[i * stride];
        return sum;
    }
    if (n <= kPairwiseBlock) {
        float lanes[8];
        for (std::size_t j = 0; j < 8; ++j) lanes[j] = values[j * stride];
        std::size_t i = 8;
        for (; i < n - n % 8; i += 8) {
            for (std::size_t j = 0; j < 8; ++j) lanes[j] += values[(i + j) * stride];
        }
        float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (; i < n; ++i) sum += values[i * stride];
        return sum;
    }
    std::size_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(values, half, stride) + pairwise_sum(values + half * stride, n - half, stride);
}

Rgb8Image to_uint8_rounded(const Tensor &image) {
    return interleaved_bytes(image, [](float v) {
        const float value = std::min(std::max(v / 2.0f + 0.5f, 0.0f), 1.0f);
        return static_cast<std::uint8_t>(std::nearbyint(value * 255.0f));  // half to even
    });
}

Rgb8Image color_fix(const std::string &kind, const Rgb8Image &target, const Rgb8Image &source) {
    if (target.width != source.width || target.height != source.height) {
        throw Failure(SEESR_ERROR_INTERNAL, "colour fix of a " + std::to_string(target.width) + "x" +
                                                std::to_string(target.height) + " image against a " +
                                                std::to_string(source.width) + "x" + std::to_string(source.height) + " one");
    }
    if (kind == "adain") return adain(target, source);
    if (kind == "wavelet") return wavelet(target, source);
    if (kind == "none") return target;
    throw option_error("color_fix must be one of ('adain', 'wavelet', 'none'), got '" + kind + "'");
}

}  // namespace seesr
