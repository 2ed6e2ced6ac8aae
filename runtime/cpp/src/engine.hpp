// What the pipeline needs of an inference engine: run one network of the bundle on named host tensors and
// return its outputs in the manifest's order. Each engine is one source file defining a factory listed in
// engine.cpp (OpenVINO now; an onnxruntime or TensorRT engine would be one more file and one line there).
#pragma once

#include "manifest.hpp"
#include "tensor.hpp"

#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace seesr {

struct EngineSettings {
    std::string device = "CPU";
    std::string precision = "fp32";
    int threads = 0;        // 0: the engine's choice
    std::string cache_dir;  // empty: no cache
    // Compile from prepared IR whose weights the engine maps from the file (what a memory budget asks for): the
    // source weights are then clean page cache the kernel can drop, not a copy in memory (the Python backend's
    // map_weights). The IR goes to cache_dir, or to a private temporary folder removed with the engine.
    bool map_weights = false;
};

// One network held at fixed input shapes by one thread for many runs (the ControlNet and UNet of one sampling
// loop): it keeps one inference request of the engine's pool for its lifetime, so an input set once (an
// image's constants) stays set across runs, and one session's output can be an input of another without a
// copy through host memory. Not for sharing between threads; a pipeline's threads each make their own.
class Session {
public:
    virtual ~Session() = default;
    // Input `name` reads `value` (shared, not copied) on every run until set again: `value` must stay alive and
    // unchanged through the runs that read it. An engine failure for an input the network lacks or a shape other
    // than the session's.
    virtual void set(const std::string &name, const Tensor &value) = 0;
    // Input `name` reads output `output` of `from`'s latest run (shared on the engine's side, not copied): set it
    // again after each run of `from` whose output it is to read.
    virtual void set_from(const std::string &name, Session &from, const std::string &output) = 0;
    virtual void run() = 0;
    // Output `name` of the latest run, copied to the host.
    virtual Tensor output(const std::string &name) const = 0;
    // The static shape of output `name` (known before any run).
    virtual Shape output_shape(const std::string &name) const = 0;
};

using InputShapes = std::vector<std::pair<std::string, Shape>>;  // input name -> shape, every input of a network

class Engine {
public:
    virtual ~Engine() = default;
    // Outputs of `network` (or a tiled-VAE segment, "vae_decoder#3") for `feeds`, in the manifest's output
    // order; safe to call from several threads at once. An engine failure for anything the engine refuses.
    virtual std::vector<Tensor> run(const std::string &network, const std::vector<NamedTensor> &feeds) = 0;
    // A session of `network` at these input shapes, for the calling thread (compiled on first use, as run()).
    virtual std::unique_ptr<Session> session(const std::string &network, const InputShapes &shapes) = 0;
    // Free the working memory (intermediate tensors, idle requests) of `network`'s compiled shapes that no call is
    // running, keeping them compiled: for networks that run once per image (the VAE halves, each tiled-VAE segment
    // once its tiles are done), whose activations would otherwise stay allocated through the rest of the image and
    // the next one. An engine without such memory does nothing.
    virtual void release_working_memory(const std::string &network) = 0;
    // Free the compiled models of `network` and of its tiled-VAE segments ("vae_decoder#0", ...) that no call is
    // using, and give the memory back to the system (a staged memory plan's stage end).
    virtual void release(const std::string &network) = 0;
    // Compiled models alive now, per network or segment (only those with at least one).
    virtual std::map<std::string, std::size_t> resident() const = 0;
    // From now on compile `networks` with their linear layers' weights in int8, the others without (fp32 graphs
    // only): a memory plan's lever for the denoisers. Compiled models made the other way are not reused.
    virtual void compress_linear(const std::set<std::string> &networks) = 0;
    // Networks whose prepared IR exists already (loading them skips reading the ONNX graph; see map_weights).
    virtual std::set<std::string> prepared() const = 0;
    // Which of the bundle's graphs `network` runs ("fp32", "int8").
    virtual std::string graph_precision(const std::string &network) const = 0;
    // The precision the engine computes in, as the memory calibration keys it: "bf16" or "fp32".
    virtual std::string arithmetic() const = 0;
    // Shapes compiled so far, every network together (one compiled again after being dropped counts again).
    virtual std::size_t compiles() const = 0;
    virtual std::string name() const = 0;
};

// The engine `kind` ("openvino") over the bundle `manifest` (which must outlive it); an engine failure for an
// unknown kind, naming those this build has.
std::unique_ptr<Engine> create_engine(const std::string &kind, const Manifest &manifest, const EngineSettings &settings);
std::vector<std::string> engine_kinds();

// What the engine `kind` finds on this machine (seesr_engine_info_json): its version and devices, each with its
// capabilities, whether it computes in bf16 natively and the precisions it runs. An engine failure for an unknown
// kind, or when the engine cannot be asked.
Json engine_info(const std::string &kind);

// The output names of `network` in its manifest spec (a bundle error when the spec lacks them).
std::vector<std::string> output_names(const Manifest &manifest, const std::string &network);

}  // namespace seesr
