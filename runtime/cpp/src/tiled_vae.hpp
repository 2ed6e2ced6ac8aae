// SeeSR's tiled VAE as seesr_runtime/tiled_vae.py runs it: padded tiles, GroupNorm statistics shared across
// tiles between segment graphs (the bundle's "vae_encoder#k" / "vae_decoder#k"), each tile's core copied
// into the output, nothing blended. The tiles' states waiting between segments stay in memory, or in files of a
// spill folder (TileStates there).
#pragma once

#include "engine.hpp"
#include "manifest.hpp"
#include "tensor.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace seesr {

struct TiledVaeLayout {
    std::int64_t pad;  // context read around each tile, in input pixels
    bool decoder;      // decoder: output = 8x input; encoder: output = input // 8

    static TiledVaeLayout for_network(const std::string &network);  // "vae_encoder" or "vae_decoder"
    std::int64_t scale(std::int64_t value) const { return decoder ? value * 8 : value / 8; }
    // The official rule: tile only when the longer side exceeds tile + 2 * pad.
    bool needs_tiling(std::int64_t height, std::int64_t width, std::int64_t tile) const {
        return std::max(height, width) > tile + 2 * pad;
    }
};

struct TileBox {
    std::int64_t x0, x1, y0, y1;
};

// `lower` rounded up to a multiple of 32, 16, 8, 4 or 2, the largest that stays <= `upper`.
std::int64_t best_tile_size(std::int64_t lower, std::int64_t upper);

// Input boxes (with context) and output boxes of every tile, row by row (split_tiles).
void split_tiles(std::int64_t height, std::int64_t width, std::int64_t tile, const TiledVaeLayout &layout,
                 std::vector<TileBox> &inputs, std::vector<TileBox> &outputs);

// A fresh private folder (mkdtemp's, "seesr-tiles-XXXXXX") in `spill_dir` for one upscale's tile states; an
// invalid-argument failure naming `spill_dir` when it does not exist, is not a folder or is not writable.
std::filesystem::path make_spill_folder(const std::filesystem::path &spill_dir);

// Refuse (as make_spill_folder does) a spill folder the tiled VAE could not write in, leaving nothing there.
void check_spill_dir(const std::filesystem::path &spill_dir);

// What becomes of a segment's compiled models once every tile has run it: their working memory freed (kept
// compiled for the next image), or the models themselves released (a staged memory plan: one segment loaded at
// a time).
enum class SegmentDone { release_working_memory, release };

// The tiled VAE half `network` on `x` [B, C, H, W] through `engine`: its outputs ([mean, logvar] or [image]).
// A bundle error when the manifest has no segment graphs for it. `spill_dir` empty: the tile states waiting
// between segments stay in memory; else they wait in files of a private folder made there for this call and
// removed before it returns, however it ends.
std::vector<Tensor> run_tiled_vae(Engine &engine, const Manifest &manifest, const std::string &network, const Tensor &x,
                                  std::int64_t tile, const std::filesystem::path &spill_dir,
                                  SegmentDone done = SegmentDone::release_working_memory);

}  // namespace seesr
