#include "engine.hpp"

#include <utility>

namespace seesr {

// Defined by each engine's own source file.
std::unique_ptr<Engine> create_openvino_engine(const Manifest &manifest, const EngineSettings &settings);
Json openvino_engine_info();

namespace {

struct EngineKind {
    std::string name;
    std::unique_ptr<Engine> (*create)(const Manifest &, const EngineSettings &);
    Json (*info)();
};

const std::vector<EngineKind> &known_engines() {
    static const std::vector<EngineKind> known = {{"openvino", create_openvino_engine, openvino_engine_info}};
    return known;
}

const EngineKind &engine_kind(const std::string &kind) {
    for (const EngineKind &known : known_engines()) {
        if (known.name == kind) return known;
    }
    std::string have;
    for (const auto &known : engine_kinds()) have += (have.empty() ? "'" : ", '") + known + "'";
    throw Failure(SEESR_ERROR_ENGINE, "unknown engine '" + kind + "'; this build has: [" + have + "]");
}

}  // namespace

std::vector<std::string> engine_kinds() {
    std::vector<std::string> kinds;
    for (const EngineKind &known : known_engines()) kinds.push_back(known.name);
    return kinds;
}

std::unique_ptr<Engine> create_engine(const std::string &kind, const Manifest &manifest, const EngineSettings &settings) {
    return engine_kind(kind).create(manifest, settings);
}

Json engine_info(const std::string &kind) { return engine_kind(kind).info(); }

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
