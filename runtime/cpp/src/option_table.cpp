#include "option_table.hpp"

#include "failure.hpp"
#include "python_text.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>
#include <utility>
#include <variant>

namespace seesr {

std::vector<std::string> option_description_problems(const Json &entries) {
    if (!entries.is_array()) return {"pipeline.options must be a list of option descriptions"};
    std::vector<std::string> problems;
    for (std::size_t i = 0; i < entries.size(); ++i) {
        const Json &entry = entries[i];
        const std::string at = "pipeline.options[" + std::to_string(i) + "]";
        if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string()) {
            problems.push_back(at + ": needs a 'name'");
            continue;
        }
        const Json type = entry.value("type", Json());
        bool known = type.is_string() && (type == "str" || type == "int" || type == "float" || type == "bool");
        if (!known || !entry.contains("default")) {
            problems.push_back(at + " (" + entry["name"].get<std::string>() +
                               "): needs 'type' (str, int, float, bool) and 'default'");
        }
    }
    return problems;
}

std::string OptionSpec::range_text() const {
    if (!choices.empty()) {
        std::string text = "one of (";
        for (std::size_t i = 0; i < choices.size(); ++i) text += (i ? ", " : "") + python_repr(choices[i]);
        return text + (choices.size() == 1 ? ",)" : ")");
    }
    std::string bounds;
    if (!minimum.is_null() && !maximum.is_null()) {
        bounds = "in [" + python_repr(minimum) + ", " + python_repr(maximum) + "]";
    } else if (!minimum.is_null()) {
        bounds = ">= " + python_repr(minimum);
    }
    if (type != "float") return bounds;
    return bounds.empty() ? "a finite number" : "a finite number " + bounds;
}

Json OptionSpec::checked(const Json &value) const {
    bool typed = (type == "str" && value.is_string()) || (type == "bool" && value.is_boolean()) ||
                 (type == "int" && value.is_number_integer()) || (type == "float" && value.is_number());
    if (!typed) {
        std::string accepted = type == "str" ? "a string" : type == "int" ? "an integer" : type == "float" ? "a finite number" : "true or false";
        if (!choices.empty()) {
            accepted = range_text();
        } else if (!minimum.is_null() && !maximum.is_null()) {
            accepted += " in [" + python_repr(minimum) + ", " + python_repr(maximum) + "]";
        } else if (!minimum.is_null()) {
            accepted += " >= " + python_repr(minimum);
        }
        throw option_error(name + " must be " + accepted + ", got " + python_repr(value) + " (" + python_type(value) + ")");
    }
    bool out_of_range = !choices.empty() && std::find(choices.begin(), choices.end(), value) == choices.end();
    if (value.is_number()) {
        double number = value.get<double>();
        out_of_range = out_of_range || (type == "float" && !std::isfinite(number)) ||
                       (!minimum.is_null() && number < minimum.get<double>()) ||
                       (!maximum.is_null() && number > maximum.get<double>());
    }
    if (out_of_range) throw option_error(name + " must be " + range_text() + ", got " + python_repr(value));
    return type == "float" ? Json(value.get<double>()) : value;
}

namespace {

using UpscaleField = std::variant<std::string UpscaleOptions::*, std::int64_t UpscaleOptions::*,
                                  double UpscaleOptions::*, bool UpscaleOptions::*>;
const char *const kFieldTypes[] = {"str", "int", "float", "bool"};  // the options table's type of each alternative

// Every option UpscaleOptions holds, by its name in the options table.
const std::vector<std::pair<std::string, UpscaleField>> &upscale_fields() {
    static const std::vector<std::pair<std::string, UpscaleField>> fields = {
        {"prompt", &UpscaleOptions::prompt},
        {"added_prompt", &UpscaleOptions::added_prompt},
        {"negative_prompt", &UpscaleOptions::negative_prompt},
        {"color_fix", &UpscaleOptions::color_fix},
        {"start_point", &UpscaleOptions::start_point},
        {"guidance", &UpscaleOptions::guidance},
        {"conditioning_scale", &UpscaleOptions::conditioning_scale},
        {"steps", &UpscaleOptions::steps},
        {"process_size", &UpscaleOptions::process_size},
        {"upscale", &UpscaleOptions::upscale},
        {"latent_tile_size", &UpscaleOptions::latent_tile_size},
        {"latent_tile_overlap", &UpscaleOptions::latent_tile_overlap},
        {"vae_encoder_tile_size", &UpscaleOptions::vae_encoder_tile_size},
        {"vae_decoder_tile_size", &UpscaleOptions::vae_decoder_tile_size},
        {"seed", &UpscaleOptions::seed},
        {"max_pixels", &UpscaleOptions::max_pixels},
        {"tiled_vae", &UpscaleOptions::tiled_vae},
    };
    return fields;
}

}  // namespace

OptionTable OptionTable::from_pipeline(const Json &pipeline, const std::string &bundle) {
    if (!pipeline.contains("options")) {
        throw bundle_error(bundle + ": the manifest records no pipeline.options (the bundle predates it); "
                                    "rebuild the bundle with this version of `seesr-export build`");
    }
    OptionTable table;
    table.json_text_ = pipeline["options"].dump();
    for (const Json &entry : pipeline["options"]) {
        OptionSpec spec;
        spec.name = entry["name"].get<std::string>();
        spec.type = entry["type"].get<std::string>();
        spec.default_value = entry["default"];
        if (entry.contains("minimum") && entry["minimum"].is_number()) spec.minimum = entry["minimum"];
        if (entry.contains("maximum") && entry["maximum"].is_number()) spec.maximum = entry["maximum"];
        if (entry.contains("choices") && entry["choices"].is_array()) {
            spec.choices.assign(entry["choices"].begin(), entry["choices"].end());
        }
        try {
            spec.checked(spec.default_value);
        } catch (const Failure &bad_default) {
            throw bundle_error(bundle + ": pipeline.options: the default of " + bad_default.what());
        }
        table.specs_.push_back(std::move(spec));
    }
    for (const auto &[name, field] : upscale_fields()) {
        const std::string expected = kFieldTypes[field.index()];
        auto found = std::find_if(table.specs_.begin(), table.specs_.end(), [&](const OptionSpec &s) { return s.name == name; });
        if (found == table.specs_.end()) {
            throw bundle_error(bundle + ": pipeline.options in manifest.json has no option '" + name +
                               "', which this runtime reads (as " + expected + ")");
        }
        if (found->type != expected) {
            throw bundle_error(bundle + ": pipeline.options in manifest.json gives option '" + name + "' type " +
                               found->type + ", but this runtime reads it as " + expected);
        }
    }
    return table;
}

const OptionSpec &OptionTable::spec(const std::string &name) const {
    auto found = std::find_if(specs_.begin(), specs_.end(), [&](const OptionSpec &s) { return s.name == name; });
    if (found != specs_.end()) return *found;
    std::string known;
    for (const auto &s : specs_) known += (known.empty() ? "'" : ", '") + s.name + "'";
    throw Failure(SEESR_ERROR_OPTION, "unknown option '" + name + "'; known: [" + known + "]");
}

std::map<std::string, Json> OptionTable::resolve(const std::map<std::string, Json> &given) const {
    std::map<std::string, Json> values;
    for (const auto &spec : specs_) values[spec.name] = spec.default_value;
    for (const auto &[name, value] : given) values[name] = spec(name).checked(value);
    // The one rule between options (options.py `resolve`): tiles must overlap by less than their size.
    auto overlap = values.find("latent_tile_overlap"), tile = values.find("latent_tile_size");
    if (overlap != values.end() && tile != values.end() && overlap->second >= tile->second) {
        throw Failure(SEESR_ERROR_OPTION, "latent_tile_overlap must be smaller than latent_tile_size (" +
                                              tile->second.dump() + "), got " + overlap->second.dump());
    }
    return values;
}

UpscaleOptions OptionTable::upscale_options(const std::map<std::string, Json> &given) const {
    const std::map<std::string, Json> values = resolve(given);
    UpscaleOptions typed;
    for (const auto &[name, field] : upscale_fields()) {
        const Json &value = values.at(name);  // present: from_pipeline checked the table
        std::visit(
            [&](auto member) { typed.*member = value.get<std::remove_reference_t<decltype(typed.*member)>>(); }, field);
    }
    return typed;
}

}  // namespace seesr
