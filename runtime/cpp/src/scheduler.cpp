#include "scheduler.hpp"

#include "failure.hpp"

#include <algorithm>
#include <cfenv>
#include <cmath>

namespace seesr {
namespace {

using Json = nlohmann::json;

// Like torch.linspace in float32 (stepping from both ends), as scheduler.py's _linspace32.
std::vector<float> linspace32(float start, float end, int n) {
    std::vector<float> out(static_cast<std::size_t>(n));
    const float step = n > 1 ? (end - start) / static_cast<float>(n - 1) : 0.0f;
    for (int i = 0; i < n; ++i) {
        const float index = static_cast<float>(i);
        out[i] = i < n / 2 ? start + step * index : end - step * (static_cast<float>(n - 1) - index);
    }
    return out;
}

std::vector<float> betas(const DdpmConfig &c) {
    if (!c.trained_betas.empty()) return c.trained_betas;
    if (c.beta_schedule == "linear") {
        return linspace32(static_cast<float>(c.beta_start), static_cast<float>(c.beta_end), c.num_train_timesteps);
    }
    if (c.beta_schedule == "scaled_linear") {
        auto roots = linspace32(static_cast<float>(std::sqrt(c.beta_start)), static_cast<float>(std::sqrt(c.beta_end)),
                                c.num_train_timesteps);
        for (float &root : roots) root = root * root;
        return roots;
    }
    throw bundle_error("unsupported beta_schedule '" + c.beta_schedule + "' (expected linear or scaled_linear)");
}

// numpy's round: half to even.
double round_half_even(double value) {
    const int mode = std::fegetround();
    std::fesetround(FE_TONEAREST);
    const double rounded = std::nearbyint(value);
    std::fesetround(mode);
    return rounded;
}

// np.arange(start, stop, step) for doubles: ceil((stop - start) / step) values start + i * delta, where
// delta = (start + step) - start, as numpy fills them.
std::vector<double> arange(double start, double stop, double step) {
    const double length = std::ceil((stop - start) / step);
    std::vector<double> out;
    if (!(length > 0)) return out;
    const double delta = (start + step) - start;
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(length); ++i) {
        out.push_back(i == 0 ? start : i == 1 ? start + step : start + static_cast<double>(i) * delta);
    }
    return out;
}

// np.linspace(start, stop, num) for doubles: i * step + start, the last value exactly stop.
std::vector<double> linspace(double start, double stop, int num) {
    std::vector<double> out(static_cast<std::size_t>(num));
    const int div = num - 1;
    const double delta = stop - start;
    for (int i = 0; i < num; ++i) {
        out[i] = (div > 0 ? static_cast<double>(i) * (delta / div) : static_cast<double>(i) * delta) + start;
    }
    if (num > 1) out.back() = stop;
    return out;
}

template <typename T>
void read(const Json &config, const char *key, T &field) {
    auto found = config.find(key);
    if (found == config.end()) return;
    try {
        field = found->get<T>();
    } catch (const Json::exception &) {
        throw bundle_error(std::string("pipeline.scheduler.") + key + " is " + found->dump() +
                           ", which is not of the expected type");
    }
}

}  // namespace

DdpmConfig DdpmConfig::from_json(const Json &config) {
    if (!config.is_object()) throw bundle_error("pipeline.scheduler must be an object, got " + config.dump());
    DdpmConfig c;
    read(config, "num_train_timesteps", c.num_train_timesteps);
    read(config, "beta_start", c.beta_start);
    read(config, "beta_end", c.beta_end);
    read(config, "beta_schedule", c.beta_schedule);
    if (config.contains("trained_betas") && !config["trained_betas"].is_null()) read(config, "trained_betas", c.trained_betas);
    read(config, "variance_type", c.variance_type);
    read(config, "clip_sample", c.clip_sample);
    read(config, "clip_sample_range", c.clip_sample_range);
    read(config, "prediction_type", c.prediction_type);
    read(config, "timestep_spacing", c.timestep_spacing);
    read(config, "steps_offset", c.steps_offset);
    return c;
}

DdpmScheduler::DdpmScheduler(DdpmConfig config) : config_(std::move(config)) {
    if (config_.prediction_type != "epsilon" || config_.variance_type != "fixed_small") {
        throw bundle_error("only epsilon prediction with fixed_small variance is supported (got " +
                           config_.prediction_type + ", " + config_.variance_type + ")");
    }
    if (config_.num_train_timesteps < 1) {
        throw bundle_error("num_train_timesteps must be at least 1, got " + std::to_string(config_.num_train_timesteps));
    }
    const std::vector<float> beta = betas(config_);
    if (beta.size() != static_cast<std::size_t>(config_.num_train_timesteps)) {
        throw bundle_error("trained_betas holds " + std::to_string(beta.size()) + " values, expected " +
                           std::to_string(config_.num_train_timesteps) + " (num_train_timesteps)");
    }
    float product = 1.0f;
    for (float b : beta) {
        product *= 1.0f - b;
        alphas_cumprod_.push_back(product);
    }
}

const std::vector<std::int64_t> &DdpmScheduler::set_timesteps(int steps) {
    const int n = config_.num_train_timesteps;
    if (steps < 1 || steps > n) {
        throw option_error("steps must be in 1.." + std::to_string(n) + ", got " + std::to_string(steps));
    }
    std::vector<double> values;
    const std::string &spacing = config_.timestep_spacing;
    if (spacing == "leading") {
        for (int i = steps - 1; i >= 0; --i) values.push_back(static_cast<double>(i) * (n / steps) + config_.steps_offset);
    } else if (spacing == "trailing") {
        for (double value : arange(n, 0, -static_cast<double>(n) / steps)) values.push_back(round_half_even(value) - 1);
    } else if (spacing == "linspace") {
        values = linspace(0, n - 1, steps);
        std::reverse(values.begin(), values.end());
        for (double &value : values) value = round_half_even(value);
    } else {
        throw bundle_error("unknown timestep_spacing '" + spacing + "' (expected leading, trailing or linspace)");
    }
    timesteps_.assign(values.begin(), values.end());
    for (std::int64_t t : timesteps_) {
        if (t < 0 || t >= n) {
            throw option_error("steps " + std::to_string(steps) + " reach timestep " + std::to_string(t) +
                               " with this bundle's scheduler (" + spacing + " spacing, steps_offset " +
                               std::to_string(config_.steps_offset) + "), outside 0.." + std::to_string(n - 1));
        }
    }
    inference_steps_ = steps;
    return timesteps_;
}

float DdpmScheduler::alpha_cumprod(std::int64_t t) const {
    if (t < 0 || t >= static_cast<std::int64_t>(alphas_cumprod_.size())) {
        throw Failure(SEESR_ERROR_INTERNAL, "timestep " + std::to_string(t) + " outside the schedule");
    }
    return alphas_cumprod_[static_cast<std::size_t>(t)];
}

void DdpmScheduler::add_noise(const float *original, const float *noise, std::size_t count, std::int64_t t,
                              float *out) const {
    const float a = alpha_cumprod(t);
    const float keep = std::pow(a, 0.5f), mix = std::pow(1.0f - a, 0.5f);
    for (std::size_t i = 0; i < count; ++i) out[i] = keep * original[i] + mix * noise[i];
}

std::int64_t DdpmScheduler::previous_timestep(std::int64_t t) const {
    return t - config_.num_train_timesteps / inference_steps_;
}

void DdpmScheduler::step(const float *eps, std::int64_t t, float *sample, const float *noise, std::size_t count) const {
    if (inference_steps_ == 0) throw Failure(SEESR_ERROR_INTERNAL, "step before set_timesteps");
    const std::int64_t prev_t = previous_timestep(t);
    const float one = 1.0f, half = 0.5f;
    const float a_t = alpha_cumprod(t);
    const float a_prev = prev_t >= 0 ? alpha_cumprod(prev_t) : one;
    const float beta_t = one - a_t / a_prev;
    const float eps_scale = std::pow(one - a_t, half), x0_divisor = std::pow(a_t, half);
    const float x0_coefficient = std::pow(a_prev, half) * beta_t / (one - a_t);
    const float sample_coefficient = std::pow(a_t / a_prev, half) * (one - a_prev) / (one - a_t);
    const float range = static_cast<float>(config_.clip_sample_range);
    const float std_dev = t > 0 ? std::pow(std::max((one - a_prev) / (one - a_t) * beta_t, 1e-20f), half) : 0.0f;
    for (std::size_t i = 0; i < count; ++i) {
        float x0 = (sample[i] - eps_scale * eps[i]) / x0_divisor;
        if (config_.clip_sample) x0 = std::min(std::max(x0, -range), range);
        float mean = x0_coefficient * x0 + sample_coefficient * sample[i];
        if (t > 0) mean = mean + std_dev * noise[i];
        sample[i] = mean;
    }
}

}  // namespace seesr
