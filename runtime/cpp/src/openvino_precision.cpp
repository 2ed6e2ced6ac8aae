#include "openvino_precision.hpp"

#include <openvino/op/constant.hpp>
#include <openvino/op/convert.hpp>
#include <openvino/op/matmul.hpp>
#include <openvino/op/multiply.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/pass/constant_folding.hpp>
#include <openvino/pass/manager.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <unordered_set>
#include <vector>

namespace ov::pass {
// Exported by libopenvino (it is what the Python backend's compress_model_transformation runs) but declared in a
// header OpenVINO's packages do not install. Weak: a release without it still loads, keeping f32 weights.
__attribute__((weak, visibility("default"))) void compress_model_to_f16(const std::shared_ptr<ov::Model> &model,
                                                                        bool postponed);
}  // namespace ov::pass

namespace seesr {
namespace {

const std::vector<PrecisionPolicy> kPolicies = {
    {"fp32", "fp32", "f32", ""},
    {"bf16", "fp32", "bf16", "BF16"},
    {"fp16", "fp32", "f16", "FP16"},       // Intel GPUs (their default); CPUs only with AMX-FP16
    {"int8", "int8", "f32", "INT8"},       // Q/DQ UNet and ControlNet; fp32 graphs for the other networks
    {"int8-bf16", "int8", "bf16", "BF16"}, // the same, with bf16 for what the Q/DQ graphs leave in float
};

using NodeSet = std::unordered_set<const ov::Node *>;

std::shared_ptr<ov::op::v0::Parameter> timestep_parameter(const ov::Model &model) {
    for (const auto &parameter : model.get_parameters()) {
        if (parameter->get_output_tensor(0).get_names().count("timestep")) return parameter;
    }
    return nullptr;
}

bool all_inputs_in(const ov::Node &op, const NodeSet &a, const NodeSet &b) {
    const ov::OutputVector inputs = op.input_values();
    return std::all_of(inputs.begin(), inputs.end(), [&](const ov::Output<ov::Node> &input) {
        return a.count(input.get_node()) || b.count(input.get_node());
    });
}

// Ops computed from `timestep` and constants alone, in `ops`' topological order. Shapes are static by now, so
// ShapeOf and what follows from shapes and constants counts as constant (the timestep's batch expansion reads
// the sample's shape).
NodeSet timestep_only(const ov::NodeVector &ops, const ov::Node *timestep) {
    NodeSet constant, derived = {timestep};
    for (const auto &op : ops) {
        const std::string kind = op->get_type_name();
        if (kind == "Parameter" || kind == "Result") continue;
        if (kind == "Constant" || kind == "ShapeOf" || all_inputs_in(*op, constant, constant)) {
            constant.insert(op.get());
        } else if (all_inputs_in(*op, constant, derived)) {
            derived.insert(op.get());
        }
    }
    derived.erase(timestep);
    return derived;
}

// The outputs of the path's ops that something outside the path reads, in topological order.
std::vector<ov::Output<ov::Node>> path_boundary(const ov::NodeVector &ops, const NodeSet &path) {
    std::vector<ov::Output<ov::Node>> cut;
    for (const auto &op : ops) {
        if (!path.count(op.get())) continue;
        for (const auto &output : op->outputs()) {
            const auto targets = output.get_target_inputs();
            const auto outside = [&](const ov::Input<ov::Node> &target) { return !path.count(target.get_node()); };
            if (std::any_of(targets.begin(), targets.end(), outside)) cut.push_back(output);
        }
    }
    return cut;
}

}  // namespace

const std::vector<PrecisionPolicy> &precision_policies() { return kPolicies; }

const PrecisionPolicy *precision_policy(const std::string &precision) {
    for (const PrecisionPolicy &policy : kPolicies) {
        if (policy.name == precision) return &policy;
    }
    return nullptr;
}

std::string precision_names() {
    std::string text;
    for (const PrecisionPolicy &policy : kPolicies) text += (text.empty() ? "'" : ", '") + policy.name + "'";
    return "[" + text + "]";
}

bool reduced_hint(const PrecisionPolicy &policy) { return policy.hint == "bf16" || policy.hint == "f16"; }

bool keeps_timestep_f32(const std::string &network) { return network == "unet" || network == "controlnet"; }

bool compresses_weights(const PrecisionPolicy &policy) { return reduced_hint(policy) && policy.graphs == "fp32"; }

std::shared_ptr<ov::Model> split_timestep_path(const std::shared_ptr<ov::Model> &model) {
    const auto timestep = timestep_parameter(*model);
    if (!timestep) return nullptr;
    ov::pass::Manager folding;
    folding.register_pass<ov::pass::ConstantFolding>();  // static shapes: ShapeOf(sample) becomes a constant
    folding.run_passes(model);
    const ov::NodeVector ops = model->get_ordered_ops();
    const NodeSet path = timestep_only(ops, timestep.get());
    const std::vector<ov::Output<ov::Node>> cut = path_boundary(ops, path);

    // The path's own model is built from a copy (the original is rewired below); its nodes found by name.
    const std::shared_ptr<ov::Model> copy = model->clone();
    std::map<std::string, std::shared_ptr<ov::Node>> copies;
    for (const auto &op : copy->get_ordered_ops()) copies[op->get_friendly_name()] = op;
    ov::ParameterVector inputs;
    ov::OutputVector outputs;
    for (std::size_t i = 0; i < cut.size(); ++i) {
        const std::string name = kTimestepPathPrefix + std::to_string(i);
        auto parameter = std::make_shared<ov::op::v0::Parameter>(cut[i].get_element_type(), cut[i].get_partial_shape());
        parameter->set_friendly_name(name);
        parameter->output(0).get_tensor().set_names({name});
        for (ov::Input<ov::Node> target : cut[i].get_target_inputs()) {  // a copy of the set: rewired in the loop
            if (!path.count(target.get_node())) target.replace_source_output(parameter->output(0));
        }
        inputs.push_back(parameter);
        ov::Output<ov::Node> copied = copies.at(cut[i].get_node()->get_friendly_name())->output(cut[i].get_index());
        copied.get_tensor().set_names({name});
        outputs.push_back(copied);
    }
    model->add_parameters(inputs);
    model->remove_parameter(timestep);
    model->validate_nodes_and_infer_types();
    return std::make_shared<ov::Model>(outputs, ov::ParameterVector{timestep_parameter(*copy)}, "timestep_path");
}

void compress_weights_to_f16(const std::shared_ptr<ov::Model> &model) {
    if (ov::pass::compress_model_to_f16 != nullptr) ov::pass::compress_model_to_f16(model, false);
}

std::size_t compress_linear_weights_int8(const std::shared_ptr<ov::Model> &model) {
    std::size_t compressed = 0;
    for (const std::shared_ptr<ov::Node> &op : model->get_ordered_ops()) {
        const auto matmul = std::dynamic_pointer_cast<ov::op::v0::MatMul>(op);
        if (!matmul) continue;
        const auto weights = std::dynamic_pointer_cast<ov::op::v0::Constant>(matmul->get_input_node_shared_ptr(1));
        if (!weights || weights->get_element_type() != ov::element::f32 || weights->get_shape().size() != 2) continue;
        const ov::Shape shape = weights->get_shape();
        const std::size_t rows = shape[0], columns = shape[1];
        // one scale per output channel: the maximum over the input-channel axis (1 when transposed, else 0)
        const bool transposed = matmul->get_transpose_b();
        const float *values = weights->get_data_ptr<float>();
        std::vector<float> scale(transposed ? rows : columns, 0.0f);
        for (std::size_t r = 0; r < rows; ++r) {
            for (std::size_t c = 0; c < columns; ++c) {
                float &most = scale[transposed ? r : c];
                most = std::max(most, std::fabs(values[r * columns + c]));
            }
        }
        for (float &s : scale) s = s == 0.0f ? 1.0f : s / 127.0f;  // numpy: max / float32(127), zeros to 1
        std::vector<std::int8_t> quantized(rows * columns);
        for (std::size_t r = 0; r < rows; ++r) {
            for (std::size_t c = 0; c < columns; ++c) {
                const float q = std::nearbyint(values[r * columns + c] / scale[transposed ? r : c]);  // half to even
                quantized[r * columns + c] = static_cast<std::int8_t>(std::clamp(q, -127.0f, 127.0f));
            }
        }
        const ov::Shape scale_shape = transposed ? ov::Shape{rows, 1} : ov::Shape{1, columns};
        const auto stored = std::make_shared<ov::op::v0::Constant>(ov::element::i8, shape, quantized);
        const auto widened = std::make_shared<ov::op::v0::Convert>(stored, ov::element::f32);
        const auto scales = std::make_shared<ov::op::v0::Constant>(ov::element::f32, scale_shape, scale);
        const auto decompressed = std::make_shared<ov::op::v1::Multiply>(widened, scales);
        matmul->input(1).replace_source_output(decompressed->output(0));
        ++compressed;
    }
    return compressed;
}

}  // namespace seesr
