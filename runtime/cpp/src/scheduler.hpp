// DDPM sampling configured from the bundle manifest's pipeline.scheduler, computed in float32 step for step
// as seesr_runtime/scheduler.py computes it (which reproduces diffusers' DDPMScheduler as SeeSR uses it:
// epsilon prediction, fixed_small variance). The variance noise is an argument, so any stream can be replayed.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace seesr {

struct DdpmConfig {
    // diffusers' defaults: the manifest records only what its checkpoint's scheduler_config.json sets.
    int num_train_timesteps = 1000;
    double beta_start = 0.0001;
    double beta_end = 0.02;
    std::string beta_schedule = "linear";
    std::vector<float> trained_betas;  // empty: none
    std::string variance_type = "fixed_small";
    bool clip_sample = true;
    double clip_sample_range = 1.0;
    std::string prediction_type = "epsilon";
    std::string timestep_spacing = "leading";
    int steps_offset = 0;

    // From the manifest's pipeline.scheduler (keys it does not know, like "type", are ignored); a bundle
    // error naming the key for a value of the wrong type.
    static DdpmConfig from_json(const nlohmann::json &config);
};

class DdpmScheduler {
public:
    // A bundle error for a configuration this sampler does not reproduce.
    explicit DdpmScheduler(DdpmConfig config);

    // The descending timesteps of `steps` steps; an option error for steps outside 1..num_train_timesteps.
    const std::vector<std::int64_t> &set_timesteps(int steps);
    const std::vector<std::int64_t> &timesteps() const { return timesteps_; }
    const std::vector<float> &alphas_cumprod() const { return alphas_cumprod_; }
    static constexpr float init_noise_sigma = 1.0f;

    // sqrt(a_t) * original + sqrt(1 - a_t) * noise, elementwise into `out` (may alias either input).
    void add_noise(const float *original, const float *noise, std::size_t count, std::int64_t t, float *out) const;
    std::int64_t previous_timestep(std::int64_t t) const;
    // x_t -> x_{t-1} in place in `sample`; `noise` (standard normal) is scaled by the step's std (unused at t = 0).
    void step(const float *eps, std::int64_t t, float *sample, const float *noise, std::size_t count) const;

private:
    float alpha_cumprod(std::int64_t t) const;

    DdpmConfig config_;
    std::vector<float> alphas_cumprod_;
    std::vector<std::int64_t> timesteps_;
    int inference_steps_ = 0;
};

}  // namespace seesr
