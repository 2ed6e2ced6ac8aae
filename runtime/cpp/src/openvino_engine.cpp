// The OpenVINO engine: the bundle's ONNX graphs read by OpenVINO, reshaped to each call's static shapes and
// compiled once per (network, shapes), prepared for each precision as seesr_runtime/openvino_backend.py does
// (openvino_precision.hpp: the int8 graphs, the f32 timestep path and f16 weights under bf16 / f16).
#include "engine.hpp"
#include "openvino_precision.hpp"

#include <openvino/openvino.hpp>

#include <algorithm>
#include <filesystem>
#include <list>
#include <map>
#include <mutex>
#include <optional>

namespace seesr {
namespace {

// Compiled models kept per network, one per input shape (each holds its own copy of the weights): the
// denoisers one (every latent tile has the same shape), the others two (the tiled VAE alternates two).
std::size_t shapes_kept(const std::string &network) {
    return network == "unet" || network == "controlnet" ? 1 : 2;
}

const std::vector<std::string> kVirtualDevices = {"AUTO", "MULTI", "HETERO", "BATCH"};  // OpenVINO picks

std::string joined(const std::vector<std::string> &names) {
    std::string text;
    for (const auto &name : names) text += (text.empty() ? "'" : ", '") + name + "'";
    return "[" + text + "]";
}

Failure engine_error(const std::string &message) { return Failure(SEESR_ERROR_ENGINE, message); }

const PrecisionPolicy &checked_policy(const std::string &precision) {
    const PrecisionPolicy *policy = precision_policy(precision);
    if (!policy) throw engine_error("openvino precision '" + precision + "' is not one of " + precision_names());
    return *policy;
}

ov::element::Type element_type(const std::string &hint) {
    if (hint == "bf16") return ov::element::bf16;
    if (hint == "f16") return ov::element::f16;
    return ov::element::f32;
}

// One network at one set of shapes: the main compiled model and, when the timestep path runs apart in f32,
// that model too (its outputs are inputs of the main one).
struct Compiled {
    ov::CompiledModel main;
    std::optional<ov::CompiledModel> timestep_path;
};

class OpenVinoEngine final : public Engine {
public:
    OpenVinoEngine(const Manifest &manifest, const EngineSettings &settings)
        : manifest_(manifest), settings_(settings), policy_(checked_policy(settings.precision)) {
        try {
            check_device();
            check_capability();
            check_int8_graphs();
            // bf16/f16 arithmetic rounds the weights anyway, so they are held as f16; a mapped f32 file would
            // stay mapped beside them (the Python backend's reasoning and measurements).
            if (compresses_weights(policy_)) core_.set_property(ov::enable_mmap(false));
            if (!settings.cache_dir.empty()) {
                const auto blobs = std::filesystem::path(settings.cache_dir) / "blobs";
                std::filesystem::create_directories(blobs);
                core_.set_property(ov::cache_dir(blobs.string()));
            }
        } catch (const ov::Exception &error) {
            throw engine_error(std::string("OpenVINO could not start: ") + error.what());
        } catch (const std::filesystem::filesystem_error &error) {
            throw engine_error("cannot create the cache folder " + settings.cache_dir + ": " + error.what());
        }
        config_ = {ov::hint::inference_precision(element_type(policy_.hint)),
                   ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
        if (settings.threads > 0) config_.insert(ov::inference_num_threads(settings.threads));
        f32_config_ = config_;
        f32_config_[ov::hint::inference_precision.name()] = ov::element::f32;
    }

    std::string name() const override { return "openvino"; }

    std::vector<Tensor> run(const std::string &network, const std::vector<NamedTensor> &feeds) override {
        const std::vector<std::string> outputs = output_names(manifest_, network);
        std::shared_ptr<Compiled> model = compiled(network, feeds);
        try {
            ov::InferRequest request = model->main.create_infer_request();
            std::optional<ov::InferRequest> timestep_request;
            if (model->timestep_path) timestep_request = model->timestep_path->create_infer_request();
            for (const NamedTensor &feed : feeds) {
                ov::InferRequest &target = timestep_request && feed.name == "timestep" ? *timestep_request : request;
                target.set_tensor(feed.name, host_tensor(feed.tensor));
            }
            if (timestep_request) {
                timestep_request->infer();
                for (const ov::Output<const ov::Node> &output : model->timestep_path->outputs()) {
                    request.set_tensor(output.get_any_name(), timestep_request->get_tensor(output));
                }
            }
            request.infer();
            std::vector<Tensor> results;
            for (const std::string &output : outputs) results.push_back(copied(request.get_tensor(output), network, output));
            return results;
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO failed to run " + network + ": " + error.what());
        }
    }

private:
    void check_device() {
        const std::string &device = settings_.device;
        const std::string kind = device.substr(0, device.find_first_of(":."));
        if (std::find(kVirtualDevices.begin(), kVirtualDevices.end(), kind) != kVirtualDevices.end()) return;
        const std::vector<std::string> available = core_.get_available_devices();
        for (const std::string &have : available) {
            if (have == device || have.substr(0, have.find('.')) == kind) return;
        }
        throw engine_error("OpenVINO device '" + device + "' is not available here (available: " + joined(available) +
                           ", or AUTO)");
    }

    // bf16, fp16 and the int8 precisions need the device's capability of the Python backend's PRECISIONS table;
    // refused without it (a library has no warning to give for the Python backend's fallback to f32). Virtual
    // devices choose for themselves.
    void check_capability() {
        const std::string &needs = policy_.capability;
        const std::string &device = settings_.device;
        const std::string kind = device.substr(0, device.find_first_of(":."));
        if (needs.empty() || std::find(kVirtualDevices.begin(), kVirtualDevices.end(), kind) != kVirtualDevices.end()) {
            return;
        }
        std::vector<std::string> have = core_.get_property(device, ov::device::capabilities);
        if (std::find(have.begin(), have.end(), needs) != have.end()) return;
        std::sort(have.begin(), have.end());
        throw engine_error("OpenVINO device " + device + " cannot run precision '" + settings_.precision +
                           "': its OPTIMIZATION_CAPABILITIES " + joined(have) + " lack '" + needs + "'");
    }

    // The int8 precisions run the bundle's Q/DQ graphs: refused, as by the Python backend, for a bundle without any.
    void check_int8_graphs() const {
        if (policy_.graphs != "int8") return;
        for (const Json &entry : manifest_.data()["networks"]) {
            if (entry.value("files", Json::object()).contains("int8")) return;
        }
        throw bundle_error(manifest_.root().string() + ": no int8 graphs in this bundle for precision '" +
                           policy_.name + "' (build it with --precision int8)");
    }

    // Which of the bundle's graphs `network` runs: the policy's, but int8 bundles quantize only UNet and
    // ControlNet, so the other networks (and the tiled VAE's segments) run their fp32 graphs.
    std::string graph_precision(const std::string &network) const {
        if (policy_.graphs == "int8" && !manifest_.entry(network).value("files", Json::object()).contains("int8")) {
            return "fp32";
        }
        return policy_.graphs;
    }

    static ov::Tensor host_tensor(const Tensor &tensor) {
        const ov::element::Type type = tensor.dtype() == DType::f32 ? ov::element::f32 : ov::element::i64;
        const ov::Shape shape(tensor.shape().begin(), tensor.shape().end());
        // OpenVINO reads inputs only; the wrapper shares the caller's memory for the call.
        return ov::Tensor(type, shape, const_cast<void *>(tensor.bytes()));
    }

    static Tensor copied(const ov::Tensor &output, const std::string &network, const std::string &name) {
        const ov::Shape &dims = output.get_shape();
        Shape shape(dims.begin(), dims.end());
        if (output.get_element_type() == ov::element::f32) {
            const float *values = output.data<const float>();
            return Tensor::f32(shape, std::vector<float>(values, values + output.get_size()));
        }
        throw engine_error(network + " output " + name + " is " + output.get_element_type().get_type_name() +
                           ", expected f32");
    }

    std::string shapes_key(const std::vector<NamedTensor> &feeds) const {
        std::string key;
        for (const NamedTensor &feed : feeds) key += feed.name + shape_text(feed.tensor.shape()) + ";";
        return key;
    }

    // The compiled model of `network` for these feeds' shapes: compiled on first use, the least recently used
    // shape of the network dropped beyond shapes_kept (callers still running it keep it alive).
    std::shared_ptr<Compiled> compiled(const std::string &network, const std::vector<NamedTensor> &feeds) {
        const std::string key = shapes_key(feeds);
        std::lock_guard<std::mutex> lock(mutex_);
        auto &per_network = compiled_[network];
        for (auto it = per_network.begin(); it != per_network.end(); ++it) {
            if (it->first == key) {
                per_network.splice(per_network.end(), per_network, it);
                return per_network.back().second;
            }
        }
        if (per_network.size() >= shapes_kept(network)) per_network.pop_front();
        const std::filesystem::path graph = manifest_.graph_path(network, graph_precision(network));
        try {
            std::shared_ptr<ov::Model> model = core_.read_model(graph.string());
            std::map<std::string, ov::PartialShape> shapes;
            for (const NamedTensor &feed : feeds) {
                shapes[feed.name] = ov::PartialShape(std::vector<ov::Dimension>(feed.tensor.shape().begin(),
                                                                                feed.tensor.shape().end()));
            }
            model->reshape(shapes);
            std::shared_ptr<ov::Model> timestep_path;
            if (reduced_hint(policy_) && keeps_timestep_f32(network)) timestep_path = split_timestep_path(model);
            if (compresses_weights(policy_)) compress_weights_to_f16(model);
            auto compiled = std::make_shared<Compiled>(
                Compiled{core_.compile_model(model, settings_.device, config_), std::nullopt});
            if (timestep_path) {
                compiled->timestep_path = core_.compile_model(timestep_path, settings_.device, f32_config_);
            }
            per_network.emplace_back(key, compiled);
            return compiled;
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO could not prepare " + network + " (" + graph.string() + ") for shapes " + key +
                               ": " + error.what());
        }
    }

    const Manifest &manifest_;
    EngineSettings settings_;
    const PrecisionPolicy &policy_;
    ov::Core core_;
    ov::AnyMap config_;
    ov::AnyMap f32_config_;  // the timestep path's: config_ with an f32 inference precision
    std::mutex mutex_;
    std::map<std::string, std::list<std::pair<std::string, std::shared_ptr<Compiled>>>> compiled_;
};

}  // namespace

Json openvino_engine_info() {
    try {
        ov::Core core;
        Json devices = Json::array();
        for (const std::string &name : core.get_available_devices()) {
            std::vector<std::string> capabilities = core.get_property(name, ov::device::capabilities);
            std::sort(capabilities.begin(), capabilities.end());
            const auto has = [&](const std::string &capability) {
                return std::find(capabilities.begin(), capabilities.end(), capability) != capabilities.end();
            };
            Json precisions = Json::array();  // what check_capability lets this device run
            for (const PrecisionPolicy &policy : precision_policies()) {
                if (policy.capability.empty() || has(policy.capability)) precisions.push_back(policy.name);
            }
            devices.push_back({{"name", name},
                               {"full_name", core.get_property(name, ov::device::full_name)},
                               {"capabilities", capabilities},
                               {"bf16", has("BF16")},
                               {"precisions", precisions}});
        }
        return {{"engine", "openvino"}, {"version", ov::get_openvino_version().buildNumber}, {"devices", devices}};
    } catch (const ov::Exception &error) {
        throw engine_error(std::string("OpenVINO could not list its devices: ") + error.what());
    }
}

std::unique_ptr<Engine> create_openvino_engine(const Manifest &manifest, const EngineSettings &settings) {
    try {
        return std::make_unique<OpenVinoEngine>(manifest, settings);
    } catch (const ov::Exception &error) {  // from ov::Core itself: its plugins could not be loaded
        throw engine_error(std::string("OpenVINO could not start: ") + error.what());
    }
}

}  // namespace seesr
