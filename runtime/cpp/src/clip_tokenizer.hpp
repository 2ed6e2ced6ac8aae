// CLIP's byte-level BPE tokenizer, read from a bundle's tokenizer.json, giving the ids the Python runtime
// gets from the `tokenizers` package (seesr_runtime/text.py): added tokens matched in the raw text, NFC,
// whitespace runs to one space, lowercase, CLIP's pre-tokenisation, byte-level BPE with "</w>" word ends,
// truncation, BOS/EOS and padding to a fixed length. Only that layout is accepted: any other tokenizer.json
// is refused, naming the component that differs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace seesr {

class ClipTokenizer {
public:
    static ClipTokenizer from_file(const std::filesystem::path &path);

    // Exactly length() ids for UTF-8 `text`; an invalid-argument failure for text that is not UTF-8.
    std::vector<std::int64_t> encode(const std::string &text) const;
    std::size_t length() const { return length_; }

    struct PairHash {
        std::size_t operator()(const std::pair<std::int32_t, std::int32_t> &pair) const noexcept {
            return std::hash<std::int64_t>()((static_cast<std::int64_t>(pair.first) << 32) ^ pair.second);
        }
    };

private:
    struct Merge {
        std::int32_t rank;
        std::int32_t merged;  // id of the joined symbol
    };

    void append_word_ids(const std::u32string &word, std::vector<std::int64_t> &ids) const;
    void append_segment_ids(const std::u32string &segment, std::vector<std::int64_t> &ids) const;

    std::unordered_map<std::string, std::int32_t> vocab_;
    std::unordered_map<std::pair<std::int32_t, std::int32_t>, Merge, PairHash> merges_;
    std::vector<std::pair<std::u32string, std::int32_t>> added_;  // matched in the raw text, longest first
    std::string word_end_ = "</w>";
    std::int32_t unknown_ = 0, begin_ = 0, end_ = 0, pad_ = 0;
    std::size_t length_ = 0;
};

}  // namespace seesr
