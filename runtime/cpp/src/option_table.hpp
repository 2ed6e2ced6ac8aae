// The upscale options as a bundle describes them (its manifest's pipeline.options): names, types, defaults
// and ranges are read from the bundle, never restated here, and every value set is checked against them.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace seesr {

using Json = nlohmann::json;

// What is wrong with a manifest's pipeline.options (empty when nothing is), as the Python runtime says it.
std::vector<std::string> option_description_problems(const Json &entries);

struct OptionSpec {
    std::string name;
    std::string type;  // "str", "int", "float" or "bool"
    Json default_value;
    Json minimum, maximum;  // null: unbounded
    std::vector<Json> choices;  // empty: any value of the type (within the bounds)

    // `value` as this option's type, or an option error naming the option, the value and what is accepted.
    Json checked(const Json &value) const;
    // The accepted range of a value of the right type: "in [1, 1000]", "a finite number >= 0.0", "one of (...)".
    std::string range_text() const;
};

// The options an upscale reads, typed: read once per call from the resolved table (OptionTable::upscale_options).
// Every one must be in a bundle's options table with this type, which from_pipeline checks at open.
struct UpscaleOptions {
    std::string prompt, added_prompt, negative_prompt, color_fix, start_point;
    double guidance = 0.0, conditioning_scale = 0.0;
    std::int64_t steps = 0, process_size = 0, upscale = 0, latent_tile_size = 0, latent_tile_overlap = 0,
                 vae_encoder_tile_size = 0, vae_decoder_tile_size = 0, seed = 0, max_pixels = 0;
    bool tiled_vae = true;
};

class OptionTable {
public:
    // From a validated manifest's "pipeline" section; a bundle error when it records no options table, or one
    // lacking an option UpscaleOptions reads or giving it another type (naming the option).
    static OptionTable from_pipeline(const Json &pipeline, const std::string &bundle);

    const OptionSpec &spec(const std::string &name) const;  // an option error for an unknown name
    const std::vector<OptionSpec> &specs() const { return specs_; }
    const std::string &json_text() const { return json_text_; }

    // Every option: `given` over the bundle's defaults, checked, with the rules between options.
    std::map<std::string, Json> resolve(const std::map<std::string, Json> &given) const;
    // resolve(given), typed.
    UpscaleOptions upscale_options(const std::map<std::string, Json> &given) const;

private:
    std::vector<OptionSpec> specs_;
    std::string json_text_;
};

}  // namespace seesr
