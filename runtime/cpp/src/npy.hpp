// Reading a .npy array (the bundle's precomputed negative prompt embedding): little-endian float32 or float16,
// C order, as float32. Anything else is refused naming what the file holds.
#pragma once

#include "tensor.hpp"

#include <filesystem>

namespace seesr {

Tensor read_npy_f32(const std::filesystem::path &path, const std::string &what);

}  // namespace seesr
