#include "clip_tokenizer.hpp"

#include "failure.hpp"
#include "unicode_text.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <queue>
#include <sstream>

namespace seesr {
namespace {

using Json = nlohmann::json;

// The pre-tokenisation pattern CLIP's tokenizer.json carries; pieces are cut by hand-written matchers
// (clip_piece, byte_level_piece) that follow it, so any other pattern is refused rather than misread.
const char *const kClipPattern =
    R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+)";

// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for 256 + n.
std::array<std::string, 256> byte_characters() {
    std::array<std::string, 256> table;
    int next = 256;
    for (int byte = 0; byte < 256; ++byte) {
        bool printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
        table[byte] = unicode::encode(std::u32string(1, static_cast<char32_t>(printable ? byte : next++)));
    }
    return table;
}

std::size_t contraction(const std::u32string &s, std::size_t at) {
    if (s[at] != U'\'') return 0;
    for (const std::u32string suffix : {U"s", U"t", U"re", U"ve", U"m", U"ll", U"d"}) {
        if (s.compare(at + 1, suffix.size(), suffix) == 0) return 1 + suffix.size();
    }
    return 0;
}

template <typename Predicate>
std::size_t run(const std::u32string &s, std::size_t at, Predicate in_run) {
    std::size_t end = at;
    while (end < s.size() && in_run(s[end])) ++end;
    return end - at;
}

bool is_other(char32_t c) { return !unicode::is_space(c) && !unicode::is_letter(c) && !unicode::is_number(c); }

// Length of the CLIP pattern's match at `at`; 0 at whitespace, which the split removes.
std::size_t clip_piece(const std::u32string &s, std::size_t at) {
    for (const std::u32string literal : {U"<|startoftext|>", U"<|endoftext|>"}) {
        if (s.compare(at, literal.size(), literal) == 0) return literal.size();
    }
    if (std::size_t n = contraction(s, at)) return n;
    if (unicode::is_letter(s[at])) return run(s, at, unicode::is_letter);
    if (unicode::is_number(s[at])) return 1;
    return run(s, at, is_other);
}

// Length of the byte-level pre-tokenizer's (GPT-2's) match at `at` inside a CLIP piece. A piece holds no
// whitespace, so only the contraction, letter, number and other-character alternatives can match.
std::size_t byte_level_piece(const std::u32string &s, std::size_t at) {
    if (std::size_t n = contraction(s, at)) return n;
    if (unicode::is_letter(s[at])) return run(s, at, unicode::is_letter);
    if (unicode::is_number(s[at])) return run(s, at, unicode::is_number);
    return run(s, at, is_other);
}

std::u32string normalized(const std::u32string &segment) {
    std::u32string composed = unicode::nfc(segment), out;
    out.reserve(composed.size());
    for (std::size_t at = 0; at < composed.size();) {
        if (std::size_t spaces = run(composed, at, unicode::is_space)) {
            out.push_back(U' ');
            at += spaces;
        } else {
            unicode::append_lowercase(composed[at++], out);
        }
    }
    return out;
}

// ------------------------------------------------------------ reading tokenizer.json

class Layout {
public:
    Layout(const std::filesystem::path &path, const Json &data) : path_(path.string()), data_(data) {}

    void require(bool ok, const std::string &what) const {
        if (!ok) {
            throw bundle_error(path_ + ": " + what + "; this runtime reads CLIP's tokenizer layout only (the one "
                                                     "`seesr-export build` writes)");
        }
    }

    const Json &at(const char *pointer) const {
        const Json::json_pointer where(pointer);
        require(data_.contains(where), std::string("no ") + pointer);
        return data_.at(where);
    }

    void check_normalizer() const {
        const Json &steps = at("/normalizer/normalizers");
        bool clip = at("/normalizer/type") == "Sequence" && steps.size() == 3 && steps[0].value("type", "") == "NFC" &&
                    steps[1].value("type", "") == "Replace" &&
                    steps[1].value("/pattern/Regex"_json_pointer, "") == R"(\s+)" &&
                    steps[1].value("content", "") == " " && steps[2].value("type", "") == "Lowercase";
        require(clip, "normalizer " + at("/normalizer").dump() + " is not CLIP's (NFC, whitespace to ' ', lowercase)");
    }

    void check_pre_tokenizer() const {
        const Json &steps = at("/pre_tokenizer/pretokenizers");
        bool clip = at("/pre_tokenizer/type") == "Sequence" && steps.size() == 2 &&
                    steps[0].value("type", "") == "Split" &&
                    steps[0].value("/pattern/Regex"_json_pointer, "") == kClipPattern &&
                    steps[0].value("behavior", "") == "Removed" && steps[0].value("invert", false) &&
                    steps[1].value("type", "") == "ByteLevel" && !steps[1].value("add_prefix_space", true) &&
                    steps[1].value("use_regex", false);
        require(clip, "pre_tokenizer " + at("/pre_tokenizer").dump() + " is not CLIP's");
    }

    void check_model() const {
        const Json &model = at("/model");
        bool clip = model.value("type", "") == "BPE" && model.value("dropout", Json()).is_null() &&
                    !model.value("byte_fallback", false) && !model.value("fuse_unk", false) &&
                    model.value("continuing_subword_prefix", Json("")).get<std::string>().empty() &&
                    model.value("end_of_word_suffix", "") == "</w>" && model.value("unk_token", Json()).is_string() &&
                    model.value("vocab", Json()).is_object() && model.value("merges", Json()).is_array();
        require(clip, "model (type " + model.value("type", Json()).dump() +
                          ") is not a BPE with '</w>' word ends, no dropout and no byte fallback");
    }

private:
    std::string path_;
    const Json &data_;
};

std::pair<std::string, std::string> merge_pair(const Json &merge, const Layout &layout) {
    if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
        return {merge[0].get<std::string>(), merge[1].get<std::string>()};
    }
    const std::string text = merge.is_string() ? merge.get<std::string>() : "";
    const auto space = text.find(' ');
    layout.require(space != std::string::npos && space > 0 && space + 1 < text.size(),
                   "merge " + merge.dump() + " is neither [left, right] nor \"left right\"");
    return {text.substr(0, space), text.substr(space + 1)};
}

// One entry of added_tokens. The tokenizers package requires all four flags; stripping the whitespace around a
// token (lstrip, rstrip) and matching whole words only (single_word) are not implemented here, so are refused.
struct AddedEntry {
    std::string content;
    std::int32_t id;
    bool normalized;
};

AddedEntry read_added_token(const Json &added, const Layout &layout) {
    const std::string name = "added token " + added.dump();
    layout.require(added.is_object() && added.value("content", Json()).is_string() &&
                       !added["content"].get<std::string>().empty() && added.value("id", Json()).is_number_unsigned(),
                   name + " has no content or no id (a non-negative integer)");
    for (const char *flag : {"normalized", "lstrip", "rstrip", "single_word"}) {
        layout.require(added.value(flag, Json()).is_boolean(), name + ": \"" + flag + "\" is not true or false");
    }
    for (const char *flag : {"lstrip", "rstrip", "single_word"}) {
        layout.require(!added[flag].get<bool>(), name + ": \"" + flag +
                                                     "\" is true (stripping whitespace around added tokens and "
                                                     "matching them as whole words only are not implemented)");
    }
    return {added["content"].get<std::string>(), added["id"].get<std::int32_t>(), added["normalized"].get<bool>()};
}

Json read_json(const std::filesystem::path &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw bundle_error(path.string() + ": cannot be read (the bundle's text tokenizer)");
    std::stringstream text;
    text << in.rdbuf();
    try {
        return Json::parse(text.str());
    } catch (const Json::exception &error) {
        throw bundle_error(path.string() + ": not valid JSON: " + error.what());
    }
}

}  // namespace

ClipTokenizer ClipTokenizer::from_file(const std::filesystem::path &path) {
    const Json data = read_json(path);
    const Layout layout(path, data);
    layout.require(data.is_object(), "not a JSON object");
    layout.check_normalizer();
    layout.check_pre_tokenizer();
    layout.check_model();

    ClipTokenizer tokenizer;
    for (const auto &[token, id] : layout.at("/model/vocab").items()) {
        layout.require(id.is_number_integer(), "vocab id of " + token + " is not an integer");
        tokenizer.vocab_[token] = id.get<std::int32_t>();
    }
    auto id_of = [&](const std::string &token, const std::string &what) {
        auto found = tokenizer.vocab_.find(token);
        layout.require(found != tokenizer.vocab_.end(), what + " '" + token + "' is not in the vocabulary");
        return found->second;
    };
    const Json &merges = layout.at("/model/merges");
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
        auto [left, right] = merge_pair(merges[rank], layout);
        auto key = std::make_pair(id_of(left, "merge part"), id_of(right, "merge part"));
        // A repeated pair keeps its first (best) rank, as the tokenizers package does.
        tokenizer.merges_.emplace(key, Merge{static_cast<std::int32_t>(rank), id_of(left + right, "merge result")});
    }
    tokenizer.unknown_ = id_of(layout.at("/model/unk_token").get<std::string>(), "unk_token");

    for (const Json &added : layout.at("/added_tokens")) {
        const AddedEntry entry = read_added_token(added, layout);
        std::u32string content = unicode::decode(entry.content, "an added token");
        if (!entry.normalized) {
            tokenizer.raw_added_.push_back({content, entry.id});
            continue;
        }
        // Matched in normalized text, so by its own normalized form (as the tokenizers package builds its matcher).
        content = normalized(content);
        for (const AddedToken &other : tokenizer.normalized_added_) {
            layout.require(other.content != content,
                           "added token " + added.dump() + " normalizes to the same text as the one with id " +
                               std::to_string(other.id) + ", so only one of them could ever match");
        }
        tokenizer.normalized_added_.push_back({content, entry.id});
    }
    for (auto *added : {&tokenizer.raw_added_, &tokenizer.normalized_added_}) {
        std::stable_sort(added->begin(), added->end(),
                         [](const AddedToken &a, const AddedToken &b) { return a.content.size() > b.content.size(); });
    }

    const Json &post = layout.at("/post_processor");
    layout.require(post.value("type", "") == "RobertaProcessing" && post.value("cls", Json()).is_array() &&
                       post.value("sep", Json()).is_array(),
                   "post_processor " + post.dump() + " is not CLIP's (RobertaProcessing: BOS, text, EOS)");
    tokenizer.begin_ = post["cls"].at(1).get<std::int32_t>();
    tokenizer.end_ = post["sep"].at(1).get<std::int32_t>();

    const Json &truncation = layout.at("/truncation"), &padding = layout.at("/padding");
    layout.require(truncation.is_object() && truncation.value("direction", "") == "Right" &&
                       truncation.value("max_length", Json()).is_number_unsigned(),
                   "truncation " + truncation.dump() + " is not to the right at a max_length");
    layout.require(padding.is_object() && padding.value("direction", "") == "Right" &&
                       padding.value("/strategy/Fixed"_json_pointer, Json()) == truncation["max_length"] &&
                       padding.value("pad_id", Json()).is_number_integer(),
                   "padding " + padding.dump() + " is not to the right, to the truncation's max_length");
    tokenizer.length_ = truncation["max_length"].get<std::size_t>();
    layout.require(tokenizer.length_ >= 2, "max_length " + std::to_string(tokenizer.length_) + " leaves no room");
    tokenizer.pad_ = padding["pad_id"].get<std::int32_t>();
    return tokenizer;
}

void ClipTokenizer::append_word_ids(const std::u32string &word, std::vector<std::int64_t> &ids) const {
    static const std::array<std::string, 256> byte_chars = byte_characters();
    const std::string bytes = unicode::encode(word);
    struct Symbol {
        std::int32_t id;
        std::int64_t prev, next;
        bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(bytes.size());
    for (std::size_t i = 0; i < bytes.size(); ++i) {
        std::string character = byte_chars[static_cast<unsigned char>(bytes[i])];
        if (i + 1 == bytes.size()) character += word_end_;
        auto found = vocab_.find(character);
        symbols.push_back({found == vocab_.end() ? unknown_ : found->second, static_cast<std::int64_t>(i) - 1,
                           i + 1 < bytes.size() ? static_cast<std::int64_t>(i + 1) : -1, true});
    }
    // Lowest rank first, then leftmost: the order in which the tokenizers package merges.
    struct Candidate {
        std::int32_t rank;
        std::int64_t left;
        std::int32_t merged;
        bool operator>(const Candidate &other) const {
            return rank != other.rank ? rank > other.rank : left > other.left;
        }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    auto consider = [&](std::int64_t left) {
        if (left < 0 || symbols[left].next < 0) return;
        auto found = merges_.find({symbols[left].id, symbols[symbols[left].next].id});
        if (found != merges_.end()) queue.push({found->second.rank, left, found->second.merged});
    };
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) consider(static_cast<std::int64_t>(i));
    while (!queue.empty()) {
        const Candidate top = queue.top();
        queue.pop();
        Symbol &left = symbols[top.left];
        if (!left.alive || left.next < 0) continue;
        auto current = merges_.find({left.id, symbols[left.next].id});
        if (current == merges_.end() || current->second.merged != top.merged) continue;  // stale
        Symbol &right = symbols[left.next];
        right.alive = false;
        left.id = top.merged;
        left.next = right.next;
        if (right.next >= 0) symbols[right.next].prev = top.left;
        consider(left.prev);
        consider(top.left);
    }
    for (const Symbol &symbol : symbols) {
        if (symbol.alive) ids.push_back(symbol.id);
    }
}

void ClipTokenizer::append_normalized_ids(const std::u32string &text, std::vector<std::int64_t> &ids) const {
    const std::size_t room = length_ - 2;
    for (std::size_t at = 0; at < text.size() && ids.size() < room;) {
        const std::size_t piece = clip_piece(text, at);
        if (piece == 0) {
            ++at;
            continue;
        }
        const std::u32string clip = text.substr(at, piece);
        for (std::size_t inner = 0; inner < clip.size() && ids.size() < room;) {
            const std::size_t word = std::max<std::size_t>(1, byte_level_piece(clip, inner));
            append_word_ids(clip.substr(inner, word), ids);
            inner += word;
        }
        at += piece;
    }
}

std::vector<ClipTokenizer::Piece> ClipTokenizer::split_at_added(const std::u32string &text,
                                                                const std::vector<AddedToken> &tokens) {
    std::vector<Piece> pieces;
    std::size_t start = 0;
    for (std::size_t at = 0; at < text.size();) {
        // Leftmost, then longest (tokens is sorted longest first); no whitespace is stripped around a match.
        auto token = std::find_if(tokens.begin(), tokens.end(), [&](const AddedToken &candidate) {
            return text.compare(at, candidate.content.size(), candidate.content) == 0;
        });
        if (token == tokens.end()) {
            ++at;
            continue;
        }
        if (at > start) pieces.push_back({text.substr(start, at - start), -1});
        pieces.push_back({std::u32string(), token->id});
        at += token->content.size();
        start = at;
    }
    if (start < text.size()) pieces.push_back({text.substr(start), -1});
    return pieces;
}

std::vector<std::int64_t> ClipTokenizer::encode(const std::string &text) const {
    const std::size_t room = length_ - 2;  // BOS and EOS
    std::vector<std::int64_t> ids;
    // Each stretch is normalized on its own and each piece pre-tokenized on its own, as in the tokenizers package.
    for (const Piece &segment : split_at_added(unicode::decode(text, "the prompt"), raw_added_)) {
        if (ids.size() >= room) break;
        if (segment.added_id >= 0) {
            ids.push_back(segment.added_id);
            continue;
        }
        for (const Piece &piece : split_at_added(normalized(segment.text), normalized_added_)) {
            if (ids.size() >= room) break;
            if (piece.added_id >= 0) {
                ids.push_back(piece.added_id);
            } else {
                append_normalized_ids(piece.text, ids);
            }
        }
    }
    if (ids.size() > room) ids.resize(room);
    ids.insert(ids.begin(), begin_);
    ids.push_back(end_);
    ids.resize(length_, pad_);
    return ids;
}

}  // namespace seesr
