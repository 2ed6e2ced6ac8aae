#include "imaging.hpp"

#include <cmath>

namespace seesr {

namespace {
constexpr std::int64_t kMinSide = 8;  // smaller inputs break DAPE's resize and leave no latent pixel

struct Axis {
    std::vector<std::int64_t> low, high;
    std::vector<float> frac;
};

// Source positions of each output pixel along one axis: half-pixel centres in float64, clamped at 0.
Axis bilinear_axis(std::int64_t n_in, std::int64_t n_out) {
    Axis axis;
    const double scale = static_cast<double>(n_in) / static_cast<double>(n_out);
    for (std::int64_t i = 0; i < n_out; ++i) {
        const double src = std::max((static_cast<double>(i) + 0.5) * scale - 0.5, 0.0);
        const std::int64_t low = std::min(static_cast<std::int64_t>(std::floor(src)), n_in - 1);
        axis.low.push_back(low);
        axis.high.push_back(std::min(low + 1, n_in - 1));
        axis.frac.push_back(static_cast<float>(src - static_cast<double>(low)));
    }
    return axis;
}
}  // namespace

void check_image_size(std::int64_t width, std::int64_t height, std::int64_t max_pixels) {
    const std::string size = std::to_string(width) + "x" + std::to_string(height);
    if (std::min(width, height) < kMinSide) {
        throw Failure(SEESR_ERROR_IMAGE, size + " is too small (at least " + std::to_string(kMinSide) + "x" +
                                             std::to_string(kMinSide) + " pixels)");
    }
    if (width * height > max_pixels) {
        throw Failure(SEESR_ERROR_IMAGE, size + " is " + std::to_string(width * height) + " pixels, over the limit of " +
                                             std::to_string(max_pixels) + " (raise it with the max_pixels option)");
    }
}

Tensor to_chw(const RgbView &image) {
    const std::size_t plane = static_cast<std::size_t>(image.width) * static_cast<std::size_t>(image.height);
    std::vector<float> values(3 * plane);
    for (std::int32_t y = 0; y < image.height; ++y) {
        const std::uint8_t *row = image.pixels + static_cast<std::size_t>(y) * static_cast<std::size_t>(image.stride);
        for (std::int32_t x = 0; x < image.width; ++x) {
            const std::size_t at = static_cast<std::size_t>(y) * static_cast<std::size_t>(image.width) + x;
            for (std::size_t c = 0; c < 3; ++c) values[c * plane + at] = static_cast<float>(row[3 * x + c]) / 255.0f;
        }
    }
    return Tensor::f32({1, 3, image.height, image.width}, std::move(values));
}

Tensor resize_bilinear(const Tensor &x, std::int64_t out_h, std::int64_t out_w) {
    const Shape &shape = x.shape();
    const std::int64_t planes = shape[0] * shape[1], in_h = shape[2], in_w = shape[3];
    const Axis rows = bilinear_axis(in_h, out_h), cols = bilinear_axis(in_w, out_w);
    std::vector<float> top(static_cast<std::size_t>(out_h * in_w)), out(static_cast<std::size_t>(planes * out_h * out_w));
    for (std::int64_t p = 0; p < planes; ++p) {
        const float *in = x.f32_data() + p * in_h * in_w;
        // Rows first, then columns, each product and sum rounded to float32 as numpy rounds them.
        for (std::int64_t i = 0; i < out_h; ++i) {
            const float f = rows.frac[i], keep = 1.0f - f;
            const float *low = in + rows.low[i] * in_w, *high = in + rows.high[i] * in_w;
            for (std::int64_t j = 0; j < in_w; ++j) top[i * in_w + j] = low[j] * keep + high[j] * f;
        }
        float *target = out.data() + p * out_h * out_w;
        for (std::int64_t i = 0; i < out_h; ++i) {
            for (std::int64_t j = 0; j < out_w; ++j) {
                const float f = cols.frac[j];
                target[i * out_w + j] = top[i * in_w + cols.low[j]] * (1.0f - f) + top[i * in_w + cols.high[j]] * f;
            }
        }
    }
    return Tensor::f32({shape[0], shape[1], out_h, out_w}, std::move(out));
}

Tensor dape_input(const RgbView &image, std::int64_t size, const std::vector<float> &mean, const std::vector<float> &std) {
    Tensor x = resize_bilinear(to_chw(image), size, size);
    float *values = x.f32_data();
    const std::size_t plane = static_cast<std::size_t>(size * size);
    for (std::size_t c = 0; c < 3; ++c) {
        for (std::size_t i = 0; i < plane; ++i) values[c * plane + i] = (values[c * plane + i] - mean[c]) / std[c];
    }
    return x;
}

std::string select_tags(const float *logits, const std::vector<std::string> &tags, const std::vector<float> &thresholds) {
    std::string joined;
    for (std::size_t i = 0; i < tags.size(); ++i) {
        const float probability = 1.0f / (1.0f + std::exp(-logits[i]));
        if (probability > thresholds[i]) joined += (joined.empty() ? "" : ", ") + tags[i];
    }
    return joined;
}

}  // namespace seesr
