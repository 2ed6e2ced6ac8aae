#include "onnx_refs.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <map>

namespace seesr {
namespace {

enum class Kind { model, training_info, function, graph, node, attribute, sparse_tensor, tensor, entry };

// Field numbers of onnx.proto (stable since IR version 3) whose payload is a message that can hold tensors.
const std::map<Kind, std::map<std::uint64_t, Kind>> &children() {
    static const std::map<Kind, std::map<std::uint64_t, Kind>> table = {
        {Kind::model, {{7, Kind::graph}, {20, Kind::training_info}, {25, Kind::function}}},
        {Kind::training_info, {{1, Kind::graph}, {2, Kind::graph}}},
        {Kind::function, {{7, Kind::node}, {11, Kind::attribute}}},
        {Kind::graph, {{1, Kind::node}, {5, Kind::tensor}, {15, Kind::sparse_tensor}}},
        {Kind::node, {{5, Kind::attribute}}},
        {Kind::attribute,
         {{5, Kind::tensor}, {6, Kind::graph}, {10, Kind::tensor}, {11, Kind::graph}, {22, Kind::sparse_tensor},
          {23, Kind::sparse_tensor}}},
        {Kind::sparse_tensor, {{1, Kind::tensor}, {2, Kind::tensor}}},
        {Kind::tensor, {{13, Kind::entry}}},
        {Kind::entry, {}},
    };
    return table;
}

constexpr int kMaxDepth = 64;  // subgraphs nest (If/Loop bodies); deeper is a malformed or hostile file

class Reader {
public:
    Reader(const std::uint8_t *data, std::set<std::string> &locations) : data_(data), locations_(locations) {}

    void walk(std::size_t start, std::size_t end, Kind kind, int depth) {
        if (depth > kMaxDepth) throw NotProtobuf("messages nested deeper than " + std::to_string(kMaxDepth) + " levels");
        const auto &nested = children().at(kind);
        std::string key, value;
        bool has_value = false;
        for (std::size_t pos = start; pos < end;) {
            const std::uint64_t tag = varint(pos, end);
            const std::uint64_t number = tag >> 3, wire = tag & 7;
            std::size_t first = pos, after = 0;
            if (wire == 0) {
                std::size_t cursor = pos;
                varint(cursor, end);
                after = cursor;
            } else if (wire == 1) {
                after = pos + 8;
            } else if (wire == 2) {
                const std::uint64_t length = varint(first, end);
                if (length > end - first) throw NotProtobuf(past(number, pos));
                after = first + static_cast<std::size_t>(length);
            } else if (wire == 5) {
                after = pos + 4;
            } else {
                throw NotProtobuf("wire type " + std::to_string(wire) + " at byte " + std::to_string(pos));
            }
            if (number == 0 || after > end) throw NotProtobuf(past(number, pos));
            if (kind == Kind::entry && wire == 2 && (number == 1 || number == 2)) {
                std::string text(reinterpret_cast<const char *>(data_ + first), after - first);
                if (number == 1) {
                    key = std::move(text);
                } else {
                    value = std::move(text);
                    has_value = true;
                }
            } else if (wire == 2) {
                auto child = nested.find(number);
                if (child != nested.end()) walk(first, after, child->second, depth + 1);
            }
            pos = after;
        }
        if (kind == Kind::entry && key == "location" && has_value) locations_.insert(value);
    }

private:
    std::uint64_t varint(std::size_t &pos, std::size_t end) const {
        std::uint64_t value = 0;
        for (int shift = 0;; shift += 7) {
            if (pos >= end || shift > 63) throw NotProtobuf("malformed varint at byte " + std::to_string(pos));
            const std::uint8_t byte = data_[pos++];
            value |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
            if (byte < 0x80) return value;
        }
    }
    static std::string past(std::uint64_t number, std::size_t pos) {
        return "field " + std::to_string(number) + " at byte " + std::to_string(pos) +
               " runs past its message (truncated file?)";
    }

    const std::uint8_t *data_;
    std::set<std::string> &locations_;
};

// A read-only map of a whole file, unmapped and closed on every path out.
class MappedFile {
public:
    explicit MappedFile(const std::filesystem::path &path) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd_ < 0) throw std::runtime_error("cannot open " + path.string());
        struct stat info {};
        if (::fstat(fd_, &info) != 0) fail("cannot stat " + path.string());
        size_ = static_cast<std::size_t>(info.st_size);
        if (size_ == 0) return;
        void *mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
        if (mapped == MAP_FAILED) fail("cannot map " + path.string());
        data_ = static_cast<const std::uint8_t *>(mapped);
    }
    ~MappedFile() {
        if (data_ != nullptr) ::munmap(const_cast<std::uint8_t *>(data_), size_);
        if (fd_ >= 0) ::close(fd_);
    }
    MappedFile(const MappedFile &) = delete;
    MappedFile &operator=(const MappedFile &) = delete;
    const std::uint8_t *data() const { return data_; }
    std::size_t size() const { return size_; }

private:
    [[noreturn]] void fail(const std::string &message) {
        ::close(fd_);  // the destructor does not run for a constructor that throws
        throw std::runtime_error(message);
    }

    int fd_ = -1;
    const std::uint8_t *data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace

std::set<std::string> external_data_locations(const std::filesystem::path &graph) {
    MappedFile file(graph);
    std::set<std::string> locations;
    if (file.size() > 0) Reader(file.data(), locations).walk(0, file.size(), Kind::model, 0);
    return locations;
}

}  // namespace seesr
