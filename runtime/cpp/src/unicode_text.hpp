// The Unicode pieces the tokenizer needs, on utf8proc: decoding, NFC, the character classes of the
// tokenizers' regular expressions (Oniguruma's \s, \p{L}, \p{N}) and Rust's per-character lowercase.
#pragma once

#include <string>

namespace seesr::unicode {

// Code points of UTF-8 `text`; an invalid-argument failure naming the offset of the first bad byte.
std::u32string decode(const std::string &text, const char *what);
std::string encode(const std::u32string &text);
std::u32string nfc(const std::u32string &text);
bool is_space(char32_t c);   // White_Space, as \s matches it
bool is_letter(char32_t c);  // \p{L}
bool is_number(char32_t c);  // \p{N}
// Lowercase one code point as Rust's char::to_lowercase does (İ becomes two code points).
void append_lowercase(char32_t c, std::u32string &out);

}  // namespace seesr::unicode
