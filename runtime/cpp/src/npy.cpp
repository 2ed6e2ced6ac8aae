#include "npy.hpp"

#include <cstring>
#include <fstream>
#include <regex>

namespace seesr {
namespace {

// IEEE half to float, exactly (every half is a float).
float half_to_float(std::uint16_t half) {
    const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
    std::uint32_t exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu, bits = 0;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa != 0) {  // subnormal: normalise
        int shift = 0;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            ++shift;
        }
        bits = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

std::string header_value(const std::string &header, const char *key, const std::string &fail) {
    const std::regex pattern(std::string("'") + key + "'\\s*:\\s*('[^']*'|True|False|\\([^)]*\\))");
    std::smatch match;
    if (!std::regex_search(header, match, pattern)) throw bundle_error(fail + " (no '" + key + "' in its header)");
    return match[1];
}

Shape parse_shape(const std::string &tuple, const std::string &fail) {
    Shape shape;
    const std::regex number("\\d+");
    for (auto it = std::sregex_iterator(tuple.begin(), tuple.end(), number); it != std::sregex_iterator(); ++it) {
        shape.push_back(std::stoll(it->str()));
        if (shape.back() > (1LL << 32)) throw bundle_error(fail + " (shape " + tuple + " is implausible)");
    }
    return shape;
}

}  // namespace

Tensor read_npy_f32(const std::filesystem::path &path, const std::string &what) {
    const std::string fail = path.string() + ": " + what + " is not a readable .npy array";
    std::ifstream in(path, std::ios::binary);
    char magic[8] = {};
    if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw bundle_error(fail + " (no .npy magic)");
    const int major = static_cast<unsigned char>(magic[6]);
    unsigned char length_bytes[4] = {};
    if (!in.read(reinterpret_cast<char *>(length_bytes), major == 1 ? 2 : 4) || major < 1 || major > 3) {
        throw bundle_error(fail + " (format version " + std::to_string(major) + ")");
    }
    std::uint32_t header_length = length_bytes[0] | (length_bytes[1] << 8);
    if (major > 1) header_length |= (static_cast<std::uint32_t>(length_bytes[2]) << 16) | (static_cast<std::uint32_t>(length_bytes[3]) << 24);
    if (header_length > (1u << 20)) throw bundle_error(fail + " (a header of " + std::to_string(header_length) + " bytes)");
    std::string header(header_length, '\0');
    if (!in.read(header.data(), header_length)) throw bundle_error(fail + " (truncated header)");
    const std::string descr = header_value(header, "descr", fail);
    if (descr != "'<f4'" && descr != "'<f2'") throw bundle_error(fail + " of float32 or float16 (it holds " + descr + ")");
    if (header_value(header, "fortran_order", fail) != "False") throw bundle_error(fail + " in C order");
    const Shape shape = parse_shape(header_value(header, "shape", fail), fail);
    const std::size_t count = element_count(shape);
    std::vector<float> values(count);
    if (descr == "'<f4'") {
        in.read(reinterpret_cast<char *>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
    } else {
        std::vector<std::uint16_t> halves(count);
        in.read(reinterpret_cast<char *>(halves.data()), static_cast<std::streamsize>(count * sizeof(std::uint16_t)));
        for (std::size_t i = 0; i < count; ++i) values[i] = half_to_float(halves[i]);
    }
    if (!in) throw bundle_error(fail + " (fewer values than its shape " + shape_text(shape) + " holds)");
    return Tensor::f32(shape, std::move(values));
}

}  // namespace seesr
