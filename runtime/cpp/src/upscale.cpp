// Pipeline::upscale and its stages: seesr_runtime/pipeline.py's __call__, predict_noise(_tiled), run_vae,
// lr_latent and decode, in the same order and float32 arithmetic, so that the same noise gives the same latents.
#include "color_fix.hpp"
#include "pipeline.hpp"
#include "tiled_vae.hpp"
#include "tiling.hpp"

#include <cmath>

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

}  // namespace

Tensor Pipeline::predict_noise(const Tensor &latents, std::int64_t t, const Conditioning &c, const Tensor &control) const {
    const std::int64_t batch = latents.shape()[0];
    std::vector<NamedTensor> common = {
        {"sample", latents},
        {"timestep", Tensor::f32({batch}, std::vector<float>(static_cast<std::size_t>(batch), static_cast<float>(t)))},
        {"encoder_hidden_states", c.text_embeds},
        {"image_embeds", c.image_embeds},
    };
    std::vector<NamedTensor> controlnet_feeds = common;
    controlnet_feeds.push_back({"controlnet_cond", control});
    controlnet_feeds.push_back({"conditioning_scale", Tensor::f32({}, {c.conditioning_scale})});
    std::vector<Tensor> residuals = engine_->run("controlnet", controlnet_feeds);
    const std::vector<std::string> names = output_names(manifest_, "controlnet");
    for (std::size_t i = 0; i < names.size() && i < residuals.size(); ++i) {
        common.push_back({names[i], std::move(residuals[i])});
    }
    return std::move(engine_->run("unet", common).at(0));
}

Tensor Pipeline::predict_noise_tiled(const Tensor &latents, std::int64_t t, const Conditioning &c, std::int64_t tile,
                                     std::int64_t overlap) const {
    return blend_tiles(latents.shape(), tile, overlap, [&](std::int64_t y, std::int64_t x, std::int64_t size) {
        const Tensor pixels = crop(c.control, 8 * y, 8 * (y + size), 8 * x, 8 * (x + size));
        return predict_noise(crop(latents, y, y + size, x, x + size), t, c, pixels);
    });
}

std::vector<Tensor> Pipeline::run_vae(const std::string &network, const Tensor &x, std::int64_t tile, bool tiled) const {
    const TiledVaeLayout layout = TiledVaeLayout::for_network(network);
    if (!tiled || !layout.needs_tiling(x.shape()[2], x.shape()[3], tile)) {
        return engine_->run(network, {{first_input_name(manifest_, network), x}});
    }
    return run_tiled_vae(*engine_, manifest_, network, x, tile, tiled_vae_spill_dir_);
}

Tensor Pipeline::lr_latent(const Tensor &work, const Tensor &initial_noise, NoiseSource &noise,
                           const DdpmScheduler &scheduler, std::int64_t vae_tile, bool tiled) const {
    std::vector<float> scaled(work.f32_data(), work.f32_data() + work.count());
    for (float &value : scaled) value = value * 2.0f - 1.0f;
    std::vector<Tensor> moments = run_vae("vae_encoder", Tensor::f32(work.shape(), std::move(scaled)), vae_tile, tiled);
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

Rgb8Image Pipeline::decode(const Tensor &latents, std::int64_t tile, bool tiled) const {
    std::vector<float> unscaled(latents.f32_data(), latents.f32_data() + latents.count());
    for (float &value : unscaled) value /= scaling_factor_;
    const Tensor image = run_vae("vae_decoder", Tensor::f32(latents.shape(), std::move(unscaled)), tile, tiled).at(0);
    check_finite(image, "the VAE decoder");
    return to_uint8_rounded(image);
}

Pipeline::Conditioning Pipeline::condition(const std::string &prompt, Tensor image_embeds, const Rgb8Image &work,
                                           const Options &o) const {
    Conditioning c = {text_.encode(*engine_, prompt), std::move(image_embeds), to_chw(work.view()),
                      static_cast<float>(o.at("conditioning_scale").get<double>())};
    if (o.at("guidance").get<double>() > 1.0) {  // every batched tensor is [uncond, cond]
        c.text_embeds = concat_batch(text_.encode_negative(*engine_, o.at("negative_prompt").get<std::string>()), c.text_embeds);
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
                        const Options &o, const UpscaleHooks &hooks) const {
    const double guidance = o.at("guidance").get<double>();
    const std::int64_t tile = o.at("latent_tile_size").get<std::int64_t>();
    const std::int64_t overlap = o.at("latent_tile_overlap").get<std::int64_t>();
    const Shape shape = latents.shape();
    const bool tiled = shape[2] * shape[3] > tile * tile;
    const std::vector<std::int64_t> &timesteps = scheduler.timesteps();
    const int total = static_cast<int>(timesteps.size());
    for (int i = 0; i < total; ++i) {
        const std::int64_t t = timesteps[static_cast<std::size_t>(i)];
        const Tensor model_input = guidance > 1.0 ? concat_batch(latents, latents) : latents;
        Tensor eps = tiled ? predict_noise_tiled(model_input, t, c, tile, overlap) : predict_noise(model_input, t, c, c.control);
        if (guidance > 1.0) eps = guided_eps(eps, static_cast<float>(guidance));
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
    const Options o = options_->resolve(given);
    const auto integer = [&](const char *name) { return o.at(name).get<std::int64_t>(); };
    const auto text = [&](const char *name) { return o.at(name).get<std::string>(); };
    check_image_size(image.width, image.height, integer("max_pixels"));
    std::unique_ptr<NoiseSource> seeded;
    NoiseSource *noise = hooks.noise;
    if (noise == nullptr) {
        seeded = std::make_unique<SeededNoise>(static_cast<std::uint64_t>(integer("seed")));
        noise = seeded.get();
    }

    Upscaled result;
    Tagged tagged = tag(image);
    result.tags = tagged.tags;
    result.prompt = format_prompt(prompt_template_,
                                  {{"tags", tagged.tags}, {"prompt", text("prompt")}, {"added_prompt", text("added_prompt")}});
    const Rgb8Image work = working_image(image, integer("process_size"), integer("upscale"));
    const Conditioning c = condition(result.prompt, std::move(tagged.image_embeds), work, o);

    DdpmScheduler scheduler(scheduler_config_);
    scheduler.set_timesteps(static_cast<int>(integer("steps")));
    Tensor latents = noise->draw("initial", {1, 4, work.height / 8, work.width / 8});
    for (std::size_t i = 0; i < latents.count(); ++i) latents.f32_data()[i] *= DdpmScheduler::init_noise_sigma;
    const bool tiled_vae = o.at("tiled_vae").get<bool>();
    if (text("start_point") == "lr") {
        latents = lr_latent(to_chw(work.view()), latents, *noise, scheduler, integer("vae_encoder_tile_size"), tiled_vae);
    }
    latents = sample(std::move(latents), c, scheduler, *noise, o, hooks);

    const Rgb8Image decoded = decode(latents, integer("vae_decoder_tile_size"), tiled_vae);
    const Rgb8Image fixed = color_fix(text("color_fix"), decoded, work);
    result.image = resize_bicubic(fixed.view(), static_cast<std::int32_t>(image.width * integer("upscale")),
                                  static_cast<std::int32_t>(image.height * integer("upscale")));
    return result;
}

}  // namespace seesr
