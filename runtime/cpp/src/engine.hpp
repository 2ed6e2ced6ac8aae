// What the pipeline needs of an inference engine: run one network of the bundle on named host tensors and
// return its outputs in the manifest's order. Each engine is one source file defining a factory listed in
// engine.cpp (OpenVINO now; an onnxruntime or TensorRT engine would be one more file and one line there).
#pragma once

#include "manifest.hpp"
#include "tensor.hpp"

#include <memory>
#include <string>
#include <vector>

namespace seesr {

struct EngineSettings {
    std::string device = "CPU";
    std::string precision = "fp32";
    int threads = 0;        // 0: the engine's choice
    std::string cache_dir;  // empty: no cache
};

class Engine {
public:
    virtual ~Engine() = default;
    // Outputs of `network` (or a tiled-VAE segment, "vae_decoder#3") for `feeds`, in the manifest's output
    // order; safe to call from several threads at once. An engine failure for anything the engine refuses.
    virtual std::vector<Tensor> run(const std::string &network, const std::vector<NamedTensor> &feeds) = 0;
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
