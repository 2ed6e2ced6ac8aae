#include "tiled_vae.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

namespace seesr {
namespace {

// Python's floor-semantics integer operations, which the official tiler's arithmetic relies on.
std::int64_t python_mod(std::int64_t a, std::int64_t b) { return ((a % b) + b) % b; }
std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

struct Segment {
    bool takes_residual = false, hands_residual = false;
};

struct TiledEntry {
    std::int64_t pad = 0, groups = 0;
    std::vector<Segment> segments;
};

TiledEntry read_tiled(const Manifest &manifest, const std::string &network, std::int64_t width, std::int64_t height) {
    const Json &entry = manifest.data()["networks"].value(network, Json::object());
    const Json &tiled = entry.is_object() ? entry.value("tiled", Json()) : Json();
    if (!tiled.is_object()) {
        throw bundle_error(manifest.root().string() + ": this bundle has no tiled-VAE graphs for " + network +
                           ", which a " + std::to_string(width) + "x" + std::to_string(height) +
                           " input needs; rebuild it with this version of `seesr-export build`, or set the option "
                           "tiled_vae to false to run the VAE untiled");
    }
    TiledEntry read;
    try {
        read.pad = tiled.at("pad").get<std::int64_t>();
        read.groups = tiled.at("groups").get<std::int64_t>();
        for (const Json &segment : tiled.at("segments")) {
            read.segments.push_back({segment.at("takes_residual").get<bool>(), segment.at("hands_residual").get<bool>()});
        }
    } catch (const Json::exception &error) {
        throw bundle_error(manifest.root().string() + ": networks." + network + ".tiled in manifest.json is malformed (" +
                           error.what() + ")");
    }
    if (read.segments.empty() || read.groups < 1 || read.pad < 0) {
        throw bundle_error(manifest.root().string() + ": networks." + network + ".tiled in manifest.json has pad " +
                           std::to_string(read.pad) + ", groups " + std::to_string(read.groups) + " and " +
                           std::to_string(read.segments.size()) + " segments; expected pad >= 0, groups >= 1, a segment");
    }
    return read;
}

struct GroupStats {
    std::vector<double> mean, var;  // [B * groups]
};

// Per-sample, per-group mean and biased variance of one tile in float64 (the deviations in float32 from the
// float32-rounded mean, as tile_stats computes them).
GroupStats tile_stats(const Tensor &x, std::int64_t groups) {
    const std::int64_t batch = x.shape()[0];
    const std::size_t per_group = x.count() / static_cast<std::size_t>(batch * groups);
    GroupStats stats;
    for (std::int64_t g = 0; g < batch * groups; ++g) {
        const float *values = x.f32_data() + static_cast<std::size_t>(g) * per_group;
        double sum = 0.0;
        for (std::size_t i = 0; i < per_group; ++i) sum += values[i];
        const double mean = sum / static_cast<double>(per_group);
        const float mean32 = static_cast<float>(mean);
        double squares = 0.0;
        for (std::size_t i = 0; i < per_group; ++i) {
            const float deviation = values[i] - mean32;
            squares += static_cast<double>(deviation * deviation);
        }
        stats.mean.push_back(mean);
        stats.var.push_back(squares / static_cast<double>(per_group));
    }
    return stats;
}

// The tiles' statistics averaged, weighted by their pixel counts, as float32 [B, groups] feeds.
std::pair<Tensor, Tensor> shared_group_stats(const std::vector<GroupStats> &per_tile, const std::vector<std::int64_t> &pixels,
                                             std::int64_t batch, std::int64_t groups) {
    double total = 0.0;
    for (std::int64_t count : pixels) total += static_cast<double>(count);
    std::vector<double> mean(per_tile[0].mean.size(), 0.0), var(mean.size(), 0.0);
    for (std::size_t t = 0; t < per_tile.size(); ++t) {
        const double weight = static_cast<double>(pixels[t]) / total;
        for (std::size_t i = 0; i < mean.size(); ++i) {
            mean[i] += weight * per_tile[t].mean[i];
            var[i] += weight * per_tile[t].var[i];
        }
    }
    return {Tensor::f32({batch, groups}, std::vector<float>(mean.begin(), mean.end())),
            Tensor::f32({batch, groups}, std::vector<float>(var.begin(), var.end()))};
}

Tensor assemble_tiles(const std::vector<Tensor> &tiles, const std::vector<TileBox> &inputs,
                      const std::vector<TileBox> &outputs, const TiledVaeLayout &layout) {
    std::int64_t height = 0, width = 0;
    for (const TileBox &box : outputs) {
        height = std::max(height, box.y1);
        width = std::max(width, box.x1);
    }
    const Shape &first = tiles[0].shape();
    const std::int64_t planes = first[0] * first[1];
    std::vector<float> result(static_cast<std::size_t>(planes * height * width), 0.0f);
    for (std::size_t t = 0; t < tiles.size(); ++t) {
        const TileBox &in = inputs[t], &out = outputs[t];
        const std::int64_t top = out.y0 - layout.scale(in.y0), left = out.x0 - layout.scale(in.x0);
        const std::int64_t tile_h = tiles[t].shape()[2], tile_w = tiles[t].shape()[3];
        for (std::int64_t p = 0; p < planes; ++p) {
            for (std::int64_t y = out.y0; y < out.y1; ++y) {
                const float *row = tiles[t].f32_data() + (p * tile_h + top + y - out.y0) * tile_w + left;
                std::copy(row, row + (out.x1 - out.x0), result.begin() + (p * height + y) * width + out.x0);
            }
        }
    }
    return Tensor::f32({first[0], first[1], height, width}, std::move(result));
}

const char kSpillExpected[] =
    "expected an existing folder the tiled VAE can write its tile states in (or NULL to keep them in memory)";

// A failure writing or reading a spill file: a full disk (or a file-size limit) is the spill's out-of-memory;
// anything else means the folder given at open stopped serving (removed, remounted read-only, failing).
Failure spill_error(const std::string &action, const std::filesystem::path &file, int error) {
    const bool full = error == ENOSPC || error == EDQUOT || error == EFBIG;
    const seesr_status status = full ? SEESR_ERROR_OUT_OF_MEMORY : SEESR_ERROR_INVALID_ARGUMENT;
    return Failure(status, "cannot " + action + " the tiled VAE's tile state " + file.string() + ": " +
                               std::strerror(error));
}

class FileDescriptor {
public:
    explicit FileDescriptor(int fd) : fd_(fd) {}
    FileDescriptor(const FileDescriptor &) = delete;
    FileDescriptor &operator=(const FileDescriptor &) = delete;
    ~FileDescriptor() {
        if (fd_ >= 0) ::close(fd_);
    }
    int get() const { return fd_; }
    int release() { return std::exchange(fd_, -1); }

private:
    int fd_;
};

// `size` bytes of `data` into a new file (mode 0666 less the umask, as any file the user writes), or a failure
// and no file.
void write_file(const std::filesystem::path &file, const void *data, std::size_t size) {
    FileDescriptor fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
    if (fd.get() < 0) throw spill_error("write", file, errno);
    const char *bytes = static_cast<const char *>(data);
    int error = 0;
    while (size > 0 && error == 0) {
        const ssize_t written = ::write(fd.get(), bytes, size);
        if (written < 0 && errno != EINTR) error = errno;
        if (written > 0) bytes += written, size -= static_cast<std::size_t>(written);
    }
    if (::close(fd.release()) != 0 && error == 0) error = errno;  // a delayed write error (NFS, quotas) shows here
    if (error != 0) {
        ::unlink(file.c_str());
        throw spill_error("write", file, error);
    }
}

void read_file(const std::filesystem::path &file, void *data, std::size_t size) {
    FileDescriptor fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) throw spill_error("read", file, errno);
    char *bytes = static_cast<char *>(data);
    while (size > 0) {
        const ssize_t got = ::read(fd.get(), bytes, size);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) throw spill_error("read", file, errno);
        if (got == 0) throw spill_error("read", file, ENODATA);  // shortened since it was written
        bytes += got, size -= static_cast<std::size_t>(got);
    }
}

// The tensors each tile carries from one segment to the next (its hidden state, a residual), as
// seesr_runtime/tiled_vae.py's TileStates holds them: in memory, or each in a file of a private folder in the
// spill folder, read back when its tile runs, so resident memory stays near one tile's states whatever the
// image size. Replacing a state deletes its file; the folder goes with the object, however the upscale ends.
class TileStates {
public:
    enum Kind : std::size_t { hidden = 0, residual = 1 };

    TileStates(std::size_t tiles, const std::filesystem::path &spill_dir)
        : tiles_(tiles), slots_(2 * tiles), folder_(spill_dir.empty() ? spill_dir : make_spill_folder(spill_dir)) {}
    TileStates(const TileStates &) = delete;
    TileStates &operator=(const TileStates &) = delete;
    ~TileStates() {
        if (folder_.empty()) return;
        std::error_code ignored;  // nothing to report to from a destructor; the folder is ours alone
        std::filesystem::remove_all(folder_, ignored);
    }

    void put(Kind kind, std::size_t tile, std::optional<Tensor> state) {
        Slot &slot = slots_[kind * tiles_ + tile];
        if (!slot.file.empty()) ::unlink(slot.file.c_str());
        slot = Slot();
        if (!state || folder_.empty()) {
            slot.held = std::move(state);
            return;
        }
        const std::filesystem::path file = folder_ / (std::to_string(++writes_) + ".f32");
        write_file(file, state->f32_data(), state->count() * sizeof(float));
        slot.file = file;
        slot.shape = state->shape();
    }

    // The state, read back from its file when spilled; none when none was put.
    std::optional<Tensor> get(Kind kind, std::size_t tile) const {
        const Slot &slot = slots_[kind * tiles_ + tile];
        if (slot.file.empty()) return slot.held;
        std::vector<float> values(element_count(slot.shape));
        read_file(slot.file, values.data(), values.size() * sizeof(float));
        return Tensor::f32(slot.shape, std::move(values));
    }

private:
    struct Slot {
        std::optional<Tensor> held;  // in memory
        std::filesystem::path file;  // or spilled: raw float32 of `shape`
        Shape shape;
    };
    std::size_t tiles_;
    std::vector<Slot> slots_;  // [kind * tiles + tile]
    std::filesystem::path folder_;  // empty: in memory
    std::size_t writes_ = 0;
};

}  // namespace

std::filesystem::path make_spill_folder(const std::filesystem::path &spill_dir) {
    std::string name = (spill_dir / "seesr-tiles-XXXXXX").string();
    if (::mkdtemp(name.data()) != nullptr) return name;
    const int error = errno;
    const std::string quoted = "tiled_vae_spill_dir '" + spill_dir.string() + "'";
    std::string problem;
    if (error == ENOENT) {
        problem = quoted + " does not exist";
    } else if (error == ENOTDIR) {
        problem = quoted + " is not a folder";
    } else if (error == EACCES || error == EPERM || error == EROFS) {
        problem = quoted + " is not writable (" + std::strerror(error) + ")";
    } else {
        problem = "cannot make a folder in " + quoted + " (" + std::strerror(error) + ")";
    }
    throw Failure(SEESR_ERROR_INVALID_ARGUMENT, problem + "; " + kSpillExpected);
}

void check_spill_dir(const std::filesystem::path &spill_dir) {
    if (spill_dir.empty()) {
        throw Failure(SEESR_ERROR_INVALID_ARGUMENT, std::string("tiled_vae_spill_dir is \"\"; ") + kSpillExpected);
    }
    std::error_code ignored;  // an empty folder of ours: removing it cannot fail in a way worth refusing for
    std::filesystem::remove(make_spill_folder(spill_dir), ignored);
}

TiledVaeLayout TiledVaeLayout::for_network(const std::string &network) {
    if (network == "vae_encoder") return {32, false};
    if (network == "vae_decoder") return {11, true};
    throw Failure(SEESR_ERROR_INTERNAL, "no tiled-VAE layout for '" + network + "'");
}

std::int64_t best_tile_size(std::int64_t lower, std::int64_t upper) {
    for (std::int64_t divider = 32; divider >= 2; divider /= 2) {
        const std::int64_t remainder = python_mod(lower, divider);
        if (remainder == 0) return lower;
        if (lower - remainder + divider <= upper) return lower - remainder + divider;
    }
    return lower;
}

void split_tiles(std::int64_t height, std::int64_t width, std::int64_t tile, const TiledVaeLayout &layout,
                 std::vector<TileBox> &inputs, std::vector<TileBox> &outputs) {
    const std::int64_t pad = layout.pad;
    const std::int64_t rows = std::max<std::int64_t>(ceil_div(height - 2 * pad, tile), 1);
    const std::int64_t cols = std::max<std::int64_t>(ceil_div(width - 2 * pad, tile), 1);
    const std::int64_t tile_h = best_tile_size(ceil_div(height - 2 * pad, rows), tile);
    const std::int64_t tile_w = best_tile_size(ceil_div(width - 2 * pad, cols), tile);
    inputs.clear();
    outputs.clear();
    for (std::int64_t i = 0; i < rows; ++i) {
        for (std::int64_t j = 0; j < cols; ++j) {
            const std::int64_t x0 = pad + j * tile_w, x1 = std::min(pad + (j + 1) * tile_w, width);
            const std::int64_t y0 = pad + i * tile_h, y1 = std::min(pad + (i + 1) * tile_h, height);
            const TileBox core = {x0 > pad ? x0 : 0, x1 < width - pad ? x1 : width, y0 > pad ? y0 : 0,
                                  y1 < height - pad ? y1 : height};
            outputs.push_back({layout.scale(core.x0), layout.scale(core.x1), layout.scale(core.y0), layout.scale(core.y1)});
            inputs.push_back({std::max<std::int64_t>(0, x0 - pad), std::min(width, x1 + pad),
                              std::max<std::int64_t>(0, y0 - pad), std::min(height, y1 + pad)});
        }
    }
}

// The tiles of one shape (their indices in row order) through segment ``name``: their states in, their outputs
// back into the states (or into ``results``, by tile, after the last segment).
static void run_shape_group(Engine &engine, const Manifest &manifest, const std::string &name, const Segment &segment,
                     bool last, const std::vector<NamedTensor> &shared, const std::vector<std::size_t> &group,
                     TileStates &states, std::vector<std::vector<Tensor>> &results) {
    for (std::size_t t : group) {
        std::vector<NamedTensor> feeds = {{"hidden", *states.get(TileStates::hidden, t)}};
        feeds.insert(feeds.end(), shared.begin(), shared.end());
        if (segment.takes_residual) {
            std::optional<Tensor> residual = states.get(TileStates::residual, t);
            if (!residual) {
                throw bundle_error(manifest.root().string() + ": segment " + name +
                                   " takes a residual that no earlier segment hands on");
            }
            feeds.push_back({"residual", std::move(*residual)});
        }
        std::vector<Tensor> out = engine.run(name, feeds);
        feeds.clear();  // before the next state is written: resident memory stays near one tile's
        if (last) {
            states.put(TileStates::hidden, t, std::nullopt);
            states.put(TileStates::residual, t, std::nullopt);
            results[t] = std::move(out);
            continue;
        }
        states.put(TileStates::hidden, t, std::move(out.at(0)));
        states.put(TileStates::residual, t,
                   segment.hands_residual ? std::optional<Tensor>(std::move(out.at(1))) : std::nullopt);
    }
}

// The tile indices grouped by the shape of their input box, groups in order of first appearance.
static std::vector<std::vector<std::size_t>> tiles_by_shape(const std::vector<TileBox> &inputs) {
    std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
    std::vector<std::vector<std::size_t>> groups;
    for (std::size_t t = 0; t < inputs.size(); ++t) {
        const std::pair<std::int64_t, std::int64_t> shape = {inputs[t].x1 - inputs[t].x0, inputs[t].y1 - inputs[t].y0};
        const auto found = std::find(shapes.begin(), shapes.end(), shape);
        if (found == shapes.end()) {
            shapes.push_back(shape);
            groups.push_back({t});
        } else {
            groups[static_cast<std::size_t>(found - shapes.begin())].push_back(t);
        }
    }
    return groups;
}

std::vector<Tensor> run_tiled_vae(Engine &engine, const Manifest &manifest, const std::string &network, const Tensor &x,
                                  std::int64_t tile, const std::filesystem::path &spill_dir, SegmentDone done) {
    const std::int64_t batch = x.shape()[0], height = x.shape()[2], width = x.shape()[3];
    const TiledEntry tiled = read_tiled(manifest, network, width, height);
    const TiledVaeLayout layout = {tiled.pad, network == "vae_decoder"};
    std::vector<TileBox> inputs, outputs;
    split_tiles(height, width, tile, layout, inputs, outputs);

    TileStates states(inputs.size(), spill_dir);
    for (std::size_t t = 0; t < inputs.size(); ++t) {
        const TileBox &box = inputs[t];
        states.put(TileStates::hidden, t, crop(x, box.y0, box.y1, box.x0, box.x1));
    }
    const std::vector<std::vector<std::size_t>> by_shape = tiles_by_shape(inputs);
    std::vector<std::vector<Tensor>> results(inputs.size());
    for (std::size_t k = 0; k < tiled.segments.size(); ++k) {
        const Segment &segment = tiled.segments[k];
        const bool last = k + 1 == tiled.segments.size();
        std::vector<NamedTensor> shared;
        if (k > 0) {  // every tile waits here for the statistics of all (the first segment has no GroupNorm)
            std::vector<GroupStats> per_tile;
            std::vector<std::int64_t> pixels;
            for (std::size_t t = 0; t < inputs.size(); ++t) {  // one tile's state read at a time
                const Tensor state = *states.get(TileStates::hidden, t);
                per_tile.push_back(tile_stats(state, tiled.groups));
                pixels.push_back(state.shape()[2] * state.shape()[3]);
            }
            auto [mean, var] = shared_group_stats(per_tile, pixels, batch, tiled.groups);
            shared.push_back({"group_mean", std::move(mean)});
            shared.push_back({"group_var", std::move(var)});
        }
        const std::string name = network + "#" + std::to_string(k);
        // a shape at a time: staged, each shape frees its working memory before the next shape allocates its own
        for (const std::vector<std::size_t> &group : by_shape) {
            run_shape_group(engine, manifest, name, segment, last, shared, group, states, results);
            if (done == SegmentDone::release) engine.release_working_memory(name);
        }
        // every tile has run this segment: until the next image
        if (done == SegmentDone::release) {
            engine.release(name);
        } else {
            engine.release_working_memory(name);
        }
    }
    std::vector<Tensor> assembled;
    for (std::size_t j = 0; j < results[0].size(); ++j) {
        std::vector<Tensor> tiles;
        for (auto &outputs_of_tile : results) tiles.push_back(std::move(outputs_of_tile[j]));
        assembled.push_back(assemble_tiles(tiles, inputs, outputs, layout));
    }
    return assembled;
}

}  // namespace seesr
