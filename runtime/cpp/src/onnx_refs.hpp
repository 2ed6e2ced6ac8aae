// The external-data files an ONNX graph names, read from its protobuf encoding (no onnx library), as
// seesr_runtime/onnx_refs.py reads them: engines open those files relative to the graph's folder, so the
// manifest checks them before any engine opens the graph. Only messages that can hold tensors are entered;
// everything else (weights included) is skipped by its length, over a read-only memory map.
#pragma once

#include <filesystem>
#include <set>
#include <stdexcept>
#include <string>

namespace seesr {

// The bytes are not a well-formed protobuf message (truncated, or not an ONNX file).
class NotProtobuf : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

std::set<std::string> external_data_locations(const std::filesystem::path &graph);

}  // namespace seesr
