// Pipeline::upscale and its stages: seesr_runtime/pipeline.py's __call__, predict_noise(_tiled), run_vae,
// lr_latent and decode, in the same order and float32 arithmetic, so that the same noise gives the same latents.
#include "color_fix.hpp"
#include "pipeline.hpp"
#include "tiled_vae.hpp"
#include "tiling.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>

namespace seesr {
namespace {

// The first input name of `network` in its manifest spec, which the pipeline feeds the VAE halves by (a bundle
// error when it names none).
std::string first_input_name(const Manifest &manifest, const std::string &network) {
    const Json &inputs = manifest.entry(network).value("/spec/inputs"_json_pointer, Json());
    if (!inputs.is_array() || inputs.empty() || !inputs[0].is_object() || !inputs[0].value("name", Json()).is_string()) {
        throw bundle_error(manifest.root().string() + ": the spec of '" + network + "' in manifest.json names no inputs");
    }
    return inputs[0]["name"].get<std::string>();
}

void check_finite(const Tensor &x, const std::string &what) {
    const float *values = x.f32_data();
    for (std::size_t i = 0; i < x.count(); ++i) {
        if (!std::isfinite(values[i])) {
            throw Failure(SEESR_ERROR_ENGINE, what + " gave " + std::to_string(values[i]) + " at index " +
                                                  std::to_string(i) + " of " + shape_text(x.shape()) +
                                                  "; expected finite values");
        }
    }
}

// One stage of an upscale (pipeline.py's _loaded). Under a staged plan only the stage's networks are loaded during
// it: networks other calls left loaded are freed when it starts, and its own when it ends, error or not.
class StageScope {
public:
    StageScope(Engine &engine, const std::string &stage, const MemoryPlan *staged)
        : engine_(engine), networks_(calibration().stage_networks.at(stage)), staged_(staged != nullptr) {
        if (!staged_) return;
        for (const auto &[name, count] : engine_.resident()) {
            const std::string network = name.substr(0, name.find('#'));
            if (std::find(networks_.begin(), networks_.end(), network) == networks_.end()) engine_.release(network);
        }
    }
    StageScope(const StageScope &) = delete;
    StageScope &operator=(const StageScope &) = delete;
    ~StageScope() {
        if (!staged_) return;
        try {
            for (const std::string &network : networks_) engine_.release(network);
        } catch (...) {  // freeing is best effort: the stage's own outcome (or error) is what the caller gets
        }
    }

private:
    Engine &engine_;
    const std::vector<std::string> &networks_;
    bool staged_;
};

}  // namespace

// The ControlNet and UNet of one sampling loop at one window shape (the whole latents, or one latent tile), as
// sessions of the calling thread: the image's constants set once, the ControlNet's residuals handed to the UNet
// inside the engine (no copy through host memory), a window's latents and control pixels set per call.
class Pipeline::Denoiser {
public:
    Denoiser(Engine &engine, const Manifest &manifest, const Conditioning &c, const Shape &window)
        : residuals_(output_names(manifest, "controlnet")), eps_(output_names(manifest, "unet").at(0)) {
        const Shape timestep = {window[0]}, control = {window[0], 3, 8 * window[2], 8 * window[3]};
        const InputShapes common = {{"sample", window},
                                    {"timestep", timestep},
                                    {"encoder_hidden_states", c.text_embeds.shape()},
                                    {"image_embeds", c.image_embeds.shape()}};
        InputShapes controlnet_shapes = common;
        controlnet_shapes.emplace_back("controlnet_cond", control);
        controlnet_shapes.emplace_back("conditioning_scale", c.conditioning_scale.shape());
        controlnet_ = engine.session("controlnet", controlnet_shapes);
        InputShapes unet_shapes = common;
        for (const std::string &name : residuals_) unet_shapes.emplace_back(name, controlnet_->output_shape(name));
        unet_ = engine.session("unet", unet_shapes);
        for (Session *session : {controlnet_.get(), unet_.get()}) {
            session->set("encoder_hidden_states", c.text_embeds);
            session->set("image_embeds", c.image_embeds);
        }
        controlnet_->set("conditioning_scale", c.conditioning_scale);
        if (c.control.shape() == control) controlnet_->set("controlnet_cond", c.control);  // untiled: constant
    }

    // The UNet's noise for `latents` (one window) at `t`; `control`: the window's pixels, null when constant.
    Tensor predict(const Tensor &latents, std::int64_t t, const Tensor *control) {
        const std::int64_t batch = latents.shape()[0];
        const Tensor timestep =
            Tensor::f32({batch}, std::vector<float>(static_cast<std::size_t>(batch), static_cast<float>(t)));
        controlnet_->set("sample", latents);
        controlnet_->set("timestep", timestep);
        if (control != nullptr) controlnet_->set("controlnet_cond", *control);
        controlnet_->run();
        unet_->set("sample", latents);
        unet_->set("timestep", timestep);
        for (const std::string &name : residuals_) unet_->set_from(name, *controlnet_, name);
        unet_->run();
        return unet_->output(eps_);
    }

private:
    std::vector<std::string> residuals_;  // the ControlNet's outputs: inputs of the UNet by the same names
    std::string eps_;
    std::unique_ptr<Session> controlnet_, unet_;
};

std::vector<Tensor> Pipeline::run_vae(const std::string &network, const Tensor &x, std::int64_t tile, bool tiled,
                                      const MemoryPlan *staged) const {
    const TiledVaeLayout layout = TiledVaeLayout::for_network(network);
    if (!tiled || !layout.needs_tiling(x.shape()[2], x.shape()[3], tile)) {
        std::vector<Tensor> outputs = engine_->run(network, {{first_input_name(manifest_, network), x}});
        engine_->release_working_memory(network);  // each VAE half runs once per image
        return outputs;
    }
    std::filesystem::path spill_dir = tiled_vae_spill_dir_;
    if (staged != nullptr && staged->spills(network) && spill_dir.empty()) spill_dir = std::filesystem::temp_directory_path();
    const SegmentDone done = staged != nullptr ? SegmentDone::release : SegmentDone::release_working_memory;
    return run_tiled_vae(*engine_, manifest_, network, x, tile, spill_dir, done);
}

Tensor Pipeline::lr_latent(const Tensor &work, const Tensor &initial_noise, NoiseSource &noise,
                           const DdpmScheduler &scheduler, std::int64_t vae_tile, bool tiled,
                           const MemoryPlan *staged) const {
    std::vector<float> scaled(work.f32_data(), work.f32_data() + work.count());
    for (float &value : scaled) value = value * 2.0f - 1.0f;
    std::vector<Tensor> moments = run_vae("vae_encoder", Tensor::f32(work.shape(), std::move(scaled)), vae_tile, tiled, staged);
    Tensor &mean = moments.at(0);
    const Tensor &logvar = moments.at(1);
    const Tensor posterior = noise.draw("posterior", mean.shape());
    float *sample = mean.f32_data();
    for (std::size_t i = 0; i < mean.count(); ++i) {
        sample[i] = (sample[i] + std::exp(0.5f * logvar.f32_data()[i]) * posterior.f32_data()[i]) * scaling_factor_;
    }
    scheduler.add_noise(sample, initial_noise.f32_data(), mean.count(), start_step_, sample);
    return std::move(mean);
}

Rgb8Image Pipeline::decode(const Tensor &latents, std::int64_t tile, bool tiled, const MemoryPlan *staged) const {
    std::vector<float> unscaled(latents.f32_data(), latents.f32_data() + latents.count());
    for (float &value : unscaled) value /= scaling_factor_;
    const Tensor image = run_vae("vae_decoder", Tensor::f32(latents.shape(), std::move(unscaled)), tile, tiled, staged).at(0);
    check_finite(image, "the VAE decoder");
    return to_uint8_rounded(image);
}

Pipeline::Conditioning Pipeline::condition(const std::string &prompt, Tensor image_embeds, const Rgb8Image &work,
                                           const UpscaleOptions &o) const {
    Conditioning c = {text_.encode(*engine_, prompt), std::move(image_embeds), to_chw(work.view()),
                      Tensor::f32({}, {static_cast<float>(o.conditioning_scale)})};
    if (o.guidance > 1.0) {  // every batched tensor is [uncond, cond]
        c.text_embeds = concat_batch(text_.encode_negative(*engine_, o.negative_prompt), c.text_embeds);
        c.image_embeds = concat_batch(c.image_embeds, c.image_embeds);
        c.control = concat_batch(c.control, c.control);
    }
    return c;
}

Tensor Pipeline::guided_eps(const Tensor &eps, float guidance) {
    const std::size_t half = eps.count() / 2;
    std::vector<float> combined(half);
    for (std::size_t k = 0; k < half; ++k) {
        const float uncond = eps.f32_data()[k], cond = eps.f32_data()[half + k];
        combined[k] = uncond + guidance * (cond - uncond);
    }
    Shape shape = eps.shape();
    shape[0] /= 2;
    return Tensor::f32(std::move(shape), std::move(combined));
}

Tensor Pipeline::sample(Tensor latents, const Conditioning &c, const DdpmScheduler &scheduler, NoiseSource &noise,
                        const UpscaleOptions &o, const UpscaleHooks &hooks) const {
    const bool guided = o.guidance > 1.0;
    const Shape shape = latents.shape();
    const bool tiled = shape[2] * shape[3] > o.latent_tile_size * o.latent_tile_size;
    // every window has one shape: the whole latents, or tiles of the size blend_tiles takes
    const std::int64_t tile = std::min({o.latent_tile_size, shape[2], shape[3]});
    const std::int64_t batch = guided ? 2 * shape[0] : shape[0];
    Denoiser denoiser(*engine_, manifest_, c, tiled ? Shape{batch, shape[1], tile, tile} : Shape{batch, shape[1], shape[2], shape[3]});
    const std::vector<std::int64_t> &timesteps = scheduler.timesteps();
    const int total = static_cast<int>(timesteps.size());
    for (int i = 0; i < total; ++i) {
        const std::int64_t t = timesteps[static_cast<std::size_t>(i)];
        const Tensor model_input = guided ? concat_batch(latents, latents) : latents;
        Tensor eps = tiled ? blend_tiles(model_input.shape(), tile, o.latent_tile_overlap,
                                         [&](std::int64_t y, std::int64_t x, std::int64_t size) {
                                             const Tensor pixels = crop(c.control, 8 * y, 8 * (y + size), 8 * x, 8 * (x + size));
                                             return denoiser.predict(crop(model_input, y, y + size, x, x + size), t, &pixels);
                                         })
                           : denoiser.predict(model_input, t, nullptr);
        if (guided) eps = guided_eps(eps, static_cast<float>(o.guidance));
        const Tensor step_noise = noise.draw("step", shape);
        scheduler.step(eps.f32_data(), t, latents.f32_data(), step_noise.f32_data(), latents.count());
        if (hooks.step_latents) hooks.step_latents(i + 1, latents);
        if (hooks.progress && hooks.progress(i + 1, total)) {
            throw Failure(SEESR_ERROR_CANCELLED, "the progress callback cancelled the upscale after step " +
                                                     std::to_string(i + 1) + " of " + std::to_string(total));
        }
    }
    return latents;
}

Upscaled Pipeline::upscale(const RgbView &image, const Options &given, const UpscaleHooks &hooks) const {
    UpscaleOptions o = options_->upscale_options(given);
    check_image_size(image.width, image.height, o.max_pixels);
    Upscaled result;
    if (memory_budget_) {  // an impossible budget fails here, before any network runs
        result.memory_plan = memory_plan(image.width, image.height, o);
        o.latent_tile_size = result.memory_plan->latent_tile_size;
        o.vae_encoder_tile_size = result.memory_plan->vae_encoder_tile_size;
        o.vae_decoder_tile_size = result.memory_plan->vae_decoder_tile_size;
        const std::vector<std::string> &int8 = result.memory_plan->int8_linear;
        engine_->compress_linear(std::set<std::string>(int8.begin(), int8.end()));
    }
    const MemoryPlan *staged = result.memory_plan && result.memory_plan->staged ? &*result.memory_plan : nullptr;
    std::unique_ptr<NoiseSource> seeded;
    NoiseSource *noise = hooks.noise;
    if (noise == nullptr) {
        seeded = std::make_unique<SeededNoise>(static_cast<std::uint64_t>(o.seed));
        noise = seeded.get();
    }

    std::optional<Tagged> tagged;
    {
        StageScope stage(*engine_, "tag", staged);
        tagged = tag(image);
    }
    result.tags = tagged->tags;
    result.prompt = format_prompt(prompt_template_,
                                  {{"tags", tagged->tags}, {"prompt", o.prompt}, {"added_prompt", o.added_prompt}});
    const Rgb8Image work = working_image(image, o.process_size, o.upscale);
    std::optional<Conditioning> conditioned;
    {
        StageScope stage(*engine_, "prompt", staged);
        conditioned = condition(result.prompt, std::move(tagged->image_embeds), work, o);
    }
    const Conditioning &c = *conditioned;

    DdpmScheduler scheduler(scheduler_config_);
    scheduler.set_timesteps(static_cast<int>(o.steps));
    Tensor latents = noise->draw("initial", {1, 4, work.height / 8, work.width / 8});
    for (std::size_t i = 0; i < latents.count(); ++i) latents.f32_data()[i] *= DdpmScheduler::init_noise_sigma;
    if (o.start_point == "lr") {
        StageScope stage(*engine_, "encode", staged);
        latents = lr_latent(to_chw(work.view()), latents, *noise, scheduler, o.vae_encoder_tile_size, o.tiled_vae, staged);
    }
    {
        StageScope stage(*engine_, "denoise", staged);
        latents = sample(std::move(latents), c, scheduler, *noise, o, hooks);
    }

    Rgb8Image decoded;
    {
        StageScope stage(*engine_, "decode", staged);
        decoded = decode(latents, o.vae_decoder_tile_size, o.tiled_vae, staged);
    }
    const Rgb8Image fixed = color_fix(o.color_fix, decoded, work);
    result.image = resize_bicubic(fixed.view(), static_cast<std::int32_t>(image.width * o.upscale),
                                  static_cast<std::int32_t>(image.height * o.upscale));
    return result;
}

}  // namespace seesr
