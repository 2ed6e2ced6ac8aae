// CLIP's byte-level BPE tokenizer, read from a bundle's tokenizer.json, giving the ids the Python runtime
// gets from the `tokenizers` package (seesr_runtime/text.py): unnormalized added tokens cut from the raw text;
// NFC, whitespace runs to one space, lowercase; normalized added tokens cut from that; CLIP's pre-tokenisation,
// byte-level BPE with "</w>" word ends, truncation, BOS/EOS and padding to a fixed length. Only that layout is
// accepted: any other tokenizer.json is refused, naming the component that differs.
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
    struct AddedToken {
        std::u32string content;  // normalized already when matched in normalized text
        std::int32_t id;
    };
    // A stretch of text between added tokens (added_id < 0), or one added token.
    struct Piece {
        std::u32string text;
        std::int32_t added_id;
    };

    struct Merge {
        std::int32_t rank;
        std::int32_t merged;  // id of the joined symbol
    };

    void append_word_ids(const std::u32string &word, std::vector<std::int64_t> &ids) const;
    void append_normalized_ids(const std::u32string &text, std::vector<std::int64_t> &ids) const;
    static std::vector<Piece> split_at_added(const std::u32string &text, const std::vector<AddedToken> &tokens);

    std::unordered_map<std::string, std::int32_t> vocab_;
    std::unordered_map<std::pair<std::int32_t, std::int32_t>, Merge, PairHash> merges_;
    // Both sorted longest first. Like the tokenizers package, unnormalized ones are matched in the raw text and
    // normalized ones in each normalized stretch between those, so "<|EndOfText|>" can match "<|endoftext|>".
    std::vector<AddedToken> raw_added_, normalized_added_;
    std::string word_end_ = "</w>";
    std::int32_t unknown_ = 0, begin_ = 0, end_ = 0, pad_ = 0;
    std::size_t length_ = 0;
};

}  // namespace seesr
