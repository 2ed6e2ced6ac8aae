// SHA-256 (FIPS 180-4): what a bundle's manifest pins for every file, computed here without a crypto library.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

namespace seesr {

class Sha256 {
public:
    Sha256();
    void update(const void *data, std::size_t size);
    // The digest as 64 lowercase hex digits (hashlib's hexdigest); the object is spent afterwards.
    std::string hexdigest();

private:
    void compress(const std::uint8_t *block);
    std::array<std::uint32_t, 8> state_;
    std::array<std::uint8_t, 64> pending_{};
    std::size_t pending_size_ = 0;
    std::uint64_t total_bytes_ = 0;
};

// The hex sha256 of the file at `path`; a bundle error naming it when it cannot be read.
std::string sha256_file(const std::filesystem::path &path);

}  // namespace seesr
