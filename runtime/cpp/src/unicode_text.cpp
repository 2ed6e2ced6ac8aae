#include "unicode_text.hpp"

#include "failure.hpp"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>

namespace seesr::unicode {

std::u32string decode(const std::string &text, const char *what) {
    std::u32string out;
    out.reserve(text.size());
    const auto *bytes = reinterpret_cast<const utf8proc_uint8_t *>(text.data());
    utf8proc_ssize_t at = 0, size = static_cast<utf8proc_ssize_t>(text.size());
    while (at < size) {
        utf8proc_int32_t c = 0;
        utf8proc_ssize_t used = utf8proc_iterate(bytes + at, size - at, &c);
        if (used < 0) {
            throw Failure(SEESR_ERROR_INVALID_ARGUMENT, std::string(what) + " is not valid UTF-8 (byte " +
                                                            std::to_string(at) + ")");
        }
        out.push_back(static_cast<char32_t>(c));
        at += used;
    }
    return out;
}

std::string encode(const std::u32string &text) {
    std::string out;
    out.reserve(text.size());
    utf8proc_uint8_t buffer[4];
    for (char32_t c : text) {
        utf8proc_ssize_t used = utf8proc_encode_char(static_cast<utf8proc_int32_t>(c), buffer);
        out.append(reinterpret_cast<const char *>(buffer), static_cast<std::size_t>(used));
    }
    return out;
}

std::u32string nfc(const std::u32string &text) {
    if (text.empty()) return text;
    const std::string bytes = encode(text);
    utf8proc_uint8_t *composed = nullptr;
    utf8proc_ssize_t size = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t *>(bytes.data()),
                                         static_cast<utf8proc_ssize_t>(bytes.size()), &composed,
                                         static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owned(composed, &std::free);
    if (size < 0) throw Failure(SEESR_ERROR_INTERNAL, std::string("NFC failed: ") + utf8proc_errmsg(size));
    return decode(std::string(reinterpret_cast<const char *>(composed), static_cast<std::size_t>(size)), "text");
}

bool is_space(char32_t c) {
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

bool is_letter(char32_t c) {
    switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
        case UTF8PROC_CATEGORY_LU:
        case UTF8PROC_CATEGORY_LL:
        case UTF8PROC_CATEGORY_LT:
        case UTF8PROC_CATEGORY_LM:
        case UTF8PROC_CATEGORY_LO: return true;
        default: return false;
    }
}

bool is_number(char32_t c) {
    switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
        case UTF8PROC_CATEGORY_ND:
        case UTF8PROC_CATEGORY_NL:
        case UTF8PROC_CATEGORY_NO: return true;
        default: return false;
    }
}

void append_lowercase(char32_t c, std::u32string &out) {
    // The one unconditional multi-character lowercase mapping (SpecialCasing.txt); the rest are simple.
    if (c == 0x130) {
        out += U"i\u0307";
        return;
    }
    out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
}

}  // namespace seesr::unicode
