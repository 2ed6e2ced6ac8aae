#include "engine.hpp"

#include <utility>

namespace seesr {

// Defined by each engine's own source file.
std::unique_ptr<Engine> create_openvino_engine(const Manifest &manifest, const EngineSettings &settings);

namespace {

using Factory = std::unique_ptr<Engine> (*)(const Manifest &, const EngineSettings &);

const std::vector<std::pair<std::string, Factory>> &factories() {
    static const std::vector<std::pair<std::string, Factory>> known = {{"openvino", create_openvino_engine}};
    return known;
}

}  // namespace

std::vector<std::string> engine_kinds() {
    std::vector<std::string> kinds;
    for (const auto &[kind, factory] : factories()) kinds.push_back(kind);
    return kinds;
}

std::unique_ptr<Engine> create_engine(const std::string &kind, const Manifest &manifest, const EngineSettings &settings) {
    for (const auto &[known, factory] : factories()) {
        if (known == kind) return factory(manifest, settings);
    }
    std::string have;
    for (const auto &known : engine_kinds()) have += (have.empty() ? "'" : ", '") + known + "'";
    throw Failure(SEESR_ERROR_ENGINE, "unknown engine '" + kind + "'; this build has: [" + have + "]");
}

std::vector<std::string> output_names(const Manifest &manifest, const std::string &network) {
    const Json &outputs = manifest.entry(network).value("/spec/outputs"_json_pointer, Json());
    std::vector<std::string> names;
    if (outputs.is_array()) {
        for (const Json &output : outputs) {
            if (output.is_object() && output.value("name", Json()).is_string()) names.push_back(output["name"]);
        }
    }
    if (names.empty() || names.size() != outputs.size()) {
        throw bundle_error(manifest.root().string() + ": the spec of '" + network +
                           "' in manifest.json names no outputs (or an output without a name)");
    }
    return names;
}

}  // namespace seesr
