// The library's one exception type: a status from seesr.h and a message naming the value at fault.
// Thrown anywhere inside; the C ABI turns it into a return code and seesr_last_error().
#pragma once

#include "seesr.h"

#include <stdexcept>
#include <string>

namespace seesr {

class Failure : public std::runtime_error {
public:
    Failure(seesr_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    seesr_status status() const noexcept { return status_; }

private:
    seesr_status status_;
};

inline Failure bundle_error(const std::string &message) { return Failure(SEESR_ERROR_BUNDLE, message); }
inline Failure option_error(const std::string &message) { return Failure(SEESR_ERROR_OPTION, message); }
inline Failure not_implemented(const std::string &what) {
    return Failure(SEESR_ERROR_NOT_IMPLEMENTED, what + " is not implemented in this build of the native runtime yet");
}

}  // namespace seesr
