// The memory plan of one upscale under a budget, as seesr_runtime/memory_plan.py plans it: which networks are
// resident at each stage, the estimated peak, the tiles, the tiled VAE's spill and int8 linear weights, with the
// same arithmetic (Python's float64 products truncated by int()) and the same calibration, which this build
// embeds from seesr_runtime/memory_calibration.json (one file for both runtimes). Pure: sizes come in as numbers.
#pragma once

#include "manifest.hpp"
#include "option_table.hpp"

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace seesr {

// Working memory of one network call (memory_plan.Activation).
struct Activation {
    double per_pixel = 0.0, per_pixel_squared = 0.0;
    std::int64_t bytes(std::int64_t batch, std::int64_t pixels, std::int64_t latent_pixels, double scale) const;
};

// Working memory of a tiled-VAE segment per image pixel of a tile shape (memory_plan.TiledSegmentMemory): the
// shape running a tile, and each other shape of the segment holding its working memory meanwhile.
struct TiledSegmentMemory {
    double running = 0.0, held = 0.0;
    std::int64_t bytes(const std::vector<std::int64_t> &shape_pixels, double scale, bool staged) const;
};

// How one engine configuration spends memory (memory_plan.EngineMemory).
struct EngineMemory {
    std::int64_t base = 0;
    double held_per_graph_byte = 1.0;
    std::map<std::string, Activation> activations;
    bool mapped = false;
    std::int64_t shapes_per_segment = 1;
    std::optional<double> int8_linear_held_per_graph_byte;
    double load_per_embedded_byte = 0.0, load_per_external_byte = 0.0;
    std::optional<double> unbudgeted_held_per_graph_byte;
    std::optional<std::map<std::string, TiledSegmentMemory>> tiled_segments;  // per VAE half; none: as untiled
};

// The embedded memory_calibration.json, parsed once.
struct Calibration {
    std::map<std::string, std::int64_t> graph_bytes;  // per network, of the bundle the figures were measured on
    std::map<std::string, EngineMemory> engines;      // "openvino bf16", "openvino fp32", "onnxruntime fp32"
    std::vector<std::string> stages;
    std::map<std::string, std::vector<std::string>> stage_networks;
    std::vector<std::int64_t> decoder_tiles, encoder_tiles, latent_tiles;
    std::int64_t vae_state_bytes_per_pixel = 0;
};
const Calibration &calibration();

// What one upscale computes, in the sizes memory depends on (memory_plan.Workload).
struct Workload {
    std::int64_t width = 0, height = 0, batch = 1;  // working image; 2 with guidance
    bool encode = true, tiled_vae = true;
    std::int64_t latent_tile_size = 0, latent_tile_overlap = 0, vae_encoder_tile_size = 0, vae_decoder_tile_size = 0;

    static Workload of(std::int64_t lr_width, std::int64_t lr_height, const UpscaleOptions &o);
};

struct StagePlan {
    std::string name;
    std::vector<std::string> networks;
    std::int64_t weights = 0, activations = 0, kept = 0, peak = 0, loading = 0;
    std::string detail;
};

struct MemoryPlan {
    std::optional<std::int64_t> budget;
    std::string engine;  // "openvino bf16"
    bool staged = false;
    std::int64_t latent_tile_size = 0, vae_encoder_tile_size = 0, vae_decoder_tile_size = 0;
    std::vector<std::string> spill, int8_linear;
    std::vector<StagePlan> stages;
    std::vector<std::string> changed;

    std::int64_t peak() const;
    bool spills(const std::string &half) const;
    bool int8(const std::string &network) const;
    const StagePlan *stage(const std::string &name) const;  // null: a stage this upscale skips
    Json to_json() const;  // MemoryPlan.to_json's keys and values
};

// The graph bytes of each network as an engine runs it (graph file and external data), the part embedded in the
// graph file, and each VAE half's largest tiled-VAE segment (memory_plan.graph_sizes, pipeline._graph_bytes).
struct NetworkBytes {
    std::map<std::string, std::int64_t> weights, embedded, segments;
};
// `precision_of`: network -> which of the bundle's graphs the engine runs for it (segments run fp32).
NetworkBytes network_bytes(const Manifest &manifest, const std::map<std::string, std::string> &precision_of);

// The engine calibration of an engine and the precision it computes in ("openvino", "bf16"): null when not measured.
const EngineMemory *engine_memory(const std::string &engine, const std::string &arithmetic);

// The plan for `workload` under `budget` (none: everything resident, the plan only describes it); an option
// error naming the smallest budget that would do where none fits (memory_plan.plan_memory).
MemoryPlan plan_memory(const Workload &workload, const NetworkBytes &bytes, const EngineMemory &engine,
                       const std::string &engine_name, std::optional<std::int64_t> budget,
                       const std::set<std::string> &prepared = {});

// "4GB", "2500MB", "4GiB", "3.5 GB", "4000000000" in bytes, as options.parse_byte_size reads them; an option
// error naming `name`, the text and the accepted forms otherwise.
std::int64_t parse_byte_size(const std::string &name, const std::string &text);
// A short decimal figure: "3.71 GB", "512 MB" (options.format_bytes).
std::string format_bytes(double size);

}  // namespace seesr
