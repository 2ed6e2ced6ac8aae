#include "resample.hpp"

#include <algorithm>
#include <cmath>

namespace seesr {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // fixed-point weights: 8-bit pixels times weights fit in 32 bits

double cubic(double x) {
    const double a = -0.5;
    x = std::fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

// For each output pixel along one axis: the first input pixel it reads, how many, and their fixed-point weights.
struct Taps {
    std::vector<int> first, count;
    std::vector<std::int32_t> weights;  // `size` per output pixel
    int size = 0;
};

Taps taps(int in_size, int out_size) {
    const double scale = static_cast<double>(in_size) / out_size;
    const double filter_scale = std::max(scale, 1.0);  // shrinking widens the filter over the input
    const double support = 2.0 * filter_scale;
    Taps t;
    t.size = static_cast<int>(std::ceil(support)) * 2 + 1;
    t.weights.assign(static_cast<std::size_t>(out_size) * t.size, 0);
    std::vector<double> k(static_cast<std::size_t>(t.size));
    for (int out = 0; out < out_size; ++out) {
        const double center = (out + 0.5) * scale;
        const int first = std::max(static_cast<int>(center - support + 0.5), 0);
        const int last = std::min(static_cast<int>(center + support + 0.5), in_size);
        const int count = last - first;
        double total = 0.0;
        for (int i = 0; i < count; ++i) {
            k[i] = cubic((i + first - center + 0.5) / filter_scale);
            total += k[i];
        }
        for (int i = 0; i < count; ++i) {
            const double w = total != 0.0 ? k[i] / total : k[i];
            const double fixed = w * (1 << kPrecisionBits);
            t.weights[static_cast<std::size_t>(out) * t.size + i] = static_cast<std::int32_t>(w < 0 ? fixed - 0.5 : fixed + 0.5);
        }
        t.first.push_back(first);
        t.count.push_back(count);
    }
    return t;
}

std::uint8_t clip8(std::int32_t sum) {
    if (sum >= (1 << kPrecisionBits) * 256) return 255;
    if (sum <= 0) return 0;
    return static_cast<std::uint8_t>(sum >> kPrecisionBits);
}

// One axis: `lines` lines of `in_len` pixels (3 channels, pixel step `step`, line step `line_step`) resampled to `out_len`.
void pass(const std::uint8_t *in, std::ptrdiff_t in_pixel, std::ptrdiff_t in_line, std::uint8_t *out,
          std::ptrdiff_t out_pixel, std::ptrdiff_t out_line, int lines, const Taps &t, int out_len) {
    for (int line = 0; line < lines; ++line) {
        for (int o = 0; o < out_len; ++o) {
            const std::int32_t *w = &t.weights[static_cast<std::size_t>(o) * t.size];
            for (int c = 0; c < 3; ++c) {
                std::int32_t sum = 1 << (kPrecisionBits - 1);
                for (int i = 0; i < t.count[o]; ++i) sum += in[line * in_line + (t.first[o] + i) * in_pixel + c] * w[i];
                out[line * out_line + o * out_pixel + c] = clip8(sum);
            }
        }
    }
}

}  // namespace

namespace {

// One axis resized (the other kept): rows when `width` changes, columns when `height` does.
Rgb8Image resize_axis(const RgbView &image, std::int32_t width, std::int32_t height) {
    Rgb8Image result;
    result.width = width;
    result.height = height;
    result.pixels.resize(static_cast<std::size_t>(width) * height * 3);
    if (width != image.width) {
        pass(image.pixels, 3, image.stride, result.pixels.data(), 3, 3 * width, height, taps(image.width, width), width);
    } else if (height != image.height) {
        // Columns are the lines here: a pixel step of one row, a line step of one pixel.
        pass(image.pixels, image.stride, 3, result.pixels.data(), 3 * width, 3, width, taps(image.height, height), height);
    } else {
        for (std::int32_t row = 0; row < height; ++row) {
            std::copy_n(image.pixels + static_cast<std::ptrdiff_t>(row) * image.stride, 3 * width,
                        result.pixels.begin() + static_cast<std::ptrdiff_t>(row) * 3 * width);
        }
    }
    return result;
}

}  // namespace

Rgb8Image resize_bicubic(const RgbView &image, std::int32_t width, std::int32_t height) {
    // PIL resizes one axis after the other, rounding to 8 bits in between, so the order shows in the result.
    // Pillow 13 starts with the height when it loses more than twice as many rows as the width loses columns
    // (any shrinking height while the width grows), otherwise with the width.
    const std::int64_t rows_lost = image.height - height, columns_lost = image.width - width;
    const bool height_first = rows_lost > 0 && rows_lost > 2 * columns_lost;
    if (height_first) return resize_axis(resize_axis(image, image.width, height).view(), width, height);
    return resize_axis(resize_axis(image, width, image.height).view(), width, height);
}

Rgb8Image working_image(const RgbView &lr, std::int64_t process_size, std::int64_t upscale) {
    Rgb8Image raised;
    RgbView source = lr;
    const std::int64_t short_side = process_size / upscale;
    if (lr.width < short_side || lr.height < short_side) {
        // Python's float arithmetic: a true division, the products truncated by int()
        const double scale = static_cast<double>(short_side) / static_cast<double>(std::min(lr.width, lr.height));
        raised = resize_bicubic(lr, static_cast<std::int32_t>(scale * lr.width), static_cast<std::int32_t>(scale * lr.height));
        source = raised.view();
    }
    const Rgb8Image enlarged = resize_bicubic(source, static_cast<std::int32_t>(source.width * upscale),
                                              static_cast<std::int32_t>(source.height * upscale));
    return resize_bicubic(enlarged.view(), enlarged.width / 8 * 8, enlarged.height / 8 * 8);
}

}  // namespace seesr
