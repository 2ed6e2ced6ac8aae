// The OpenVINO engine: the bundle's ONNX graphs read by OpenVINO, reshaped to each call's static shapes and
// compiled once per (network, shapes), as seesr_runtime/openvino_backend.py does for fp32.
#include "engine.hpp"

#include <openvino/openvino.hpp>

#include <algorithm>
#include <filesystem>
#include <list>
#include <map>
#include <mutex>

namespace seesr {
namespace {

// Compiled models kept per network, one per input shape (each holds its own copy of the weights): the
// denoisers one (every latent tile has the same shape), the others two (the tiled VAE alternates two).
std::size_t shapes_kept(const std::string &network) {
    return network == "unet" || network == "controlnet" ? 1 : 2;
}

const std::vector<std::string> kPrecisions = {"fp32", "bf16", "fp16", "int8", "int8-bf16"};  // the Python backend's
const std::vector<std::string> kVirtualDevices = {"AUTO", "MULTI", "HETERO", "BATCH"};        // OpenVINO picks

std::string joined(const std::vector<std::string> &names) {
    std::string text;
    for (const auto &name : names) text += (text.empty() ? "'" : ", '") + name + "'";
    return "[" + text + "]";
}

Failure engine_error(const std::string &message) { return Failure(SEESR_ERROR_ENGINE, message); }

class OpenVinoEngine final : public Engine {
public:
    OpenVinoEngine(const Manifest &manifest, const EngineSettings &settings) : manifest_(manifest), settings_(settings) {
        if (std::find(kPrecisions.begin(), kPrecisions.end(), settings.precision) == kPrecisions.end()) {
            throw engine_error("openvino precision '" + settings.precision + "' is not one of " + joined(kPrecisions));
        }
        if (settings.precision.rfind("int8", 0) == 0) {
            throw not_implemented("precision '" + settings.precision + "' in the native OpenVINO engine (fp32, bf16 and "
                                  "fp16 are)");
        }
        try {
            check_device();
            check_capability();
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
        config_ = {ov::hint::inference_precision(inference_precision()),
                   ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
        if (settings.threads > 0) config_.insert(ov::inference_num_threads(settings.threads));
    }

    std::string name() const override { return "openvino"; }

    std::vector<Tensor> run(const std::string &network, const std::vector<NamedTensor> &feeds) override {
        const std::vector<std::string> outputs = output_names(manifest_, network);
        std::shared_ptr<ov::CompiledModel> model = compiled(network, feeds);
        try {
            ov::InferRequest request = model->create_infer_request();
            for (const NamedTensor &feed : feeds) request.set_tensor(feed.name, host_tensor(feed.tensor));
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

    // OpenVINO's INFERENCE_PRECISION_HINT for the precision asked for, on the bundle's fp32 graphs (as the
    // Python backend's PRECISIONS; its f32 timestep path under bf16 is not reproduced here).
    ov::element::Type inference_precision() const {
        if (settings_.precision == "bf16") return ov::element::bf16;
        if (settings_.precision == "fp16") return ov::element::f16;
        return ov::element::f32;
    }

    // bf16 and fp16 need the device's BF16 / FP16 capability; refused without it (a library has no warning to
    // give for the Python backend's fallback to f32). Virtual devices choose for themselves.
    void check_capability() {
        const std::string needs = settings_.precision == "bf16" ? "BF16" : settings_.precision == "fp16" ? "FP16" : "";
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
    std::shared_ptr<ov::CompiledModel> compiled(const std::string &network, const std::vector<NamedTensor> &feeds) {
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
        const std::filesystem::path graph = manifest_.graph_path(network, "fp32");
        try {
            std::shared_ptr<ov::Model> model = core_.read_model(graph.string());
            std::map<std::string, ov::PartialShape> shapes;
            for (const NamedTensor &feed : feeds) {
                shapes[feed.name] = ov::PartialShape(std::vector<ov::Dimension>(feed.tensor.shape().begin(),
                                                                                feed.tensor.shape().end()));
            }
            model->reshape(shapes);
            auto compiled = std::make_shared<ov::CompiledModel>(core_.compile_model(model, settings_.device, config_));
            per_network.emplace_back(key, compiled);
            return compiled;
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO could not prepare " + network + " (" + graph.string() + ") for shapes " + key +
                               ": " + error.what());
        }
    }

    const Manifest &manifest_;
    EngineSettings settings_;
    ov::Core core_;
    ov::AnyMap config_;
    std::mutex mutex_;
    std::map<std::string, std::list<std::pair<std::string, std::shared_ptr<ov::CompiledModel>>>> compiled_;
};

}  // namespace

std::unique_ptr<Engine> create_openvino_engine(const Manifest &manifest, const EngineSettings &settings) {
    try {
        return std::make_unique<OpenVinoEngine>(manifest, settings);
    } catch (const ov::Exception &error) {  // from ov::Core itself: its plugins could not be loaded
        throw engine_error(std::string("OpenVINO could not start: ") + error.what());
    }
}

}  // namespace seesr
