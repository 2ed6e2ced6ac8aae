// The pipeline's random draws, in the official order ("initial", "posterior", then one "step" per step):
// from a seeded generator, or from the caller (seesr_noise_fn), to replay another implementation's stream
// as the Python runtime's noise_fn does.
#pragma once

#include "seesr.h"
#include "tensor.hpp"

#include <cstdint>
#include <string>

namespace seesr {

class NoiseSource {
public:
    virtual ~NoiseSource() = default;
    // Standard-normal draws for `kind`, `shape`'s element count of them.
    virtual Tensor draw(const std::string &kind, const Shape &shape) = 0;
};

// xoshiro256** seeded through splitmix64, Box-Muller in double: the same stream for a seed on every platform
// and thread (not numpy's: parity with the Python runtime goes through the caller's noise).
class SeededNoise final : public NoiseSource {
public:
    explicit SeededNoise(std::uint64_t seed);
    Tensor draw(const std::string &kind, const Shape &shape) override;

private:
    std::uint64_t next();
    double uniform();  // in (0, 1)
    std::uint64_t state_[4];
    double spare_ = 0.0;
    bool has_spare_ = false;
};

// The caller's draws; a cancelled failure when the callback returns non-zero, an invalid-argument failure when
// it leaves a value that is not finite.
class CallbackNoise final : public NoiseSource {
public:
    CallbackNoise(seesr_noise_fn callback, void *user_data) : callback_(callback), user_data_(user_data) {}
    Tensor draw(const std::string &kind, const Shape &shape) override;

private:
    seesr_noise_fn callback_;
    void *user_data_;
};

}  // namespace seesr
