// seesr.hpp: a header-only C++17 wrapper of the C ABI (seesr.h): RAII handles, exceptions.
//
//   seesr::Pipeline pipeline("bundle");
//   seesr::Options options(pipeline);
//   options.set("steps", 20).set("color_fix", "wavelet");
//   seesr::Image out = pipeline.upscale(rgb, width, height, stride, &options);  // options: nullptr for the defaults
//
// Every failure throws seesr::Error, carrying the status and the library's message.
#ifndef SEESR_HPP
#define SEESR_HPP

#include "seesr.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace seesr {

class Error : public std::runtime_error {
public:
    Error(seesr_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    seesr_status status() const noexcept { return status_; }

private:
    seesr_status status_;
};

namespace detail {
inline void check(seesr_status status) {
    if (status != SEESR_OK) {
        throw Error(status, std::string(seesr_status_name(status)) + ": " + seesr_last_error());
    }
}

// One owning pointer per handle type: moves, never copies.
template <typename T, void (*Free)(T *)>
class Handle {
public:
    Handle() = default;
    explicit Handle(T *raw) : raw_(raw) {}
    Handle(Handle &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
    Handle &operator=(Handle &&other) noexcept {
        if (this != &other) {
            reset();
            raw_ = std::exchange(other.raw_, nullptr);
        }
        return *this;
    }
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    ~Handle() { reset(); }
    T *get() const noexcept { return raw_; }

private:
    void reset() noexcept {
        if (raw_ != nullptr) Free(raw_);
        raw_ = nullptr;
    }
    T *raw_ = nullptr;
};
// The string `query(&out)` allocated, copied and freed (seesr_string_free).
template <typename Query>
std::string owned_text(const Query &query) {
    char *text = nullptr;
    const seesr_status status = query(&text);
    const Handle<char, seesr_string_free> freed(text);
    check(status);
    return text != nullptr ? text : "";
}
}  // namespace detail

inline std::string version() { return seesr_version(); }
inline int abi_version() { return seesr_abi_version(); }

// seesr_engine_info_json: the engine's version and devices, each with whether it computes bf16 natively and the
// precisions it runs (JSON, see seesr.h).
inline std::string engine_info_json(const std::string &engine = "openvino") {
    const char *json = nullptr;
    detail::check(seesr_engine_info_json(engine.c_str(), &json));
    return json;
}

struct EngineOptions {
    std::string engine = "openvino";
    std::string device = "CPU";
    std::string precision = "fp32";
    int threads = 0;
    std::string cache_dir;  // empty: no cache
    seesr_verify verify = SEESR_VERIFY_AUTO;
    std::string tiled_vae_spill_dir;  // empty: the tiled VAE's waiting tile states stay in memory (seesr.h)
    std::uint64_t memory_budget = 0;  // bytes (parse_byte_size reads "4GB"); 0: none (seesr.h)
};

// "4GB", "2500MB", "4GiB", bytes: a size as the memory_budget option reads it (seesr_parse_byte_size).
inline std::uint64_t parse_byte_size(const std::string &text, const std::string &name = "memory_budget") {
    std::uint64_t bytes = 0;
    detail::check(seesr_parse_byte_size(name.c_str(), text.c_str(), &bytes));
    return bytes;
}

class Image {
public:
    explicit Image(seesr_image *raw) : handle_(raw) {}
    const std::uint8_t *pixels() const { return seesr_image_pixels(handle_.get()); }
    int width() const { return seesr_image_width(handle_.get()); }
    int height() const { return seesr_image_height(handle_.get()); }
    int stride() const { return seesr_image_stride(handle_.get()); }
    std::string tags() const { return seesr_image_tags(handle_.get()); }
    std::string prompt() const { return seesr_image_prompt(handle_.get()); }

private:
    detail::Handle<seesr_image, seesr_image_free> handle_;
};

class Options;

class Pipeline {
public:
    explicit Pipeline(const std::string &bundle, const EngineOptions &engine = EngineOptions()) {
        seesr_engine_options raw;
        detail::check(seesr_engine_options_init(&raw));
        raw.engine = engine.engine.c_str();
        raw.device = engine.device.c_str();
        raw.precision = engine.precision.c_str();
        raw.threads = engine.threads;
        raw.cache_dir = engine.cache_dir.empty() ? nullptr : engine.cache_dir.c_str();
        raw.verify = engine.verify;
        raw.tiled_vae_spill_dir = engine.tiled_vae_spill_dir.empty() ? nullptr : engine.tiled_vae_spill_dir.c_str();
        raw.memory_budget = engine.memory_budget;
        seesr_pipeline *opened = nullptr;
        detail::check(seesr_pipeline_open(bundle.c_str(), &raw, &opened));
        handle_ = detail::Handle<seesr_pipeline, seesr_pipeline_close>(opened);
    }

    std::string bundle_name() const { return text(seesr_pipeline_bundle_name); }
    std::string exporter_version() const { return text(seesr_pipeline_bundle_exporter_version); }
    std::string options_json() const { return text(seesr_pipeline_options_json); }
    int bundle_schema_version() const {
        std::int32_t version = 0;
        detail::check(seesr_pipeline_bundle_schema_version(handle_.get(), &version));
        return version;
    }

    // Compiled models alive now, per network (seesr_pipeline_resident_json), as JSON.
    std::string resident_json() const {
        return detail::owned_text([&](char **out) { return seesr_pipeline_resident_json(handle_.get(), out); });
    }
    // The memory plan of a `width` x `height` upscale (seesr_pipeline_memory_plan_json), as JSON.
    inline std::string memory_plan_json(int width, int height, const Options *options = nullptr) const;
    inline Image upscale(const std::uint8_t *rgb, int width, int height, int stride, const Options *options = nullptr);
    inline Image describe(const std::uint8_t *rgb, int width, int height, int stride, const Options *options = nullptr);

    seesr_pipeline *get() const noexcept { return handle_.get(); }

private:
    std::string text(seesr_status (*query)(const seesr_pipeline *, const char **)) const {
        const char *value = nullptr;
        detail::check(query(handle_.get(), &value));
        return value;
    }
    detail::Handle<seesr_pipeline, seesr_pipeline_close> handle_;
};

class Options {
public:
    explicit Options(const Pipeline &pipeline) {
        seesr_options *created = nullptr;
        detail::check(seesr_options_create(pipeline.get(), &created));
        handle_ = detail::Handle<seesr_options, seesr_options_free>(created);
    }
    Options &set(const std::string &name, int value) { return set(name, static_cast<std::int64_t>(value)); }
    Options &set(const std::string &name, std::int64_t value) {
        detail::check(seesr_options_set_int(get(), name.c_str(), value));
        return *this;
    }
    Options &set(const std::string &name, double value) {
        detail::check(seesr_options_set_float(get(), name.c_str(), value));
        return *this;
    }
    Options &set(const std::string &name, bool value) {
        detail::check(seesr_options_set_bool(get(), name.c_str(), value ? 1 : 0));
        return *this;
    }
    Options &set(const std::string &name, const std::string &value) {
        detail::check(seesr_options_set_string(get(), name.c_str(), value.c_str()));
        return *this;
    }
    Options &set(const std::string &name, const char *value) { return set(name, std::string(value)); }
    Options &unset(const std::string &name) {
        detail::check(seesr_options_unset(get(), name.c_str()));
        return *this;
    }
    Options &on_progress(seesr_progress_fn callback, void *user_data) {
        detail::check(seesr_options_set_progress(get(), callback, user_data));
        return *this;
    }
    Options &on_noise(seesr_noise_fn callback, void *user_data) {
        detail::check(seesr_options_set_noise(get(), callback, user_data));
        return *this;
    }
    Options &on_step_latents(seesr_latents_fn callback, void *user_data) {
        detail::check(seesr_options_set_step_latents(get(), callback, user_data));
        return *this;
    }
    seesr_options *get() const noexcept { return handle_.get(); }

private:
    detail::Handle<seesr_options, seesr_options_free> handle_;
};

inline std::string Pipeline::memory_plan_json(int width, int height, const Options *options) const {
    return detail::owned_text([&](char **out) {
        return seesr_pipeline_memory_plan_json(get(), width, height, options ? options->get() : nullptr, out);
    });
}

inline Image Pipeline::upscale(const std::uint8_t *rgb, int width, int height, int stride, const Options *options) {
    seesr_image *out = nullptr;
    detail::check(seesr_upscale(get(), rgb, width, height, stride, options ? options->get() : nullptr, &out));
    return Image(out);
}

inline Image Pipeline::describe(const std::uint8_t *rgb, int width, int height, int stride, const Options *options) {
    seesr_image *out = nullptr;
    detail::check(seesr_describe(get(), rgb, width, height, stride, options ? options->get() : nullptr, &out));
    return Image(out);
}

}  // namespace seesr

#endif  // SEESR_HPP
