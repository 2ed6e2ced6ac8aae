#include "python_text.hpp"

#include <cmath>
#include <sstream>

namespace seesr {

using Json = nlohmann::json;

// Numbers as Python prints them in messages (2, 0.0, 5.5), so both runtimes word errors alike.
std::string python_float(double value) {
    if (std::isnan(value)) return "nan";
    if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
    std::ostringstream text;
    text.precision(17);
    text << value;
    std::string shown = text.str();
    // Shortest form that reads back the same, as Python's repr.
    for (int digits = 1; digits <= 17; ++digits) {
        std::ostringstream shorter;
        shorter.precision(digits);
        shorter << value;
        if (std::stod(shorter.str()) == value) {
            shown = shorter.str();
            break;
        }
    }
    if (shown.find_first_of(".en") == std::string::npos) shown += ".0";
    return shown;
}

// Python's repr of a string: single quotes unless it holds one and no double quote; control characters escaped.
std::string python_repr(const std::string &text) {
    const bool has_single = text.find('\'') != std::string::npos, has_double = text.find('"') != std::string::npos;
    const char quote = has_single && !has_double ? '"' : '\'';
    std::string out(1, quote);
    for (unsigned char c : text) {
        if (c == '\\' || c == static_cast<unsigned char>(quote)) {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f) {
            const char *hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + quote;
}

std::string python_type(const Json &value) {
    if (value.is_string()) return "str";
    if (value.is_boolean()) return "bool";
    if (value.is_number_integer()) return "int";
    if (value.is_number()) return "float";
    if (value.is_object()) return "dict";
    if (value.is_array()) return "list";
    return "NoneType";
}

std::string python_repr(const Json &value) {
    if (value.is_string()) return python_repr(value.get<std::string>());
    if (value.is_null()) return "None";
    if (value.is_boolean()) return value.get<bool>() ? "True" : "False";
    if (value.is_number_float()) return python_float(value.get<double>());
    return value.dump();
}

}  // namespace seesr
