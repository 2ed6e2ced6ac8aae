// The Python OpenVINO backend's precision policy (seesr_runtime/openvino_backend.py), for the native engine:
// which of the bundle's graphs a precision runs, and how a model is prepared under a bf16 / f16 inference
// precision (the timestep path cut out to run in f32, the weights stored as f16). Reproduced step for step so
// that both runtimes compile the same transformed models and give the same numbers.
#pragma once

#include <openvino/core/model.hpp>

#include <memory>
#include <string>
#include <vector>

namespace seesr {

// One row of the Python backend's PRECISIONS table.
struct PrecisionPolicy {
    std::string name;        // "fp32", "bf16", "fp16", "int8", "int8-bf16"
    std::string graphs;      // which graphs of the bundle: "fp32" or "int8" (where a network has them)
    std::string hint;        // OpenVINO's INFERENCE_PRECISION_HINT: "f32", "bf16", "f16"
    std::string capability;  // what the device's OPTIMIZATION_CAPABILITIES must list ("" for nothing)
};

// The table, in its order.
const std::vector<PrecisionPolicy> &precision_policies();
// The row of `precision`, or nullptr for a precision the table lacks.
const PrecisionPolicy *precision_policy(const std::string &precision);
// The table's precisions in its order, as "['fp32', 'bf16', ...]" for messages.
std::string precision_names();

// Whether the policy runs the reduced-precision preparation (a bf16 or f16 hint).
bool reduced_hint(const PrecisionPolicy &policy);
// Whether `network` keeps its timestep path in f32 under a reduced hint (DEFAULT_KEEP_F32: UNet, ControlNet).
bool keeps_timestep_f32(const std::string &network);
// Whether the weights are stored as f16: a reduced hint on the fp32 graphs (int8 graphs keep their scales).
bool compresses_weights(const PrecisionPolicy &policy);

// The name prefix of the inputs the timestep path's outputs become in the main model.
inline constexpr const char *kTimestepPathPrefix = "seesr_timestep_path_";

// split_timestep_path: cut what `model` computes from its `timestep` input alone (after constant folding at
// its static shapes) into a model of its own, whose outputs become inputs kTimestepPathPrefix<i> of `model`
// (changed in place). Returns that model, or nullptr when `model` has no timestep input.
std::shared_ptr<ov::Model> split_timestep_path(const std::shared_ptr<ov::Model> &model);

// compress_weights_to_f16: the model's f32 weights stored as f16, each followed by a Convert back to f32, in
// place (what openvino.save_model(compress_to_fp16=True) does). Where this OpenVINO lacks the transformation
// the weights stay f32 (more memory, same results), as in the Python backend.
void compress_weights_to_f16(const std::shared_ptr<ov::Model> &model);

// compress_linear_weights_int8: the constant f32 weights of `model`'s matrix products (its linear layers) stored
// as int8 with one f32 scale per output channel (symmetric, rounded to nearest even), in place, as the Python
// backend stores them; returns how many. The CPU plugin keeps weights of this form in int8 inside its
// FullyConnected kernels. Convolutions are left alone.
std::size_t compress_linear_weights_int8(const std::shared_ptr<ov::Model> &model);

}  // namespace seesr
