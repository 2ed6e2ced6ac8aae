#include "manifest.hpp"

#include "failure.hpp"
#include "onnx_refs.hpp"
#include "option_table.hpp"
#include "python_text.hpp"

#include <algorithm>
#include <array>
#include <fstream>
#include <set>
#include <sstream>

namespace fs = std::filesystem;

namespace seesr {
namespace {

const std::array<const char *, 6> kNetworkNames = {"dape", "text_encoder", "controlnet",
                                                    "unet", "vae_encoder",  "vae_decoder"};
const std::array<const char *, 4> kPrecisions = {"fp32", "fp16", "int8", "fp16_gpu"};

template <std::size_t N>
bool contains(const std::array<const char *, N> &names, const std::string &name) {
    return std::any_of(names.begin(), names.end(), [&](const char *known) { return name == known; });
}

// The Python type names of the contract, for messages that read the same in both runtimes.
bool has_type(const Json &value, const std::string &type) {
    if (type == "int") return value.is_number_integer();
    if (type == "str") return value.is_string();
    return value.is_object();  // "dict"
}

const Json &member(const Json &object, const char *key, const Json &fallback) {
    auto found = object.find(key);
    return found == object.end() ? fallback : *found;
}

const Json kEmptyObject = Json::object();
const Json kEmptyArray = Json::array();
const Json kNull = nullptr;

// The graph-file holders of an entry: the entry itself and its tiled-VAE segments.
std::vector<std::pair<std::string, const Json *>> holders(const std::string &name, const Json &entry) {
    std::vector<std::pair<std::string, const Json *>> found = {{name, &entry}};
    const Json &tiled = member(entry, "tiled", kEmptyObject);
    const Json &segments = tiled.is_object() ? member(tiled, "segments", kEmptyArray) : kNull;
    if (segments.is_array()) {
        for (std::size_t k = 0; k < segments.size(); ++k) {
            found.emplace_back(name + "#" + std::to_string(k), &segments[k]);
        }
    }
    return found;
}

std::vector<std::string> network_problems(const std::string &name, const Json &entry) {
    if (!contains(kNetworkNames, name)) return {"unknown network '" + name + "'"};
    if (!entry.is_object()) return {name + ": expected an object, got " + python_type(entry)};
    std::vector<std::string> problems;
    if (!entry.contains("spec")) problems.push_back(name + ": missing 'spec'");
    const Json &tiled = member(entry, "tiled", kEmptyObject);
    const Json &segments = tiled.is_object() ? member(tiled, "segments", kEmptyArray) : kNull;
    bool segments_ok = segments.is_array() &&
                       std::all_of(segments.begin(), segments.end(), [](const Json &s) { return s.is_object(); });
    if (!segments_ok) problems.push_back(name + ": 'tiled' must be an object whose 'segments' is a list of objects");
    auto owners = segments_ok ? holders(name, entry) : std::vector<std::pair<std::string, const Json *>>{{name, &entry}};
    for (const auto &[owner, holder] : owners) {
        const Json &by_precision = member(*holder, "files", kEmptyObject);
        if (!by_precision.is_object()) {
            problems.push_back(owner + ": 'files' must map precisions to graph files");
            continue;
        }
        for (const auto &[precision, files] : by_precision.items()) {
            if (!contains(kPrecisions, precision)) problems.push_back(owner + ": unknown precision '" + precision + "'");
            if (!files.is_object() || !member(files, "onnx", kNull).is_string() ||
                !member(files, "sha256", kNull).is_object()) {
                problems.push_back(owner + "/" + precision + ": needs 'onnx' (path) and 'sha256' (file -> hash)");
            }
        }
    }
    const Json &engines = member(entry, "engines", kEmptyObject);
    if (!engines.is_object() ||
        !std::all_of(engines.begin(), engines.end(), [](const Json &e) { return e.is_object(); })) {
        problems.push_back(name + ": 'engines' must map precisions to objects naming a 'file'");
    }
    return problems;
}

std::vector<std::string> top_level_problems(const Json &data) {
    static const std::array<std::pair<const char *, const char *>, 9> required = {{{"schema_version", "int"},
                                                                                   {"format", "str"},
                                                                                   {"name", "str"},
                                                                                   {"dims", "dict"},
                                                                                   {"networks", "dict"},
                                                                                   {"pipeline", "dict"},
                                                                                   {"tagger", "dict"},
                                                                                   {"text", "dict"},
                                                                                   {"provenance", "dict"}}};
    std::vector<std::string> problems;
    for (const auto &[key, type] : required) {
        if (!has_type(member(data, key, kNull), type)) {
            problems.push_back(std::string("missing or mistyped field '") + key + "' (expected " + type + ")");
        }
    }
    return problems;
}

bool is_absolute_anywhere(const std::string &rel) {
    // Absolute on POSIX or on Windows (a root, "C:", or "\\server"): a bundle made on either may be read on both.
    bool drive = rel.size() >= 2 && rel[1] == ':' && std::isalpha(static_cast<unsigned char>(rel[0]));
    return !rel.empty() && (rel[0] == '/' || rel[0] == '\\' || drive);
}

bool climbs(const std::string &rel) {
    fs::path normal = fs::path(rel).lexically_normal();
    return !normal.empty() && *normal.begin() == "..";
}

bool is_inside(const fs::path &base, const fs::path &target) {
    auto [base_end, target_at] = std::mismatch(base.begin(), base.end(), target.begin(), target.end());
    return base_end == base.end() && target_at != target.end();
}

}  // namespace

std::vector<std::string> manifest_problems(const Json &data) {
    if (!data.is_object()) return {"expected a JSON object, got " + python_type(data)};
    std::vector<std::string> problems = top_level_problems(data);
    if (!problems.empty()) return problems;
    if (data["format"] != kFormat) {
        problems.push_back("format is " + python_repr(data["format"]) + ", expected '" + kFormat + "'");
    }
    if (data["schema_version"] != kSchemaVersion) {
        problems.push_back("schema_version " + data["schema_version"].dump() + " is not " +
                           std::to_string(kSchemaVersion));
    }
    if (!member(data, "files", kEmptyObject).is_object()) problems.push_back("'files' must map paths to sha256 hashes");
    for (const auto &[name, entry] : data["networks"].items()) {
        auto found = network_problems(name, entry);
        problems.insert(problems.end(), found.begin(), found.end());
    }
    const Json &tagger = data["tagger"];
    const Json &tags = member(tagger, "tags", kEmptyArray);
    static const Json one_missing = Json::array({nullptr});
    const Json &thresholds = member(tagger, "thresholds", one_missing);
    if (!tags.is_array() || !thresholds.is_array()) {
        problems.push_back("tagger: tags and thresholds must be lists");
    } else if (tags.size() != thresholds.size()) {
        problems.push_back("tagger: tags and thresholds differ in length");
    }
    if (data["pipeline"].contains("options")) {
        auto found = option_description_problems(data["pipeline"]["options"]);
        problems.insert(problems.end(), found.begin(), found.end());
    }
    return problems;
}

fs::path bundle_path(const fs::path &root, const Json &rel, const std::string &what) {
    const std::string at = root.string() + ": " + what + " ";
    if (!rel.is_string() || rel.get<std::string>().empty() || rel.get<std::string>().find('\0') != std::string::npos) {
        throw bundle_error(at + python_repr(rel) + " is not a path (expected a path relative to the bundle)");
    }
    const std::string path = rel.get<std::string>();
    if (is_absolute_anywhere(path)) {
        throw bundle_error(at + python_repr(rel) +
                           " is an absolute path; a bundle names its files relative to its own directory");
    }
    std::error_code failed;
    fs::path base = fs::weakly_canonical(fs::absolute(root), failed);
    fs::path target = failed ? fs::path() : fs::weakly_canonical(base / path, failed);
    if (failed) throw bundle_error(at + python_repr(rel) + " cannot be resolved: " + failed.message());
    if (target == base) throw bundle_error(at + python_repr(rel) + " names the bundle directory itself, not a file in it");
    if (!is_inside(base, target)) {
        std::string how = climbs(path) ? "climbs out of the bundle" : "leads outside the bundle through a symbolic link";
        throw bundle_error(at + python_repr(rel) + " " + how + " (to " + target.string() +
                           "); bundle paths must stay inside the bundle");
    }
    return target;
}

std::vector<std::pair<std::string, Json>> named_paths(const Json &data) {
    std::vector<std::pair<std::string, Json>> named;
    for (const char *key : {"tokenizer", "negative_prompt_embeds"}) {
        named.emplace_back(std::string("text ") + key, member(data["text"], key, kNull));
    }
    for (const auto &[rel, hash] : member(data, "files", kEmptyObject).items()) named.emplace_back("file", rel);
    for (const auto &[name, entry] : data["networks"].items()) {
        for (const auto &[owner, holder] : holders(name, entry)) {
            for (const auto &[precision, files] : member(*holder, "files", kEmptyObject).items()) {
                const std::string label = owner + " " + precision;
                named.emplace_back(label + " graph", files["onnx"]);
                const Json &external = member(files, "external_data", kNull);
                if (!external.is_null()) named.emplace_back(label + " external data", external);
                for (const auto &[rel, hash] : files["sha256"].items()) named.emplace_back(label + " file", rel);
            }
        }
        for (const auto &[precision, engine] : member(entry, "engines", kEmptyObject).items()) {
            named.emplace_back(name + " " + precision + " TensorRT engine", member(engine, "file", kNull));
        }
    }
    return named;
}

Manifest Manifest::load(const fs::path &bundle) {
    const fs::path path = bundle / kManifestFile;
    std::error_code failed;
    if (!fs::is_regular_file(path, failed)) {
        throw bundle_error(bundle.string() + ": not a SeeSR bundle (no " + kManifestFile + ")");
    }
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) throw bundle_error(path.string() + ": cannot be read");
    Json data;
    try {
        data = Json::parse(text.str());
    } catch (const Json::exception &error) {
        throw bundle_error(path.string() + ": not valid JSON: " + error.what());
    }
    if (!data.is_object()) {
        throw bundle_error(path.string() + ": invalid manifest: expected a JSON object, got " + python_type(data));
    }
    auto problems = manifest_problems(data);
    if (!problems.empty()) {
        std::string message = path.string() + ": invalid manifest:";
        for (const auto &problem : problems) message += "\n  " + problem;
        throw bundle_error(message);
    }
    Manifest manifest(bundle, std::move(data));
    for (const auto &[what, rel] : named_paths(manifest.data_)) manifest.file(rel, what);
    return manifest;
}

const Json &Manifest::entry(const std::string &network) const {
    const auto hash = network.find('#');
    const std::string parent = network.substr(0, hash);
    const Json &networks = data_["networks"];
    auto found = networks.find(parent);
    if (found != networks.end() && hash == std::string::npos) return *found;
    if (found != networks.end()) {
        const std::string index = network.substr(hash + 1);
        const Json &segments = member(member(*found, "tiled", kEmptyObject), "segments", kEmptyArray);
        bool digits = !index.empty() && index.size() < 9 &&
                      std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; });
        if (digits && std::stoul(index) < segments.size()) return segments[std::stoul(index)];
    }
    throw bundle_error(root_.string() + ": the bundle has no network '" + network + "'");
}

namespace {

void check_external_data(const Manifest &manifest, const fs::path &graph, const Json &files, const std::string &what) {
    const std::string root = manifest.root().string(), onnx = python_repr(files["onnx"]);
    std::error_code failed;
    if (!fs::is_regular_file(graph, failed)) throw bundle_error(root + ": " + what + " " + onnx + " is missing");
    std::set<std::string> locations;
    try {
        locations = external_data_locations(graph);
    } catch (const NotProtobuf &error) {
        throw bundle_error(root + ": " + what + " " + onnx + " is not a readable ONNX file (" + error.what() + ")");
    } catch (const std::runtime_error &error) {
        throw bundle_error(root + ": " + what + " " + onnx + ": " + error.what());
    }
    std::set<fs::path> pinned;
    std::string pinned_names;
    for (const auto &[rel, hash] : files["sha256"].items()) {
        pinned.insert(manifest.file(rel));
        pinned_names += (pinned_names.empty() ? "" : ", ") + python_repr(rel);
    }
    const fs::path folder = graph.parent_path().lexically_relative(fs::weakly_canonical(fs::absolute(manifest.root())));
    for (const std::string &location : locations) {
        const std::string label = "external data " + python_repr(location) + " of graph " + onnx;
        if (is_absolute_anywhere(location)) {
            throw bundle_error(root + ": " + label +
                               " is an absolute path; external data must be named relative to the graph");
        }
        const fs::path target = manifest.file((folder / location).generic_string(), label + ", as bundle path");
        if (pinned.count(target) == 0) {
            throw bundle_error(root + ": " + label + " is not one of the graph's files in the manifest ([" +
                               pinned_names + "]), so nothing vouches for its contents");
        }
    }
}

}  // namespace

fs::path Manifest::graph_path(const std::string &network, const std::string &precision) const {
    const Json &files_by_precision = member(entry(network), "files", kEmptyObject);
    std::string chosen = precision;
    if (network.find('#') != std::string::npos && !files_by_precision.contains(chosen)) {
        chosen = "fp32";  // segments are fp32 only: they run once per image, at full precision
    }
    if (!files_by_precision.contains(chosen)) {
        std::string have;
        for (const auto &[name, item] : data_["networks"].items()) {
            std::string precisions;
            for (const auto &[p, files] : member(item, "files", kEmptyObject).items()) {
                precisions += (precisions.empty() ? "'" : ", '") + p + "'";
            }
            have += (have.empty() ? "'" : ", '") + name + "': [" + precisions + "]";
        }
        throw bundle_error(root_.string() + ": no " + chosen + " graph for '" + network + "' (bundle has {" + have + "})");
    }
    const Json &files = files_by_precision[chosen];
    const std::string what = network + " " + chosen + " graph";
    const fs::path graph = file(files["onnx"], what);
    check_external_data(*this, graph, files, what);
    return graph;
}

}  // namespace seesr
