// The SeeSR pipeline over one bundle: what seesr_pipeline (the C ABI's handle) holds and runs. It reads the
// bundle, checks options, describes images (DAPE tags and the prompt) and upscales them, following
// seesr_runtime/pipeline.py step for step (working image, VAE posterior start point, guided ControlNet + UNet
// steps, latent tiling, the tiled VAE, colour fixes, the final resize).
#pragma once

#include "engine.hpp"
#include "imaging.hpp"
#include "manifest.hpp"
#include "memory_plan.hpp"
#include "noise.hpp"
#include "option_table.hpp"
#include "resample.hpp"
#include "scheduler.hpp"
#include "text_encoder.hpp"

#include <functional>
#include <mutex>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace seesr {

using Options = std::map<std::string, Json>;  // option name -> value, as checked by the OptionTable

struct Description {
    std::string tags;    // DAPE's tags, ", "-joined
    std::string prompt;  // the bundle's prompt template filled with the tags and the prompt options
};

struct Upscaled {
    Rgb8Image image;
    std::string tags, prompt;
    std::optional<MemoryPlan> memory_plan;  // under a memory budget: what was resident when, and the tiles
};

// What a caller follows or replaces during an upscale; all optional.
struct UpscaleHooks {
    NoiseSource *noise = nullptr;  // null: a SeededNoise from the seed option
    // After each step (1..total); returning true cancels the upscale (a cancelled failure).
    std::function<bool(int step, int total)> progress;
    // The latents [1, 4, h, w] after each step (1..total), for parity checks against another implementation.
    std::function<void(int step, const Tensor &latents)> step_latents;
};

// The bundle's template ("{tags}, {prompt},{added_prompt}") filled as Python's str.format fills named fields
// ({{ and }} for braces); a bundle error for any other field.
std::string format_prompt(const std::string &templ, const std::map<std::string, std::string> &fields);

class Pipeline {
public:
    // Read the bundle (manifest, options table, tokenizer, tagger) and start its engine. `tiled_vae_spill_dir`:
    // where the tiled VAE keeps its waiting tile states (run_tiled_vae); empty: in memory. `memory_budget`: bytes
    // each upscale is planned to stay under (memory_plan.hpp; the engine then maps its weights from prepared
    // files); none: every network stays loaded once used. An option error for a budget on an engine or device
    // whose memory is not modelled.
    Pipeline(const std::filesystem::path &bundle, const std::string &engine, const EngineSettings &settings,
             std::filesystem::path tiled_vae_spill_dir = {}, std::optional<std::int64_t> memory_budget = {});
    // The same over a manifest already loaded (Manifest::load), which the pipeline keeps.
    Pipeline(Manifest manifest, const std::string &engine, const EngineSettings &settings,
             std::filesystem::path tiled_vae_spill_dir = {}, std::optional<std::int64_t> memory_budget = {});

    const Manifest &manifest() const { return manifest_; }
    const std::shared_ptr<const OptionTable> &options() const { return options_; }
    const ClipTokenizer &tokenizer() const { return text_.tokenizer(); }
    Tensor encode_prompt(const std::string &text) const { return text_.encode(*engine_, text); }
    Tensor encode_negative(const std::string &text) const { return text_.encode_negative(*engine_, text); }
    // Shapes the engine has compiled so far (Engine::compiles).
    std::size_t compiles() const { return engine_->compiles(); }
    // Compiled models alive now, per network or tiled-VAE segment (Engine::resident).
    std::map<std::string, std::size_t> resident() const { return engine_->resident(); }
    const std::optional<std::int64_t> &memory_budget() const { return memory_budget_; }

    // The memory plan of an upscale of a `width` x `height` LR image with `given` options (pipeline.py's
    // memory_plan): under the budget (an option error naming the smallest budget that would do where none
    // fits), or without one the plan that keeps everything resident; none where the engine's memory is not
    // modelled (and no budget is set).
    std::optional<MemoryPlan> memory_plan(std::int64_t width, std::int64_t height, const Options &given) const;

    // The image's tags and prompt (DAPE only); image errors before any network runs.
    Description describe(const RgbView &image, const Options &given) const;

    // The image upscaled (pipeline.py's SeeSRPipeline.__call__); option and image errors before any network runs.
    Upscaled upscale(const RgbView &image, const Options &given, const UpscaleHooks &hooks) const;

private:
    // The constants of one sampling loop: every batched tensor is [uncond, cond] when guided.
    struct Conditioning {
        Tensor text_embeds, image_embeds, control;
        Tensor conditioning_scale;  // float32, 0-d
    };
    struct Tagged {
        std::string tags;
        Tensor image_embeds;
    };
    class Denoiser;
    Tagged tag(const RgbView &image) const;
    Conditioning condition(const std::string &prompt, Tensor image_embeds, const Rgb8Image &work,
                           const UpscaleOptions &o) const;
    // eps_uncond + guidance * (eps_cond - eps_uncond) of a [2, ...] prediction, in float32.
    static Tensor guided_eps(const Tensor &eps, float guidance);
    // The scheduler's steps from `latents`, with the hooks' progress, cancellation and latents after each.
    Tensor sample(Tensor latents, const Conditioning &c, const DdpmScheduler &scheduler, NoiseSource &noise,
                  const UpscaleOptions &o, const UpscaleHooks &hooks) const;
    std::optional<MemoryPlan> memory_plan(std::int64_t width, std::int64_t height, const UpscaleOptions &o) const;
    // `staged`: a staged memory plan (null: none), which frees each tiled-VAE segment once every tile has passed
    // it and may spill the waiting tiles to files.
    std::vector<Tensor> run_vae(const std::string &network, const Tensor &x, std::int64_t tile, bool tiled,
                                const MemoryPlan *staged) const;
    Tensor lr_latent(const Tensor &work, const Tensor &initial_noise, NoiseSource &noise, const DdpmScheduler &scheduler,
                     std::int64_t vae_tile, bool tiled, const MemoryPlan *staged) const;
    Rgb8Image decode(const Tensor &latents, std::int64_t tile, bool tiled, const MemoryPlan *staged) const;
    NetworkBytes network_bytes_once() const;

    struct Tagger {
        std::int64_t input_size = 0;
        std::vector<float> mean, std, thresholds;
        std::vector<std::string> tags;
    };
    static Tagger read_tagger(const Manifest &manifest);

    Manifest manifest_;
    std::shared_ptr<const OptionTable> options_;
    TextEncoder text_;
    Tagger tagger_;
    std::string prompt_template_;
    DdpmConfig scheduler_config_;
    float scaling_factor_ = 0.0f;
    std::int64_t start_step_ = 0;
    std::filesystem::path tiled_vae_spill_dir_;  // empty: tile states in memory
    std::optional<std::int64_t> memory_budget_;
    EngineSettings settings_;
    mutable std::once_flag bytes_once_;
    mutable NetworkBytes bytes_;  // the bundle's graph sizes as the engine runs them (read on the first plan)
    std::unique_ptr<Engine> engine_;  // runs over manifest_, so declared (and destroyed) after it
};

}  // namespace seesr
