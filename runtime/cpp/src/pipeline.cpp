#include "pipeline.hpp"

#include <algorithm>
#include <type_traits>
#include <utility>

namespace seesr {
namespace {

template <typename T>
std::vector<T> list_of(const Json &tagger, const char *key, const Manifest &manifest, std::size_t size = 0) {
    const Json &value = tagger.contains(key) ? tagger[key] : Json();
    try {
        std::vector<T> items = value.get<std::vector<T>>();
        if (size == 0 || items.size() == size) return items;
    } catch (const Json::exception &) {
    }
    const std::string count = size ? std::to_string(size) + " " : "";
    throw bundle_error(manifest.root().string() + ": tagger." + key + " in manifest.json is " + value.dump().substr(0, 80) +
                       ", expected a list of " + count + (std::is_same_v<T, std::string> ? "strings" : "numbers"));
}

float number_in(const Json &pipeline, const char *key, const Manifest &manifest) {
    const Json &value = pipeline.value(key, Json());
    if (!value.is_number() || !(value.get<double>() > 0.0)) {
        throw bundle_error(manifest.root().string() + ": pipeline." + key + " in manifest.json is " + value.dump() +
                           ", expected a positive number");
    }
    return static_cast<float>(value.get<double>());
}

}  // namespace

std::string format_prompt(const std::string &templ, const std::map<std::string, std::string> &fields) {
    std::string out;
    for (std::size_t at = 0; at < templ.size(); ++at) {
        const char c = templ[at];
        if ((c == '{' || c == '}') && at + 1 < templ.size() && templ[at + 1] == c) {
            out += c;
            ++at;
        } else if (c == '{') {
            const std::size_t close = templ.find('}', at);
            auto field = close == std::string::npos ? fields.end() : fields.find(templ.substr(at + 1, close - at - 1));
            if (field == fields.end()) {
                throw bundle_error("pipeline.prompt_template " + templ + " has a field other than {tags}, {prompt} "
                                   "and {added_prompt} at character " + std::to_string(at));
            }
            out += field->second;
            at = close;
        } else if (c == '}') {
            throw bundle_error("pipeline.prompt_template " + templ + " has a single '}' at character " + std::to_string(at));
        } else {
            out += c;
        }
    }
    return out;
}

Pipeline::Tagger Pipeline::read_tagger(const Manifest &manifest) {
    const Json &tagger = manifest.data()["tagger"];
    Tagger read;
    read.tags = list_of<std::string>(tagger, "tags", manifest);
    read.thresholds = list_of<float>(tagger, "thresholds", manifest, read.tags.size());
    read.mean = list_of<float>(tagger, "mean", manifest, 3);
    read.std = list_of<float>(tagger, "std", manifest, 3);
    const Json &size = tagger.contains("input_size") ? tagger["input_size"] : Json();
    if (!size.is_number_integer() || size.get<std::int64_t>() < 1 || size.get<std::int64_t>() > 8192) {
        throw bundle_error(manifest.root().string() + ": tagger.input_size in manifest.json is " + size.dump() +
                           ", expected a number of pixels in 1..8192");
    }
    read.input_size = size.get<std::int64_t>();
    return read;
}

Pipeline::Pipeline(const std::filesystem::path &bundle, const std::string &engine, const EngineSettings &settings,
                   std::filesystem::path tiled_vae_spill_dir, std::optional<std::int64_t> memory_budget)
    : Pipeline(Manifest::load(bundle), engine, settings, std::move(tiled_vae_spill_dir), memory_budget) {}

Pipeline::Pipeline(Manifest manifest, const std::string &engine, const EngineSettings &settings,
                   std::filesystem::path tiled_vae_spill_dir, std::optional<std::int64_t> memory_budget)
    : manifest_(std::move(manifest)),
      options_(std::make_shared<const OptionTable>(
          OptionTable::from_pipeline(manifest_.data()["pipeline"], manifest_.root().string()))),
      text_(manifest_),
      tagger_(read_tagger(manifest_)) {
    const Json &templ = manifest_.data()["pipeline"].value("prompt_template", Json());
    if (!templ.is_string()) {
        throw bundle_error(manifest_.root().string() + ": pipeline.prompt_template in manifest.json is " + templ.dump() +
                           ", expected a string");
    }
    prompt_template_ = templ.get<std::string>();
    format_prompt(prompt_template_, {{"tags", ""}, {"prompt", ""}, {"added_prompt", ""}});  // refuse a bad one now
    const Json &pipeline = manifest_.data()["pipeline"];
    scheduler_config_ = DdpmConfig::from_json(pipeline.value("scheduler", Json::object()));
    DdpmScheduler check(scheduler_config_);  // refuse a sampler this runtime does not reproduce at open
    scaling_factor_ = number_in(pipeline, "vae_scaling_factor", manifest_);
    const Json &start = pipeline.value("start_step", Json());
    if (!start.is_number_integer() || start.get<std::int64_t>() < 0 ||
        start.get<std::int64_t>() >= scheduler_config_.num_train_timesteps) {
        throw bundle_error(manifest_.root().string() + ": pipeline.start_step in manifest.json is " + start.dump() +
                           ", expected a timestep in 0.." + std::to_string(scheduler_config_.num_train_timesteps - 1));
    }
    start_step_ = start.get<std::int64_t>();
    tiled_vae_spill_dir_ = std::move(tiled_vae_spill_dir);
    memory_budget_ = memory_budget;
    settings_ = settings;
    if (memory_budget_) {
        if (*memory_budget_ < 1) {
            throw option_error("memory_budget must be a positive number of bytes, got " + std::to_string(*memory_budget_));
        }
        // the budget plans host memory, for an engine that frees networks between stages (pipeline.py's rule)
        if (settings_.device.rfind("CPU", 0) != 0) {
            throw option_error("memory_budget plans host memory for the CPU; this pipeline runs " + engine + " on " +
                               settings_.device);
        }
        settings_.map_weights = true;
    }
    engine_ = create_engine(engine, manifest_, settings_);
    if (memory_budget_ && engine_memory(engine_->name(), engine_->arithmetic()) == nullptr) {
        throw option_error("memory_budget: the memory of " + engine_->name() + " at " + engine_->arithmetic() +
                           " is not measured");
    }
}

NetworkBytes Pipeline::network_bytes_once() const {
    std::call_once(bytes_once_, [this] {
        std::map<std::string, std::string> precision_of;
        for (const auto &[network, entry] : manifest_.data().at("networks").items()) {
            precision_of[network] = engine_->graph_precision(network);
        }
        bytes_ = network_bytes(manifest_, precision_of);
    });
    return bytes_;
}

std::optional<MemoryPlan> Pipeline::memory_plan(std::int64_t width, std::int64_t height, const UpscaleOptions &o) const {
    const EngineMemory *engine = engine_memory(engine_->name(), engine_->arithmetic());
    if (engine == nullptr) return std::nullopt;
    return plan_memory(Workload::of(width, height, o), network_bytes_once(), *engine,
                       engine_->name() + " " + settings_.precision, memory_budget_, engine_->prepared());
}

std::optional<MemoryPlan> Pipeline::memory_plan(std::int64_t width, std::int64_t height, const Options &given) const {
    const UpscaleOptions o = options_->upscale_options(given);
    check_image_size(width, height, o.max_pixels);
    return memory_plan(width, height, o);
}

Pipeline::Tagged Pipeline::tag(const RgbView &image) const {
    std::vector<NamedTensor> feeds;
    feeds.push_back({"image", dape_input(image, tagger_.input_size, tagger_.mean, tagger_.std)});
    std::vector<Tensor> outputs = engine_->run("dape", feeds);
    const std::vector<std::string> names = output_names(manifest_, "dape");
    const auto logits = std::find(names.begin(), names.end(), "tag_logits");
    const auto embeds = std::find(names.begin(), names.end(), "image_embeds");
    const std::size_t index = static_cast<std::size_t>(logits - names.begin());
    if (logits == names.end() || index >= outputs.size() || outputs[index].count() < tagger_.tags.size()) {
        throw bundle_error(manifest_.root().string() + ": the dape graph gives no tag_logits for the " +
                           std::to_string(tagger_.tags.size()) + " tags of the tagger");
    }
    const std::size_t embeds_index = static_cast<std::size_t>(embeds - names.begin());
    if (embeds == names.end() || embeds_index >= outputs.size()) {
        throw bundle_error(manifest_.root().string() + ": the dape graph gives no image_embeds");
    }
    return {select_tags(outputs[index].f32_data(), tagger_.tags, tagger_.thresholds), std::move(outputs[embeds_index])};
}

Description Pipeline::describe(const RgbView &image, const Options &given) const {
    const UpscaleOptions o = options_->upscale_options(given);
    check_image_size(image.width, image.height, o.max_pixels);
    Description description;
    description.tags = tag(image).tags;
    description.prompt = format_prompt(prompt_template_,
                                       {{"tags", description.tags}, {"prompt", o.prompt}, {"added_prompt", o.added_prompt}});
    return description;
}

}  // namespace seesr
