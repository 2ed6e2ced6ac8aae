// Values worded as the Python runtime words them in its messages (repr of strings and numbers, type
// names), so both runtimes refuse the same input in the same words and the tests can compare them.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace seesr {

std::string python_float(double value);              // repr(float): 0.0, 5.5, 1e+20, nan, inf
std::string python_repr(const std::string &text);    // repr(str): 'a', "it's", 'a\\n'
std::string python_repr(const nlohmann::json &value); // repr of the value JSON decodes to in Python
std::string python_type(const nlohmann::json &value); // type(value).__name__: str, int, float, bool, dict, list

}  // namespace seesr
