// The C ABI (seesr.h) over the C++ implementation: every entry point catches everything, so no exception
// crosses into C and nothing aborts the host; failures become a status and a per-thread message.
#include "seesr.h"

#include "engine.hpp"
#include "failure.hpp"
#include "memory_plan.hpp"
#include "pipeline.hpp"
#include "tiled_vae.hpp"
#include "unicode_text.hpp"
#include "verification.hpp"
#include "version.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

struct seesr_pipeline {
    std::unique_ptr<seesr::Pipeline> pipeline;
    std::string name;
    std::string exporter_version;
};

struct seesr_options {
    std::shared_ptr<const seesr::OptionTable> table;  // shared: options may outlive their pipeline
    std::map<std::string, seesr::Json> given;
    seesr_progress_fn progress = nullptr;
    void *progress_user_data = nullptr;
    seesr_noise_fn noise = nullptr;
    void *noise_user_data = nullptr;
    seesr_latents_fn step_latents = nullptr;
    void *step_latents_user_data = nullptr;
};

struct seesr_image {
    std::vector<std::uint8_t> pixels;
    std::int32_t width = 0, height = 0;
    std::string tags, prompt;
};

namespace {

thread_local std::string last_error;

seesr_status fail(seesr_status status, const std::string &message) {
    try {
        last_error = message;
    } catch (...) {  // no memory left even for the message: the status still says what happened
    }
    return status;
}

// Run `body`, turning every exception into a status and message.
template <typename Body>
seesr_status guarded(Body &&body) noexcept {
    try {
        last_error.clear();
        body();
        return SEESR_OK;
    } catch (const seesr::Failure &failure) {
        return fail(failure.status(), failure.what());
    } catch (const std::bad_alloc &) {
        return fail(SEESR_ERROR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception &error) {
        return fail(SEESR_ERROR_INTERNAL, std::string("internal error: ") + error.what());
    } catch (...) {
        return fail(SEESR_ERROR_INTERNAL, "internal error: an unknown exception");
    }
}

template <typename T>
void require(const T *pointer, const char *what) {
    if (pointer == nullptr) throw seesr::Failure(SEESR_ERROR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

std::string text_or(const char *value, const char *fallback) { return value != nullptr ? value : fallback; }

// `text` copied into malloc'd memory the caller frees with seesr_string_free.
char *allocated(const std::string &text) {
    char *copy = static_cast<char *>(std::malloc(text.size() + 1));
    if (copy == nullptr) throw std::bad_alloc();
    std::memcpy(copy, text.c_str(), text.size() + 1);
    return copy;
}

// The first release's seesr_engine_options ended with `verify`: a caller built against it passes this size or
// its padded sizeof, and the fields added since keep their defaults.
constexpr std::size_t kFirstEngineOptionsSize = offsetof(seesr_engine_options, verify) + sizeof(seesr_verify);

// The caller's options (NULL: the defaults) as this version's full struct: fields beyond a shorter struct_size
// keep the defaults of seesr_engine_options_init, fields beyond ours are not read.
seesr_engine_options read_engine_options(const seesr_engine_options *given) {
    seesr_engine_options options;
    seesr_engine_options_init(&options);
    if (given == nullptr) return options;
    if (given->struct_size < kFirstEngineOptionsSize) {
        throw seesr::Failure(SEESR_ERROR_INVALID_ARGUMENT,
                             "seesr_engine_options.struct_size is " + std::to_string(given->struct_size) +
                                 ", expected at least " + std::to_string(kFirstEngineOptionsSize) + " (this version's is " +
                                 std::to_string(sizeof(seesr_engine_options)) +
                                 "; initialise it with seesr_engine_options_init)");
    }
    std::memcpy(&options, given, std::min<std::size_t>(given->struct_size, sizeof(seesr_engine_options)));
    options.struct_size = sizeof(seesr_engine_options);
    return options;
}

void check_engine_options(const seesr_engine_options &options) {
    if (options.threads < 0) {
        throw seesr::Failure(SEESR_ERROR_INVALID_ARGUMENT,
                             "threads must be >= 0 (0: the engine's choice), got " + std::to_string(options.threads));
    }
    if (options.verify < SEESR_VERIFY_AUTO || options.verify > SEESR_VERIFY_NEVER) {
        throw seesr::Failure(SEESR_ERROR_INVALID_ARGUMENT, "verify must be SEESR_VERIFY_AUTO, _ALWAYS or _NEVER, got " +
                                                               std::to_string(static_cast<int>(options.verify)));
    }
    if (options.memory_budget > static_cast<std::uint64_t>(INT64_MAX)) {
        throw seesr::option_error("memory_budget must be at most " + std::to_string(INT64_MAX) + " bytes, got " +
                                  std::to_string(options.memory_budget));
    }
    // On open rather than at the first tiled upscale, which may come hours later or never for small images.
    if (options.tiled_vae_spill_dir != nullptr) seesr::check_spill_dir(options.tiled_vae_spill_dir);
}

void check_image_arguments(const std::uint8_t *rgb, std::int32_t width, std::int32_t height, std::int32_t stride) {
    require(rgb, "rgb");
    if (width <= 0 || height <= 0) {
        throw seesr::Failure(SEESR_ERROR_IMAGE, "image size must be positive, got " + std::to_string(width) + "x" +
                                                    std::to_string(height));
    }
    if (static_cast<std::int64_t>(stride) < 3 * static_cast<std::int64_t>(width)) {
        throw seesr::Failure(SEESR_ERROR_IMAGE, "stride must be at least 3 * width = " + std::to_string(3LL * width) +
                                                    " bytes, got " + std::to_string(stride));
    }
}

seesr::EngineSettings engine_settings(const seesr_engine_options &options) {
    seesr::EngineSettings settings;
    settings.device = text_or(options.device, "CPU");
    settings.precision = text_or(options.precision, "fp32");
    settings.threads = options.threads;
    settings.cache_dir = text_or(options.cache_dir, "");
    return settings;
}

seesr_status set_option(seesr_options *options, const char *name, const seesr::Json &value) {
    return guarded([&] {
        require(options, "options");
        require(name, "name");
        options->given[name] = options->table->spec(name).checked(value);
    });
}

// The caller's callbacks of `options` (none when NULL) as the pipeline's hooks; `noise` holds the noise source.
seesr::UpscaleHooks upscale_hooks(const seesr_options *options, std::unique_ptr<seesr::CallbackNoise> &noise) {
    seesr::UpscaleHooks hooks;
    if (options == nullptr) return hooks;
    if (options->noise != nullptr) {
        noise = std::make_unique<seesr::CallbackNoise>(options->noise, options->noise_user_data);
        hooks.noise = noise.get();
    }
    if (options->progress != nullptr) {
        hooks.progress = [options](int step, int total) {
            return options->progress(options->progress_user_data, step, total) != 0;
        };
    }
    if (options->step_latents != nullptr) {
        hooks.step_latents = [options](int step, const seesr::Tensor &latents) {
            const seesr::Shape &shape = latents.shape();
            options->step_latents(options->step_latents_user_data, step, shape.data(),
                                  static_cast<std::int32_t>(shape.size()), latents.f32_data(), latents.count());
        };
    }
    return hooks;
}

}  // namespace

extern "C" {

int32_t seesr_abi_version(void) { return SEESR_ABI_VERSION; }

const char *seesr_version(void) { return seesr::kVersion; }

const char *seesr_status_name(seesr_status status) {
    switch (status) {
        case SEESR_OK: return "SEESR_OK";
        case SEESR_ERROR_INVALID_ARGUMENT: return "SEESR_ERROR_INVALID_ARGUMENT";
        case SEESR_ERROR_BUNDLE: return "SEESR_ERROR_BUNDLE";
        case SEESR_ERROR_OPTION: return "SEESR_ERROR_OPTION";
        case SEESR_ERROR_IMAGE: return "SEESR_ERROR_IMAGE";
        case SEESR_ERROR_ENGINE: return "SEESR_ERROR_ENGINE";
        case SEESR_ERROR_CANCELLED: return "SEESR_ERROR_CANCELLED";
        case SEESR_ERROR_OUT_OF_MEMORY: return "SEESR_ERROR_OUT_OF_MEMORY";
        case SEESR_ERROR_NOT_IMPLEMENTED: return "SEESR_ERROR_NOT_IMPLEMENTED";
        case SEESR_ERROR_INTERNAL: return "SEESR_ERROR_INTERNAL";
    }
    return "unknown status";
}

const char *seesr_last_error(void) { return last_error.c_str(); }

seesr_status seesr_engine_info_json(const char *engine, const char **out) {
    // Asked once per engine and kept for the process (so the string stays valid); a failure is not kept.
    static std::mutex mutex;
    static std::map<std::string, std::string> answers;
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        const std::string kind = text_or(engine, "openvino");
        std::lock_guard<std::mutex> lock(mutex);
        auto found = answers.find(kind);
        if (found == answers.end()) found = answers.emplace(kind, seesr::engine_info(kind).dump()).first;
        *out = found->second.c_str();
    });
}

seesr_status seesr_engine_options_init(seesr_engine_options *options) {
    return guarded([&] {
        require(options, "options");
        *options = seesr_engine_options{};
        options->struct_size = sizeof(seesr_engine_options);
        options->verify = SEESR_VERIFY_AUTO;
    });
}

seesr_status seesr_pipeline_open(const char *bundle_path, const seesr_engine_options *options, seesr_pipeline **out) {
    return guarded([&] {
        require(bundle_path, "bundle_path");
        require(out, "out");
        *out = nullptr;
        const seesr_engine_options engine = read_engine_options(options);
        check_engine_options(engine);
        seesr::Manifest manifest = seesr::Manifest::load(bundle_path);  // read once: verified, then kept by the pipeline
        if (engine.verify != SEESR_VERIFY_NEVER) {
            seesr::verify_bundle(manifest, engine.verify == SEESR_VERIFY_ALWAYS ? seesr::VerifyMode::always
                                                                                : seesr::VerifyMode::automatic);
        }
        std::optional<std::int64_t> budget;
        if (engine.memory_budget != 0) budget = static_cast<std::int64_t>(engine.memory_budget);
        auto opened = std::make_unique<seesr::Pipeline>(std::move(manifest), text_or(engine.engine, "openvino"),
                                                        engine_settings(engine), text_or(engine.tiled_vae_spill_dir, ""),
                                                        budget);
        const seesr::Json &data = opened->manifest().data();
        std::string exporter = data["provenance"].value("/versions/seesr_export"_json_pointer, std::string());
        std::string name = data["name"].get<std::string>();
        auto pipeline = std::make_unique<seesr_pipeline>(seesr_pipeline{std::move(opened), std::move(name), std::move(exporter)});
        *out = pipeline.release();
    });
}

void seesr_pipeline_close(seesr_pipeline *pipeline) { delete pipeline; }

seesr_status seesr_pipeline_bundle_name(const seesr_pipeline *pipeline, const char **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = pipeline->name.c_str();
    });
}

seesr_status seesr_pipeline_bundle_schema_version(const seesr_pipeline *pipeline, int32_t *out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = pipeline->pipeline->manifest().data()["schema_version"].get<int32_t>();
    });
}

seesr_status seesr_pipeline_bundle_exporter_version(const seesr_pipeline *pipeline, const char **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = pipeline->exporter_version.c_str();
    });
}

seesr_status seesr_pipeline_options_json(const seesr_pipeline *pipeline, const char **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = pipeline->pipeline->options()->json_text().c_str();
    });
}

seesr_status seesr_pipeline_resident_json(const seesr_pipeline *pipeline, char **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = nullptr;
        seesr::Json alive = seesr::Json::object();
        for (const auto &[name, count] : pipeline->pipeline->resident()) alive[name] = count;
        *out = allocated(alive.dump());
    });
}

void seesr_string_free(char *text) { std::free(text); }

seesr_status seesr_parse_byte_size(const char *name, const char *text, uint64_t *out) {
    return guarded([&] {
        require(name, "name");
        require(text, "text");
        require(out, "out");
        *out = static_cast<uint64_t>(seesr::parse_byte_size(name, text));
    });
}

seesr_status seesr_pipeline_memory_plan_json(const seesr_pipeline *pipeline, int32_t width, int32_t height,
                                             const seesr_options *options, char **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = nullptr;
        if (width <= 0 || height <= 0) {
            throw seesr::Failure(SEESR_ERROR_IMAGE, "image size must be positive, got " + std::to_string(width) + "x" +
                                                        std::to_string(height));
        }
        const seesr::Options none;
        const std::optional<seesr::MemoryPlan> plan =
            pipeline->pipeline->memory_plan(width, height, options != nullptr ? options->given : none);
        if (!plan) {
            throw seesr::Failure(SEESR_ERROR_NOT_IMPLEMENTED, "the memory of this pipeline's engine is not modelled");
        }
        *out = allocated(plan->to_json().dump());
    });
}

seesr_status seesr_options_create(const seesr_pipeline *pipeline, seesr_options **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = nullptr;
        auto options = std::make_unique<seesr_options>();
        options->table = pipeline->pipeline->options();
        *out = options.release();
    });
}

void seesr_options_free(seesr_options *options) { delete options; }

seesr_status seesr_options_set_int(seesr_options *options, const char *name, int64_t value) {
    return set_option(options, name, seesr::Json(value));
}

seesr_status seesr_options_set_float(seesr_options *options, const char *name, double value) {
    return set_option(options, name, seesr::Json(value));
}

seesr_status seesr_options_set_bool(seesr_options *options, const char *name, int value) {
    return set_option(options, name, seesr::Json(value != 0));
}

seesr_status seesr_options_set_string(seesr_options *options, const char *name, const char *value) {
    return guarded([&] {
        require(value, "value");
        require(name, "name");
        try {
            seesr::unicode::decode(value, name);  // bytes that are not UTF-8 are refused before they reach a prompt
        } catch (const seesr::Failure &not_utf8) {
            throw seesr::option_error(not_utf8.what());
        }
        seesr_status status = set_option(options, name, seesr::Json(std::string(value)));
        if (status != SEESR_OK) throw seesr::Failure(status, last_error);
    });
}

seesr_status seesr_options_unset(seesr_options *options, const char *name) {
    return guarded([&] {
        require(options, "options");
        require(name, "name");
        options->table->spec(name);  // an unknown name is an error, not a silent no-op
        options->given.erase(name);
    });
}

seesr_status seesr_options_set_progress(seesr_options *options, seesr_progress_fn callback, void *user_data) {
    return guarded([&] {
        require(options, "options");
        options->progress = callback;
        options->progress_user_data = user_data;
    });
}

seesr_status seesr_options_set_noise(seesr_options *options, seesr_noise_fn callback, void *user_data) {
    return guarded([&] {
        require(options, "options");
        options->noise = callback;
        options->noise_user_data = user_data;
    });
}

seesr_status seesr_options_set_step_latents(seesr_options *options, seesr_latents_fn callback, void *user_data) {
    return guarded([&] {
        require(options, "options");
        options->step_latents = callback;
        options->step_latents_user_data = user_data;
    });
}

seesr_status seesr_upscale(seesr_pipeline *pipeline, const uint8_t *rgb, int32_t width, int32_t height,
                           int32_t stride, const seesr_options *options, seesr_image **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = nullptr;
        check_image_arguments(rgb, width, height, stride);
        std::unique_ptr<seesr::CallbackNoise> noise;
        const seesr::UpscaleHooks hooks = upscale_hooks(options, noise);
        const seesr::Options none;
        seesr::Upscaled upscaled =
            pipeline->pipeline->upscale({rgb, width, height, stride}, options != nullptr ? options->given : none, hooks);
        auto image = std::make_unique<seesr_image>();
        image->pixels = std::move(upscaled.image.pixels);
        image->width = upscaled.image.width;
        image->height = upscaled.image.height;
        image->tags = std::move(upscaled.tags);
        image->prompt = std::move(upscaled.prompt);
        *out = image.release();
    });
}

seesr_status seesr_describe(seesr_pipeline *pipeline, const uint8_t *rgb, int32_t width, int32_t height,
                            int32_t stride, const seesr_options *options, seesr_image **out) {
    return guarded([&] {
        require(pipeline, "pipeline");
        require(out, "out");
        *out = nullptr;
        check_image_arguments(rgb, width, height, stride);
        const seesr::Options none;
        seesr::Description description =
            pipeline->pipeline->describe({rgb, width, height, stride}, options != nullptr ? options->given : none);
        auto image = std::make_unique<seesr_image>();
        image->tags = std::move(description.tags);
        image->prompt = std::move(description.prompt);
        *out = image.release();
    });
}

void seesr_image_free(seesr_image *image) { delete image; }

const uint8_t *seesr_image_pixels(const seesr_image *image) {
    return image == nullptr || image->pixels.empty() ? nullptr : image->pixels.data();
}

int32_t seesr_image_width(const seesr_image *image) { return image == nullptr ? 0 : image->width; }

int32_t seesr_image_height(const seesr_image *image) { return image == nullptr ? 0 : image->height; }

int32_t seesr_image_stride(const seesr_image *image) { return image == nullptr ? 0 : 3 * image->width; }

const char *seesr_image_tags(const seesr_image *image) { return image == nullptr ? "" : image->tags.c_str(); }

const char *seesr_image_prompt(const seesr_image *image) { return image == nullptr ? "" : image->prompt.c_str(); }

}  // extern "C"
