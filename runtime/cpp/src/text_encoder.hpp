// Prompt -> CLIP embeddings, as seesr_runtime/text.py: the bundle's tokenizer.json and text_encoder graph, and
// the default negative prompt's embedding precomputed at build time (the same for every image).
#pragma once

#include "clip_tokenizer.hpp"
#include "engine.hpp"
#include "manifest.hpp"

#include <string>

namespace seesr {

class TextEncoder {
public:
    explicit TextEncoder(const Manifest &manifest);

    const ClipTokenizer &tokenizer() const { return tokenizer_; }
    // [1, tokens, dim] float32.
    Tensor encode(Engine &engine, const std::string &text) const;
    // The precomputed embedding for the bundle's default negative prompt, else encode(text).
    Tensor encode_negative(Engine &engine, const std::string &text) const;

private:
    ClipTokenizer tokenizer_;
    Tensor negative_;
    std::string default_negative_;
};

}  // namespace seesr
