// The SeeSR pipeline over one bundle: what seesr_pipeline (the C ABI's handle) holds and runs. So far it
// reads the bundle, checks options and describes images (DAPE tags and the prompt); the diffusion loop,
// the VAE and the colour fixes come next (seesr_runtime/pipeline.py is the algorithm to follow).
#pragma once

#include "engine.hpp"
#include "imaging.hpp"
#include "manifest.hpp"
#include "option_table.hpp"
#include "text_encoder.hpp"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace seesr {

using Options = std::map<std::string, Json>;  // option name -> value, as checked by the OptionTable

struct Description {
    std::string tags;    // DAPE's tags, ", "-joined
    std::string prompt;  // the bundle's prompt template filled with the tags and the prompt options
};

// The bundle's template ("{tags}, {prompt},{added_prompt}") filled as Python's str.format fills named fields
// ({{ and }} for braces); a bundle error for any other field.
std::string format_prompt(const std::string &templ, const std::map<std::string, std::string> &fields);

class Pipeline {
public:
    // Read the bundle (manifest, options table, tokenizer, tagger) and start its engine.
    Pipeline(const std::filesystem::path &bundle, const std::string &engine, const EngineSettings &settings);

    const Manifest &manifest() const { return manifest_; }
    const std::shared_ptr<const OptionTable> &options() const { return options_; }
    const ClipTokenizer &tokenizer() const { return text_.tokenizer(); }
    Tensor encode_prompt(const std::string &text) const { return text_.encode(*engine_, text); }
    Tensor encode_negative(const std::string &text) const { return text_.encode_negative(*engine_, text); }

    // The image's tags and prompt (DAPE only); image errors before any network runs.
    Description describe(const RgbView &image, const Options &given) const;

private:
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
    std::unique_ptr<Engine> engine_;  // runs over manifest_, so declared (and destroyed) after it
};

}  // namespace seesr
