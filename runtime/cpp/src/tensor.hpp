// A dense host tensor (float32 or int64), row-major: what the pipeline hands an engine and gets back.
#pragma once

#include "failure.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

namespace seesr {

using Shape = std::vector<std::int64_t>;

inline std::size_t element_count(const Shape &shape) {
    return static_cast<std::size_t>(
        std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<std::int64_t>()));
}

inline std::string shape_text(const Shape &shape) {
    std::string text = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + "]";
}

enum class DType { f32, i64 };

class Tensor {
public:
    static Tensor f32(Shape shape, std::vector<float> values) { return Tensor(DType::f32, std::move(shape), std::move(values), {}); }
    static Tensor i64(Shape shape, std::vector<std::int64_t> values) {
        return Tensor(DType::i64, std::move(shape), {}, std::move(values));
    }

    DType dtype() const { return dtype_; }
    const Shape &shape() const { return shape_; }
    std::size_t count() const { return element_count(shape_); }
    const float *f32_data() const { return dtype_ == DType::f32 ? f32_.data() : wrong_type<float>("float32"); }
    float *f32_data() { return dtype_ == DType::f32 ? f32_.data() : wrong_type<float>("float32"); }
    const std::int64_t *i64_data() const { return dtype_ == DType::i64 ? i64_.data() : wrong_type<std::int64_t>("int64"); }
    const void *bytes() const {
        return dtype_ == DType::f32 ? static_cast<const void *>(f32_.data()) : static_cast<const void *>(i64_.data());
    }

private:
    Tensor(DType dtype, Shape shape, std::vector<float> f32, std::vector<std::int64_t> i64)
        : dtype_(dtype), shape_(std::move(shape)), f32_(std::move(f32)), i64_(std::move(i64)) {
        const std::size_t held = dtype_ == DType::f32 ? f32_.size() : i64_.size();
        if (held != count()) {
            throw Failure(SEESR_ERROR_INTERNAL, "a tensor of shape " + shape_text(shape_) + " given " +
                                                    std::to_string(held) + " values");
        }
    }
    template <typename T>
    T *wrong_type(const char *asked) const {
        throw Failure(SEESR_ERROR_INTERNAL, std::string("a tensor read as ") + asked + " holds the other type");
    }

    DType dtype_;
    Shape shape_;
    std::vector<float> f32_;
    std::vector<std::int64_t> i64_;
};

// The window [:, :, y0:y1, x0:x1] of an [N, C, H, W] float32 tensor, copied.
inline Tensor crop(const Tensor &x, std::int64_t y0, std::int64_t y1, std::int64_t x0, std::int64_t x1) {
    const Shape &s = x.shape();
    const std::int64_t planes = s[0] * s[1], h = y1 - y0, w = x1 - x0;
    std::vector<float> values(static_cast<std::size_t>(planes * h * w));
    for (std::int64_t p = 0; p < planes; ++p) {
        for (std::int64_t i = 0; i < h; ++i) {
            const float *row = x.f32_data() + (p * s[2] + y0 + i) * s[3] + x0;
            std::copy(row, row + w, values.begin() + (p * h + i) * w);
        }
    }
    return Tensor::f32({s[0], s[1], h, w}, std::move(values));
}

// Float32 tensors of equal trailing shape stacked along the first axis (numpy's concatenate).
inline Tensor concat_batch(const Tensor &a, const Tensor &b) {
    if (Shape(a.shape().begin() + 1, a.shape().end()) != Shape(b.shape().begin() + 1, b.shape().end())) {
        throw Failure(SEESR_ERROR_INTERNAL, "concatenating " + shape_text(a.shape()) + " and " + shape_text(b.shape()));
    }
    std::vector<float> values(a.f32_data(), a.f32_data() + a.count());
    values.insert(values.end(), b.f32_data(), b.f32_data() + b.count());
    Shape shape = a.shape();
    shape[0] += b.shape()[0];
    return Tensor::f32(std::move(shape), std::move(values));
}

struct NamedTensor {
    std::string name;
    Tensor tensor;
};

}  // namespace seesr
