// sha256 verification of a bundle's files on open, by the Python runtime's rule (seesr_runtime/verification.py):
// "always" hashes every pinned file; "auto" trusts the verification stamp (.seesr-verified.json in the bundle,
// else in $XDG_CACHE_HOME/seesr/verified/) for files whose size, mtime, ctime and inode are those it recorded
// with the same sha256, hashes the rest and writes the stamp again. Either runtime reads the other's stamps.
#pragma once

#include "manifest.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace seesr {

inline constexpr const char *kStampFile = ".seesr-verified.json";

enum class VerifyMode { automatic, always };

struct Verification {
    std::vector<std::string> hashed;   // relative paths hashed this time
    std::vector<std::string> trusted;  // those the stamp vouched for
    std::filesystem::path stamp;       // where the stamp was written ("" : not written)
};

// Where a bundle's stamp is read and written, in order of preference (as stamp_locations).
std::vector<std::filesystem::path> stamp_locations(const std::filesystem::path &root);

// Check every file `manifest` pins; a bundle error naming the bundle and every missing or altered file.
Verification verify_bundle(const Manifest &manifest, VerifyMode mode);

}  // namespace seesr
