#include "memory_plan.hpp"

#include "failure.hpp"
#include "memory_calibration_json.hpp"  // generated at configure time from seesr_runtime/memory_calibration.json
#include "python_text.hpp"
#include "tiled_vae.hpp"
#include "tiling.hpp"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <set>

namespace seesr {
namespace {

constexpr double kGB = 1e9;

// Python's int() of a float64: truncation toward zero.
std::int64_t truncated(double value) { return static_cast<std::int64_t>(value); }

std::string joined(const std::vector<std::string> &items, const std::string &separator) {
    std::string text;
    for (const std::string &item : items) text += (text.empty() ? "" : separator) + item;
    return text;
}

EngineMemory read_engine(const Json &entry) {
    EngineMemory engine;
    engine.base = entry.at("base").get<std::int64_t>();
    engine.held_per_graph_byte = entry.at("held_per_graph_byte").get<double>();
    engine.mapped = entry.at("mapped").get<bool>();
    engine.shapes_per_segment = entry.value("shapes_per_segment", std::int64_t{1});
    if (entry.contains("int8_linear_held_per_graph_byte")) {
        engine.int8_linear_held_per_graph_byte = entry["int8_linear_held_per_graph_byte"].get<double>();
    }
    if (entry.contains("unbudgeted_held_per_graph_byte")) {
        engine.unbudgeted_held_per_graph_byte = entry["unbudgeted_held_per_graph_byte"].get<double>();
    }
    engine.load_per_embedded_byte = entry.value("load_per_embedded_byte", 0.0);
    engine.load_per_external_byte = entry.value("load_per_external_byte", 0.0);
    for (const auto &[network, figures] : entry.at("activations").items()) {
        engine.activations[network] = {figures.at(0).get<double>(), figures.at(1).get<double>()};
    }
    if (entry.contains("tiled_segments")) {
        engine.tiled_segments.emplace();
        for (const auto &[half, figures] : entry["tiled_segments"].items()) {
            (*engine.tiled_segments)[half] = {figures.at(0).get<double>(), figures.at(1).get<double>()};
        }
    }
    return engine;
}

Calibration read_calibration() {
    const Json data = Json::parse(kMemoryCalibrationJson);
    Calibration read;
    read.graph_bytes = data.at("calibration_graph_bytes").get<std::map<std::string, std::int64_t>>();
    for (const auto &[name, entry] : data.at("engines").items()) read.engines[name] = read_engine(entry);
    read.stages = data.at("stages").get<std::vector<std::string>>();
    read.stage_networks = data.at("stage_networks").get<std::map<std::string, std::vector<std::string>>>();
    read.decoder_tiles = data.at("decoder_tiles").get<std::vector<std::int64_t>>();
    read.encoder_tiles = data.at("encoder_tiles").get<std::vector<std::int64_t>>();
    read.latent_tiles = data.at("latent_tiles").get<std::vector<std::int64_t>>();
    read.vae_state_bytes_per_pixel = data.at("vae_state_bytes_per_pixel").get<std::int64_t>();
    return read;
}

// imaging.working_size: the working image's size for an LR image, without the image.
std::pair<std::int64_t, std::int64_t> working_size(std::int64_t width, std::int64_t height, std::int64_t process_size,
                                                   std::int64_t upscale) {
    const std::int64_t short_side = process_size / upscale;
    if (width < short_side || height < short_side) {
        const double scale = static_cast<double>(short_side) / static_cast<double>(std::min(width, height));
        width = truncated(scale * static_cast<double>(width));
        height = truncated(scale * static_cast<double>(height));
    }
    return {width * upscale / 8 * 8, height * upscale / 8 * 8};
}

// imaging.latent_windows: (height, width, count) of the windows the denoiser runs on per step.
struct Windows {
    std::int64_t height, width, count;
};
Windows latent_windows(std::int64_t height, std::int64_t width, std::int64_t tile, std::int64_t overlap) {
    if (height * width <= tile * tile) return {height, width, 1};
    const std::int64_t side = std::min({tile, height, width});
    return {side, side, static_cast<std::int64_t>(tile_origins(height, width, side, overlap).size())};
}

double width_scale(const std::string &network, std::int64_t weight_bytes) {
    return std::sqrt(static_cast<double>(weight_bytes) /
                     static_cast<double>(calibration().graph_bytes.at(network)));
}

// A budget to give, rounded up to 10 MB: "3.81GB".
std::string round_up(std::int64_t size) {
    char text[64];
    std::snprintf(text, sizeof text, "%.2fGB", std::ceil(static_cast<double>(size) / (kGB / 100)) / 100);
    return text;
}

struct Sizes {
    const NetworkBytes &bytes;
    const EngineMemory &engine;
    const std::set<std::string> &prepared;

    std::int64_t weights(const std::string &network) const { return bytes.weights.at(network); }
    // What loading `network` needs for a moment (0 once prepared).
    std::int64_t loading(const std::string &network) const {
        if (prepared.count(network)) return 0;
        const auto found = bytes.embedded.find(network);
        const std::int64_t embedded = found == bytes.embedded.end() ? 0 : found->second;
        const std::int64_t external = weights(network) - embedded;
        return truncated(engine.load_per_embedded_byte * static_cast<double>(embedded) +
                         engine.load_per_external_byte * static_cast<double>(external));
    }
};

struct VaeStage {
    std::int64_t held, working;
    std::string detail;
};

// (held weights, working memory, detail) of a VAE half on the working image, tiled as the pipeline would; staged,
// one segment is loaded at a time.
VaeStage vae_stage(const std::string &half, const Workload &w, const Sizes &sizes, std::int64_t held, bool staged,
                   bool spill) {
    const EngineMemory &engine = sizes.engine;
    const TiledVaeLayout layout = TiledVaeLayout::for_network(half);
    const bool encoder = half == "vae_encoder";
    const std::int64_t latent_h = w.height / 8, latent_w = w.width / 8;
    const std::int64_t in_h = encoder ? w.height : latent_h, in_w = encoder ? w.width : latent_w;
    const std::int64_t tile = encoder ? w.vae_encoder_tile_size : w.vae_decoder_tile_size;
    const Activation &activation = engine.activations.at(half);
    const double scale = width_scale(half, sizes.weights(half));
    if (!w.tiled_vae || !layout.needs_tiling(in_h, in_w, tile)) {
        return {held, activation.bytes(1, w.width * w.height, latent_h * latent_w, scale), "untiled"};
    }
    std::vector<TileBox> inputs, outputs;
    split_tiles(in_h, in_w, tile, layout, inputs, outputs);
    const std::int64_t per_pixel = encoder ? 1 : 64;  // image pixels per pixel of the half's input
    std::set<std::pair<std::int64_t, std::int64_t>> shapes;
    for (const TileBox &box : inputs) shapes.insert({box.x1 - box.x0, box.y1 - box.y0});
    std::vector<std::int64_t> shape_pixels;
    for (const auto &[width, height] : shapes) shape_pixels.push_back(width * height * per_pixel);
    const std::int64_t tile_pixels = *std::max_element(shape_pixels.begin(), shape_pixels.end());
    const std::int64_t working = engine.tiled_segments ? engine.tiled_segments->at(half).bytes(shape_pixels, scale, staged)
                                                       : activation.bytes(1, tile_pixels, tile_pixels / 64, scale);
    const std::int64_t states =
        spill ? 0
              : truncated(static_cast<double>(calibration().vae_state_bytes_per_pixel * w.width * w.height) * scale);
    const auto segment = sizes.bytes.segments.find(half);
    const std::int64_t segment_bytes =
        staged && segment != sizes.bytes.segments.end() ? segment->second : sizes.weights(half);
    const std::int64_t segment_held =
        truncated(static_cast<double>(engine.shapes_per_segment * segment_bytes) * engine.held_per_graph_byte);
    std::string detail = std::to_string(inputs.size()) + " tiles of up to " + std::to_string(tile_pixels) + " px in " +
                         std::to_string(shape_pixels.size()) + " shapes";
    if (spill) detail += ", waiting tiles spilled";
    return {segment_held, working + states, detail};
}

StagePlan stage_plan(const std::string &name, const Workload &w, const Sizes &sizes, bool staged, bool spill,
                     std::int64_t kept, bool int8 = false) {
    const EngineMemory &engine = sizes.engine;
    const std::vector<std::string> &networks = calibration().stage_networks.at(name);
    const std::int64_t pixels = w.width * w.height;
    const std::int64_t image_arrays = 4 * 3 * pixels * (w.batch + 2);  // the control image (batched), work, output
    std::optional<double> per_byte = int8 ? engine.int8_linear_held_per_graph_byte : std::nullopt;
    if (!staged) per_byte = engine.unbudgeted_held_per_graph_byte;
    const double held_per_byte = per_byte && *per_byte != 0.0 ? *per_byte : engine.held_per_graph_byte;
    std::vector<std::int64_t> each;
    for (const std::string &n : networks) each.push_back(truncated(static_cast<double>(sizes.weights(n)) * held_per_byte));
    std::int64_t held = 0;
    for (std::int64_t bytes : each) held += bytes;
    // networks load in turn: the earlier ones held while the next one loads
    std::int64_t loading = 0, before = 0;
    for (std::size_t i = 0; i < networks.size(); ++i) {
        loading = std::max(loading, before + std::max(each[i], sizes.loading(networks[i])));
        before += each[i];
    }
    StagePlan plan;
    plan.name = name;
    plan.networks = networks;
    if (name == "tag" || name == "prompt") {
        const std::string &n = networks.at(0);
        plan.activations = engine.activations.at(n).bytes(1, 1, 0, width_scale(n, sizes.weights(n)));
    } else if (name == "denoise") {
        const Windows windows = latent_windows(w.height / 8, w.width / 8, w.latent_tile_size, w.latent_tile_overlap);
        const std::int64_t window_pixels = windows.height * windows.width;
        plan.activations = image_arrays;
        for (const std::string &n : networks) {
            plan.activations +=
                engine.activations.at(n).bytes(w.batch, window_pixels, window_pixels, width_scale(n, sizes.weights(n)));
        }
        const std::string shape = std::to_string(windows.height) + "x" + std::to_string(windows.width) + " latent";
        plan.detail = "batch " + std::to_string(w.batch) + ", " +
                      (windows.count > 1 ? std::to_string(windows.count) + " tiles of " + shape : shape);
        if (int8) plan.detail += ", int8 linear weights";
    } else {
        VaeStage vae = vae_stage(networks.at(0), w, sizes, held, staged, spill);
        held = vae.held;
        plan.activations = vae.working + image_arrays;
        plan.detail = std::move(vae.detail);
    }
    plan.weights = held;
    plan.kept = kept;
    plan.loading = loading;
    plan.peak = engine.base + kept + std::max(held + plan.activations, loading);
    return plan;
}

struct Lever {
    Workload workload;
    bool spill, int8;
};

// A stage's choices in the order they are tried (memory_plan._levers).
std::vector<Lever> levers(const std::string &stage, const Workload &w, const EngineMemory &engine) {
    const Calibration &c = calibration();
    std::vector<Lever> choices = {{w, false, false}};
    if (stage == "denoise") {
        const bool int8 = engine.int8_linear_held_per_graph_byte.has_value();
        choices.push_back({w, false, int8});
        for (std::int64_t t : c.latent_tiles) {
            if (w.latent_tile_overlap < t && t < w.latent_tile_size) {
                Workload smaller = w;
                smaller.latent_tile_size = t;
                choices.push_back({smaller, false, int8});
            }
        }
    } else if (stage == "encode" || stage == "decode") {
        const bool encode = stage == "encode";
        choices.push_back({w, true, false});
        for (std::int64_t t : encode ? c.encoder_tiles : c.decoder_tiles) {
            if (t < (encode ? w.vae_encoder_tile_size : w.vae_decoder_tile_size)) {
                Workload smaller = w;
                (encode ? smaller.vae_encoder_tile_size : smaller.vae_decoder_tile_size) = t;
                choices.push_back({smaller, true, false});
            }
        }
    }
    return choices;
}

std::vector<std::string> changes(const Workload &before, const Workload &after) {
    std::vector<std::string> changed;
    const auto note = [&](const char *name, std::int64_t from, std::int64_t to) {
        if (from != to) changed.push_back(std::string(name) + " " + std::to_string(from) + " -> " + std::to_string(to));
    };
    note("latent_tile_size", before.latent_tile_size, after.latent_tile_size);
    note("vae_encoder_tile_size", before.vae_encoder_tile_size, after.vae_encoder_tile_size);
    note("vae_decoder_tile_size", before.vae_decoder_tile_size, after.vae_decoder_tile_size);
    return changed;
}

Failure no_plan_fits(std::int64_t budget, const std::vector<StagePlan> &chosen, const EngineMemory &engine,
                     const std::string &engine_name, const Workload &w) {
    std::int64_t smallest = 0;
    const StagePlan *worst = nullptr;
    for (const StagePlan &stage : chosen) {
        smallest = std::max(smallest, stage.peak);
        if (stage.peak > budget && (worst == nullptr || stage.peak > worst->peak)) worst = &stage;
    }
    const bool loading = worst->loading > worst->weights + worst->activations;
    const std::string hint =
        loading ? "; loading reads the weights embedded in its graph files twice: a bundle built with external data "
                  "(this version of seesr-export build), or OpenVINO's IR prepared once in --cache-dir, avoids it"
                : "";
    return option_error("memory_budget " + format_bytes(static_cast<double>(budget)) +
                        " is below the smallest plan for this bundle on " + engine_name + " at " +
                        std::to_string(w.width) + "x" + std::to_string(w.height) + " px: it needs at least " +
                        round_up(smallest) + " (its largest stage, " + worst->name + ": " + joined(worst->networks, "+") +
                        " (" + (worst->detail.empty() ? "as asked" : worst->detail) + "), weights " +
                        format_bytes(static_cast<double>(worst->weights)) + ", working " +
                        format_bytes(static_cast<double>(worst->activations)) + ", loading " +
                        format_bytes(static_cast<double>(worst->loading)) + ", plus " +
                        format_bytes(static_cast<double>(engine.base)) + " for the process" + hint +
                        "); raise the budget, or upscale a smaller image");
}

std::int64_t file_size(const Manifest &manifest, const Json &rel) {
    std::error_code error;
    const auto size = std::filesystem::file_size(manifest.file(rel), error);
    if (error) throw bundle_error(manifest.root().string() + ": cannot read the size of " + rel.dump() + ": " + error.message());
    return static_cast<std::int64_t>(size);
}

}  // namespace

std::int64_t Activation::bytes(std::int64_t batch, std::int64_t pixels, std::int64_t latent_pixels, double scale) const {
    const double squared = static_cast<double>(latent_pixels * latent_pixels);
    return truncated(static_cast<double>(batch) *
                     (per_pixel * static_cast<double>(pixels) * scale + per_pixel_squared * squared));
}

// Staged, the pipeline runs a segment's tiles a shape at a time and frees each shape's working memory before the
// next: only the largest counts.
std::int64_t TiledSegmentMemory::bytes(const std::vector<std::int64_t> &shape_pixels, double scale, bool staged) const {
    const std::int64_t largest = *std::max_element(shape_pixels.begin(), shape_pixels.end());
    std::int64_t total = 0;
    for (std::int64_t pixels : shape_pixels) total += pixels;
    const double others = staged ? 0.0 : held * static_cast<double>(total - largest);
    return truncated(scale * (running * static_cast<double>(largest) + others));
}

const Calibration &calibration() {
    static const Calibration parsed = read_calibration();
    return parsed;
}

Workload Workload::of(std::int64_t lr_width, std::int64_t lr_height, const UpscaleOptions &o) {
    Workload w;
    std::tie(w.width, w.height) = working_size(lr_width, lr_height, o.process_size, o.upscale);
    w.batch = o.guidance > 1.0 ? 2 : 1;
    w.encode = o.start_point == "lr";
    w.tiled_vae = o.tiled_vae;
    w.latent_tile_size = o.latent_tile_size;
    w.latent_tile_overlap = o.latent_tile_overlap;
    w.vae_encoder_tile_size = o.vae_encoder_tile_size;
    w.vae_decoder_tile_size = o.vae_decoder_tile_size;
    return w;
}

std::int64_t MemoryPlan::peak() const {
    std::int64_t most = 0;
    for (const StagePlan &stage : stages) most = std::max(most, stage.peak);
    return most;
}

bool MemoryPlan::spills(const std::string &half) const {
    return std::find(spill.begin(), spill.end(), half) != spill.end();
}

bool MemoryPlan::int8(const std::string &network) const {
    return std::find(int8_linear.begin(), int8_linear.end(), network) != int8_linear.end();
}

const StagePlan *MemoryPlan::stage(const std::string &name) const {
    for (const StagePlan &stage : stages) {
        if (stage.name == name) return &stage;
    }
    return nullptr;
}

Json MemoryPlan::to_json() const {
    Json out_stages = Json::array();
    for (const StagePlan &s : stages) {
        out_stages.push_back({{"name", s.name},
                              {"networks", s.networks},
                              {"weights", s.weights},
                              {"activations", s.activations},
                              {"kept", s.kept},
                              {"peak", s.peak},
                              {"loading", s.loading},
                              {"detail", s.detail}});
    }
    return {{"budget", budget ? Json(*budget) : Json()},
            {"engine", engine},
            {"staged", staged},
            {"latent_tile_size", latent_tile_size},
            {"vae_encoder_tile_size", vae_encoder_tile_size},
            {"vae_decoder_tile_size", vae_decoder_tile_size},
            {"spill", spill},
            {"int8_linear", int8_linear},
            {"stages", out_stages},
            {"changed", changed},
            {"peak", peak()}};
}

NetworkBytes network_bytes(const Manifest &manifest, const std::map<std::string, std::string> &precision_of) {
    const auto sizes_of = [&](const std::string &network, const std::string &precision) {
        const Json &files = manifest.entry(network).at("files");
        const Json &chosen = files.contains(precision) ? files[precision] : files.at("fp32");
        std::int64_t total = 0;
        for (const auto &[rel, sha] : chosen.at("sha256").items()) total += file_size(manifest, Json(rel));
        return std::make_pair(total, file_size(manifest, chosen.at("onnx")));
    };
    NetworkBytes bytes;
    for (const auto &[network, precision] : precision_of) {
        std::tie(bytes.weights[network], bytes.embedded[network]) = sizes_of(network, precision);
    }
    for (const std::string half : {"vae_encoder", "vae_decoder"}) {
        const Json &entry = manifest.data().at("networks").value(half, Json::object());
        if (!entry.contains("tiled")) continue;
        const std::size_t count = entry["tiled"].at("segments").size();
        std::int64_t largest = 0;
        for (std::size_t k = 0; k < count; ++k) {
            largest = std::max(largest, sizes_of(half + "#" + std::to_string(k), "fp32").first);
        }
        bytes.segments[half] = largest;
    }
    return bytes;
}

const EngineMemory *engine_memory(const std::string &engine, const std::string &arithmetic) {
    const auto found = calibration().engines.find(engine + " " + arithmetic);
    return found == calibration().engines.end() ? nullptr : &found->second;
}

MemoryPlan plan_memory(const Workload &workload, const NetworkBytes &bytes, const EngineMemory &engine,
                       const std::string &engine_name, std::optional<std::int64_t> budget,
                       const std::set<std::string> &prepared) {
    const Sizes sizes{bytes, engine, prepared};
    std::vector<std::string> names;
    for (const std::string &stage : calibration().stages) {
        if (stage != "encode" || workload.encode) names.push_back(stage);
    }
    MemoryPlan plan;
    plan.budget = budget;
    plan.engine = engine_name;
    if (!budget) {
        std::int64_t kept = 0;
        for (const std::string &name : names) {
            plan.stages.push_back(stage_plan(name, workload, sizes, false, false, kept));
            kept += plan.stages.back().weights;
        }
        plan.latent_tile_size = workload.latent_tile_size;
        plan.vae_encoder_tile_size = workload.vae_encoder_tile_size;
        plan.vae_decoder_tile_size = workload.vae_decoder_tile_size;
        return plan;
    }
    // Staged: each stage on its own, with its own levers, the first choice that fits (else the smallest).
    std::vector<std::pair<StagePlan, Lever>> chosen;
    for (const std::string &name : names) {
        std::optional<std::pair<StagePlan, Lever>> fitting, smallest;
        for (const Lever &lever : levers(name, workload, engine)) {
            StagePlan option = stage_plan(name, lever.workload, sizes, true, lever.spill, 0, lever.int8);
            if (!smallest || option.peak < smallest->first.peak) smallest = std::make_pair(option, lever);
            if (option.peak <= *budget) {
                fitting = std::make_pair(std::move(option), lever);
                break;
            }
        }
        chosen.push_back(fitting ? *fitting : *smallest);
    }
    std::vector<StagePlan> stages;
    for (const auto &option : chosen) stages.push_back(option.first);
    for (const StagePlan &stage : stages) {
        if (stage.peak > *budget) throw no_plan_fits(*budget, stages, engine, engine_name, workload);
    }
    Workload final = workload;
    for (std::size_t i = 0; i < names.size(); ++i) {
        const Workload &w = chosen[i].second.workload;
        if (names[i] == "denoise") final.latent_tile_size = w.latent_tile_size;
        if (names[i] == "encode") final.vae_encoder_tile_size = w.vae_encoder_tile_size;
        if (names[i] == "decode") final.vae_decoder_tile_size = w.vae_decoder_tile_size;
        if (chosen[i].second.spill) plan.spill.push_back(calibration().stage_networks.at(names[i]).at(0));
        if (chosen[i].second.int8) {
            for (const std::string &n : calibration().stage_networks.at(names[i])) plan.int8_linear.push_back(n);
        }
    }
    plan.staged = true;
    plan.latent_tile_size = final.latent_tile_size;
    plan.vae_encoder_tile_size = final.vae_encoder_tile_size;
    plan.vae_decoder_tile_size = final.vae_decoder_tile_size;
    plan.stages = std::move(stages);
    plan.changed = changes(workload, final);
    if (!plan.int8_linear.empty()) plan.changed.push_back("int8 weights in the linear layers of " + joined(plan.int8_linear, ", "));
    return plan;
}

std::string format_bytes(double size) {
    static const std::pair<const char *, double> units[] = {{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"kB", 1e3}};
    char text[64];
    for (const auto &[unit, scale] : units) {
        if (size >= scale) {
            std::snprintf(text, sizeof text, "%.3g %s", size / scale, unit);
            return text;
        }
    }
    return std::to_string(truncated(size)) + " B";
}

std::int64_t parse_byte_size(const std::string &name, const std::string &text) {
    const auto refuse = [&] {
        return option_error(name + " must be a positive size: a whole number of bytes, or a number with a unit, as "
                                   "'4GB', '2500MB', '4GiB', '3.5GB' (B, KB, MB, GB, TB: powers of 1000; KiB, MiB, "
                                   "GiB, TiB: powers of 1024), got " + python_repr(text));
    };
    static const std::map<std::string, std::int64_t> units = {
        {"", 1},  {"b", 1},          {"kb", 1000},       {"mb", 1000000},    {"gb", 1000000000}, {"tb", 1000000000000},
        {"kib", 1024}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", std::int64_t{1} << 40}};
    std::size_t at = 0;
    const auto skip_space = [&] {
        while (at < text.size() && std::isspace(static_cast<unsigned char>(text[at]))) ++at;
    };
    const auto digits = [&] {
        const std::size_t start = at;
        while (at < text.size() && std::isdigit(static_cast<unsigned char>(text[at]))) ++at;
        return text.substr(start, at - start);
    };
    skip_space();
    const std::string whole = digits();
    std::string fraction;
    if (at < text.size() && text[at] == '.') {
        ++at;
        fraction = digits();
        if (fraction.empty()) throw refuse();
    }
    const bool has_point = !fraction.empty();
    skip_space();
    std::string unit;
    while (at < text.size() && std::isalpha(static_cast<unsigned char>(text[at]))) {
        unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[at++])));
    }
    skip_space();
    const auto scale = units.find(unit);
    if (whole.empty() || at != text.size() || scale == units.end() || (has_point && scale->second == 1)) throw refuse();
    // whole * scale + fraction * scale // 10^len(fraction), refusing what an int64 cannot hold
    if (whole.size() > 18 || fraction.size() > 18) throw refuse();
    std::uint64_t places = 1, whole_bytes = 0, fraction_bytes = 0, value = 0;
    for (std::size_t i = 0; i < fraction.size(); ++i) places *= 10;
    const auto unit_bytes = static_cast<std::uint64_t>(scale->second);
    if (__builtin_mul_overflow(std::stoull(whole), unit_bytes, &whole_bytes) ||
        (!fraction.empty() && __builtin_mul_overflow(std::stoull(fraction), unit_bytes, &fraction_bytes)) ||
        __builtin_add_overflow(whole_bytes, fraction_bytes / places, &value)) {
        throw refuse();  // beyond what a uint64 holds
    }
    if (value < 1 || value > static_cast<std::uint64_t>(INT64_MAX)) throw refuse();
    return static_cast<std::int64_t>(value);
}

}  // namespace seesr
