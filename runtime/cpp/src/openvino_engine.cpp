// The OpenVINO engine: the bundle's ONNX graphs read by OpenVINO, reshaped to each call's static shapes and
// compiled once per (network, shapes), prepared for each precision as seesr_runtime/openvino_backend.py does
// (openvino_precision.hpp: the int8 graphs, the f32 timestep path and f16 weights under bf16 / f16). Shared by
// threads: each compiled shape keeps a pool of inference requests, and a new shape compiles outside any lock
// that calls of other shapes wait on (compiled_models.hpp).
#include "compiled_models.hpp"
#include "engine.hpp"
#include "openvino_precision.hpp"

#include <openvino/openvino.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace seesr {
namespace {

// Compiled models kept per network, one per input shape (each holds its own copy of the weights), as the
// Python backend keeps them (SHAPES_KEPT there, and why): the denoisers one (every latent tile has the same
// shape), a tiled-VAE segment ("vae_decoder#3") four (the tile shapes of an uneven grid), the others two.
std::size_t shapes_kept(const std::string &network) {
    if (network.find('#') != std::string::npos) return 4;
    return network == "unet" || network == "controlnet" ? 1 : 2;
}

const std::vector<std::string> kVirtualDevices = {"AUTO", "MULTI", "HETERO", "BATCH"};  // OpenVINO picks

std::string joined(const std::vector<std::string> &names) {
    std::string text;
    for (const auto &name : names) text += (text.empty() ? "'" : ", '") + name + "'";
    return "[" + text + "]";
}

Failure engine_error(const std::string &message) { return Failure(SEESR_ERROR_ENGINE, message); }

// glibc keeps freed pages of its heaps for reuse: hand them back after a network is released (heap.py's reason).
void return_freed_memory() {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

// Whether `name` is `network` or one of its tiled-VAE segments ("vae_decoder#3").
bool part_of(const std::string &name, const std::string &network) {
    return name == network || name.rfind(network + "#", 0) == 0;
}

// A private folder for the prepared IR of one engine's life (map_weights without a cache folder).
std::filesystem::path private_ir_folder() {
    std::string pattern = (std::filesystem::temp_directory_path() / "seesr-ov-ir-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
        throw engine_error("cannot create a folder for OpenVINO's prepared IR in " +
                           std::filesystem::temp_directory_path().string() + ": " +
                           std::error_code(errno, std::generic_category()).message());
    }
    return pattern;
}

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

// An inference request of one compiled shape, with its timestep path's when that runs apart.
struct Requests {
    ov::InferRequest main;
    std::optional<ov::InferRequest> timestep;
};

// One network at one set of shapes: the main compiled model and, when the timestep path runs apart in f32, that
// model too (its outputs are inputs of the main one); with the pool of their requests.
struct Compiled {
    Compiled(ov::CompiledModel main_model, std::optional<ov::CompiledModel> timestep_model)
        : main(std::move(main_model)), timestep_path(std::move(timestep_model)), requests([this] {
              return Requests{main.create_infer_request(),
                              timestep_path ? std::optional<ov::InferRequest>(timestep_path->create_infer_request())
                                            : std::nullopt};
          }) {}
    // Free what this shape holds between calls, keeping it compiled: OpenVINO's intermediate memory and the idle
    // requests with their input and output tensors (the next call allocates them again). Only while no request of
    // this shape runs (OpenVINO refuses otherwise).
    void release_memory() {
        requests.clear();
        main.release_memory();
        if (timestep_path) timestep_path->release_memory();
    }

    ov::CompiledModel main;
    std::optional<ov::CompiledModel> timestep_path;
    RequestPool<Requests> requests;
};

using Models = NetworkModels<Compiled>;

ov::Tensor host_tensor(const Tensor &tensor) {
    const ov::element::Type type = tensor.dtype() == DType::f32 ? ov::element::f32 : ov::element::i64;
    const ov::Shape shape(tensor.shape().begin(), tensor.shape().end());
    // OpenVINO reads inputs only; the wrapper shares the caller's memory for the call.
    return ov::Tensor(type, shape, const_cast<void *>(tensor.bytes()));
}

Tensor copied(const ov::Tensor &output, const std::string &network, const std::string &name) {
    const ov::Shape &dims = output.get_shape();
    Shape shape(dims.begin(), dims.end());
    if (output.get_element_type() == ov::element::f32) {
        const float *values = output.data<const float>();
        return Tensor::f32(shape, std::vector<float>(values, values + output.get_size()));
    }
    throw engine_error(network + " output " + name + " is " + output.get_element_type().get_type_name() +
                       ", expected f32");
}

// Input `name` of one call: the timestep goes to the timestep path's request where that runs apart.
void set_input(Requests &requests, const std::string &name, const ov::Tensor &value) {
    ov::InferRequest &target = requests.timestep && name == "timestep" ? *requests.timestep : requests.main;
    target.set_tensor(name, value);
}

void infer(const Compiled &model, Requests &requests) {
    if (requests.timestep) {
        requests.timestep->infer();
        for (const ov::Output<const ov::Node> &output : model.timestep_path->outputs()) {
            requests.main.set_tensor(output.get_any_name(), requests.timestep->get_tensor(output));
        }
    }
    requests.main.infer();
}

// A network's session (engine.hpp): one request of a compiled shape, held until the session goes.
class OpenVinoSession final : public Session {
public:
    OpenVinoSession(std::string network, Models::Use model)
        : network_(std::move(network)), model_(std::move(model)), requests_(model_->requests.take()) {}
    OpenVinoSession(const OpenVinoSession &) = delete;
    OpenVinoSession &operator=(const OpenVinoSession &) = delete;
    ~OpenVinoSession() override { model_->requests.give_back(std::move(requests_)); }

    void set(const std::string &name, const Tensor &value) override {
        guarded("set input " + name + " of", [&] { set_input(requests_, name, host_tensor(value)); });
    }
    void set_from(const std::string &name, Session &from, const std::string &output) override {
        auto &source = dynamic_cast<OpenVinoSession &>(from);
        guarded("hand " + source.network_ + " output " + output + " to", [&] {
            requests_.main.set_tensor(name, source.requests_.main.get_tensor(output));
        });
    }
    void run() override {
        guarded("run", [&] { infer(*model_, requests_); });
    }
    Tensor output(const std::string &name) const override {
        std::optional<Tensor> result;
        guarded("read output " + name + " of", [&] { result = copied(requests_.main.get_tensor(name), network_, name); });
        return std::move(*result);
    }
    Shape output_shape(const std::string &name) const override {
        Shape shape;
        guarded("find output " + name + " of", [&] {
            const ov::Shape dims = model_->main.output(name).get_shape();
            shape.assign(dims.begin(), dims.end());
        });
        return shape;
    }

private:
    template <typename Body>
    void guarded(const std::string &action, const Body &body) const {
        try {
            body();
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO could not " + action + " " + network_ + ": " + error.what());
        }
    }

    std::string network_;
    Models::Use model_;
    mutable Requests requests_;
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
        if (settings.map_weights) {
            if (settings.cache_dir.empty()) {
                ir_dir_ = private_ir_folder();
                owns_ir_dir_ = true;
            } else {
                ir_dir_ = std::filesystem::path(settings.cache_dir) / "ir";
            }
        }
    }
    ~OpenVinoEngine() override {
        networks_.clear();  // the compiled models map the IR files: gone before the files
        if (owns_ir_dir_) {
            std::error_code ignored;
            std::filesystem::remove_all(ir_dir_, ignored);
        }
    }
    OpenVinoEngine(const OpenVinoEngine &) = delete;
    OpenVinoEngine &operator=(const OpenVinoEngine &) = delete;

    std::string name() const override { return "openvino"; }

    // Which of the bundle's graphs `network` runs: the policy's, but int8 bundles quantize only UNet and
    // ControlNet, so the other networks (and the tiled VAE's segments) run their fp32 graphs.
    std::string graph_precision(const std::string &network) const override {
        if (policy_.graphs == "int8" && !manifest_.entry(network).value("files", Json::object()).contains("int8")) {
            return "fp32";
        }
        return policy_.graphs;
    }


    std::vector<Tensor> run(const std::string &network, const std::vector<NamedTensor> &feeds) override {
        InputShapes shapes;
        for (const NamedTensor &feed : feeds) shapes.emplace_back(feed.name, feed.tensor.shape());
        Network &entry = this->network(network);
        Models::Use model = compiled(entry, shapes);
        Requests requests = model->requests.take();
        try {
            for (const NamedTensor &feed : feeds) set_input(requests, feed.name, host_tensor(feed.tensor));
            infer(*model, requests);
            std::vector<Tensor> results;
            for (const std::string &output : entry.outputs) {
                results.push_back(copied(requests.main.get_tensor(output), network, output));
            }
            model->requests.give_back(std::move(requests));
            return results;
        } catch (const ov::Exception &error) {
            model->requests.give_back(std::move(requests));
            throw engine_error("OpenVINO failed to run " + network + ": " + error.what());
        } catch (...) {
            model->requests.give_back(std::move(requests));
            throw;
        }
    }

    std::unique_ptr<Session> session(const std::string &network, const InputShapes &shapes) override {
        return std::make_unique<OpenVinoSession>(network, compiled(this->network(network), shapes));
    }

    void release_working_memory(const std::string &network) override {
        try {
            this->network(network).models.release_working_memory([](Compiled &model) { model.release_memory(); });
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO could not release the working memory of " + network + ": " + error.what());
        }
    }

    void release(const std::string &network) override {
        std::vector<Network *> held;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            for (const auto &[name, entry] : networks_) {
                if (part_of(name, network)) held.push_back(entry.get());
            }
        }
        for (Network *entry : held) entry->models.release();  // entries live as long as the engine
        return_freed_memory();
    }

    std::map<std::string, std::size_t> resident() const override {
        std::lock_guard<std::mutex> lock(mutex_);
        std::map<std::string, std::size_t> alive;
        for (const auto &[name, entry] : networks_) {
            if (const std::size_t count = entry->models.size()) alive[name] = count;
        }
        return alive;
    }

    void compress_linear(const std::set<std::string> &networks) override {
        std::lock_guard<std::mutex> lock(mutex_);
        int8_linear_ = policy_.graphs == "fp32" ? networks : std::set<std::string>();
    }

    std::set<std::string> prepared() const override {
        std::set<std::string> found;
        std::error_code error;
        if (ir_dir_.empty() || !std::filesystem::is_directory(ir_dir_, error)) return found;
        for (const auto &file : std::filesystem::directory_iterator(ir_dir_, error)) {
            const std::string name = file.path().filename().string();
            const std::size_t dot = name.find('.');
            if (dot == std::string::npos || dot == 0 || file.path().extension() != ".xml") continue;
            const std::string network = name.substr(0, dot);
            if (!manifest_.data().at("networks").contains(network)) continue;  // a segment, or another bundle's
            if (name.find(".timestep.") == std::string::npos &&
                name.compare(dot + 1, graph_precision(network).size() + 1, graph_precision(network) + ".") == 0) {
                found.insert(network);
            }
        }
        return found;
    }

    std::string arithmetic() const override { return policy_.hint == "bf16" ? "bf16" : "fp32"; }

    std::size_t compiles() const override {
        std::lock_guard<std::mutex> lock(mutex_);
        std::size_t total = 0;
        for (const auto &[name, entry] : networks_) total += entry->models.compiles();
        return total;
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

    // One network's compiled shapes and its output names (read once).
    struct Network {
        Network(const std::string &name, std::vector<std::string> output_names)
            : models(name, shapes_kept(name)), outputs(std::move(output_names)) {}
        Models models;
        std::vector<std::string> outputs;
    };

    // The entry of `network` (or a tiled-VAE segment), made on first use: a bundle error for one it lacks.
    Network &network(const std::string &network) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto found = networks_.find(network);
            if (found != networks_.end()) return *found->second;
        }
        std::vector<std::string> outputs = output_names(manifest_, network);
        std::lock_guard<std::mutex> lock(mutex_);
        auto &entry = networks_[network];
        if (!entry) entry = std::make_unique<Network>(network, std::move(outputs));
        return *entry;
    }

    // The same key whatever the order of the inputs (a call's feeds, a session's shapes).
    static std::string shapes_key(InputShapes shapes) {
        std::sort(shapes.begin(), shapes.end());
        std::string key;
        for (const auto &[name, shape] : shapes) key += name + shape_text(shape) + ";";
        return key;
    }

    // The compiled model of `entry`'s network for these input shapes, in use until the handle goes: compiled
    // on first use outside any lock other calls wait on (models.use), the least recently used shape of the
    // network dropped beyond shapes_kept.
    Models::Use compiled(Network &entry, const InputShapes &shapes) {
        const std::string &network = entry.models.network();
        bool int8 = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            int8 = int8_linear_.count(network) > 0;
        }
        const std::string key = shapes_key(shapes) + (int8 ? "int8-linear" : "");
        return entry.models.use(key, [&] { return compile(network, shapes, key, int8); });
    }

    // `network` read, reshaped and prepared for the policy (the f32 timestep path cut out, int8 linear weights,
    // f16 weights): (main model, timestep path or null).
    std::pair<std::shared_ptr<ov::Model>, std::shared_ptr<ov::Model>> prepare(const std::string &network,
                                                                               const InputShapes &shapes, bool int8) {
        const std::filesystem::path graph = manifest_.graph_path(network, graph_precision(network));
        std::shared_ptr<ov::Model> model =
            settings_.map_weights ? core_.read_model(graph.string(), "", {ov::enable_mmap(true)})
                                  : core_.read_model(graph.string());
        std::map<std::string, ov::PartialShape> partial;
        for (const auto &[name, shape] : shapes) {
            partial[name] = ov::PartialShape(std::vector<ov::Dimension>(shape.begin(), shape.end()));
        }
        model->reshape(partial);
        std::shared_ptr<ov::Model> timestep_path;
        if (reduced_hint(policy_) && keeps_timestep_f32(network)) timestep_path = split_timestep_path(model);
        if (int8) compress_linear_weights_int8(model);
        if (compresses_weights(policy_)) compress_weights_to_f16(model);
        return {model, timestep_path};
    }

    // The prepared IR of `network` at these shapes in ir_dir_, written once (each .xml after its .bin, the main
    // model's last, so an existing main .xml is a complete entry): the name pins the graph files' sha256, the
    // shapes, the int8 flag and the precision, so a rebuilt bundle or another setting gets new files. Returns the
    // files of the main model and of the timestep path (empty when it does not run apart).
    std::pair<std::filesystem::path, std::filesystem::path> prepared_ir(const std::string &network,
                                                                        const InputShapes &shapes,
                                                                        const std::string &key, bool int8) {
        std::filesystem::create_directories(ir_dir_);
        const std::string precision = graph_precision(network);
        const Json &files = manifest_.entry(network).at("files");
        const Json &graph = files.contains(precision) ? files[precision] : files.at("fp32");
        const std::string identity = graph.value("sha256", Json::object()).dump() + "|" + key + "|" + policy_.name;
        const std::string stem = network + "." + precision + "." + std::to_string(std::hash<std::string>()(identity));
        const std::filesystem::path xml = ir_dir_ / (stem + ".xml"), timestep_xml = ir_dir_ / (stem + ".timestep.xml");
        const bool split = reduced_hint(policy_) && keeps_timestep_f32(network);
        if (std::filesystem::exists(xml)) return {xml, split ? timestep_xml : std::filesystem::path()};
        bool timestep_written = false;
        {
            const auto [model, timestep_path] = prepare(network, shapes, int8);
            if (timestep_path) save_ir(timestep_path, timestep_xml);
            save_ir(model, xml);
            timestep_written = timestep_path != nullptr;
        }
        // the source graph and its prepared copy are freed now: hand their pages back before compiling, which
        // would otherwise grow the heap around them (measured at SD2 size: 0.36 GB more anonymous memory through
        // the denoise stage than the Python backend, which trims here too)
        return_freed_memory();
        return {xml, timestep_written ? timestep_xml : std::filesystem::path()};
    }

    // `model` written as IR at `xml` through a temporary name, the .bin moved into place before the .xml.
    static void save_ir(const std::shared_ptr<ov::Model> &model, const std::filesystem::path &xml) {
        const std::filesystem::path tmp =
            xml.parent_path() / ("." + xml.stem().string() + "." + std::to_string(getpid()) + ".tmp.xml");
        ov::save_model(model, tmp.string(), false);
        std::filesystem::rename(std::filesystem::path(tmp).replace_extension(".bin"),
                                std::filesystem::path(xml).replace_extension(".bin"));
        std::filesystem::rename(tmp, xml);
    }

    std::shared_ptr<Compiled> compile(const std::string &network, const InputShapes &shapes, const std::string &key,
                                      bool int8) {
        try {
            std::optional<ov::CompiledModel> main, timestep;
            std::shared_ptr<ov::Model> timestep_path;
            if (settings_.map_weights) {  // the IR's weights stay file pages, mapped for the compiled model's life
                const auto [xml, timestep_xml] = prepared_ir(network, shapes, key, int8);
                ov::AnyMap mapped = config_;
                mapped[ov::enable_mmap.name()] = true;
                main = core_.compile_model(xml.string(), settings_.device, mapped);
                if (!timestep_xml.empty()) timestep_path = core_.read_model(timestep_xml.string());
            } else {
                std::shared_ptr<ov::Model> model;
                std::tie(model, timestep_path) = prepare(network, shapes, int8);
                main = core_.compile_model(model, settings_.device, config_);
            }
            if (timestep_path) timestep = core_.compile_model(timestep_path, settings_.device, f32_config_);
            return std::make_shared<Compiled>(std::move(*main), std::move(timestep));
        } catch (const ov::Exception &error) {
            throw engine_error("OpenVINO could not prepare " + network + " (" +
                               manifest_.graph_path(network, graph_precision(network)).string() + ") for shapes " +
                               key + ": " + error.what());
        } catch (const std::filesystem::filesystem_error &error) {
            throw engine_error("OpenVINO could not write the prepared IR of " + network + " in " + ir_dir_.string() +
                               ": " + error.what());
        }
    }

    const Manifest &manifest_;
    EngineSettings settings_;
    const PrecisionPolicy &policy_;
    ov::Core core_;
    ov::AnyMap config_;
    ov::AnyMap f32_config_;  // the timestep path's: config_ with an f32 inference precision
    mutable std::mutex mutex_;  // guards networks_ only, never held while compiling or running
    std::set<std::string> int8_linear_;  // networks compiled with int8 linear weights (guarded by mutex_)
    std::filesystem::path ir_dir_;       // prepared IR (map_weights); empty: none
    bool owns_ir_dir_ = false;           // a private folder, removed with the engine
    std::map<std::string, std::unique_ptr<Network>> networks_;
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
