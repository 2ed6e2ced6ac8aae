// A bundle's manifest.json: the same contract and refusals as the Python runtime's
// seesr_runtime/manifest.py (schema version, structure, every named path inside the bundle).
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace seesr {

using Json = nlohmann::json;

inline constexpr int kSchemaVersion = 1;
inline constexpr const char *kFormat = "seesr-bundle";
inline constexpr const char *kManifestFile = "manifest.json";

// Every structural problem of a parsed manifest, as the Python `validate` words them (empty: none).
std::vector<std::string> manifest_problems(const Json &data);

// The file the manifest path `rel` names inside the bundle `root` (resolved, need not exist); a bundle
// error for an absolute path, one climbing out of the bundle or leading out of it through a link.
std::filesystem::path bundle_path(const std::filesystem::path &root, const Json &rel, const std::string &what);

// (what it is, path) for every path a validated manifest names.
std::vector<std::pair<std::string, Json>> named_paths(const Json &data);

class Manifest {
public:
    // Read, validate and check the paths of `bundle`/manifest.json (no hashing: see seesr_verify).
    static Manifest load(const std::filesystem::path &bundle);

    const std::filesystem::path &root() const { return root_; }
    const Json &data() const { return data_; }
    std::filesystem::path file(const Json &rel, const std::string &what = "file") const {
        return bundle_path(root_, rel, what);
    }
    // The entry of a network, or of one tiled-VAE segment ("vae_decoder#3").
    const Json &entry(const std::string &network) const;
    // The ONNX graph of `network` at `precision` (segments: fp32), after checking that every external-data
    // file it names lies inside the bundle and is pinned by its manifest entry (as Manifest.graph_path).
    std::filesystem::path graph_path(const std::string &network, const std::string &precision) const;

private:
    Manifest(std::filesystem::path root, Json data) : root_(std::move(root)), data_(std::move(data)) {}
    std::filesystem::path root_;
    Json data_;
};

}  // namespace seesr
