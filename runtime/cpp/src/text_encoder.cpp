#include "text_encoder.hpp"

#include "npy.hpp"

namespace seesr {
namespace {

ClipTokenizer open_tokenizer(const Manifest &manifest) {
    const Json &text = manifest.data()["text"];
    ClipTokenizer tokenizer = ClipTokenizer::from_file(manifest.file(text["tokenizer"], "text tokenizer"));
    const Json &expected = text.contains("max_length") ? text["max_length"] : Json();
    if (expected != tokenizer.length()) {
        throw bundle_error(manifest.root().string() + ": tokenizer.json gives " + std::to_string(tokenizer.length()) +
                           " ids, the manifest's text.max_length is " + expected.dump());
    }
    return tokenizer;
}

std::string default_negative(const Manifest &manifest) {
    const Json &negative = manifest.data()["pipeline"].value("negative_prompt", Json());
    if (!negative.is_string()) {
        throw bundle_error(manifest.root().string() + ": pipeline.negative_prompt in manifest.json is " +
                           negative.dump() + ", expected a string");
    }
    return negative.get<std::string>();
}

}  // namespace

TextEncoder::TextEncoder(const Manifest &manifest)
    : tokenizer_(open_tokenizer(manifest)),
      negative_(read_npy_f32(manifest.file(manifest.data()["text"]["negative_prompt_embeds"], "text negative_prompt_embeds"),
                             "the negative prompt's embedding")),
      default_negative_(default_negative(manifest)) {}

Tensor TextEncoder::encode(Engine &engine, const std::string &text) const {
    std::vector<std::int64_t> ids = tokenizer_.encode(text);
    const std::int64_t length = static_cast<std::int64_t>(ids.size());
    std::vector<NamedTensor> feeds;
    feeds.push_back({"input_ids", Tensor::i64({1, length}, std::move(ids))});
    std::vector<Tensor> outputs = engine.run("text_encoder", feeds);
    return std::move(outputs.at(0));
}

Tensor TextEncoder::encode_negative(Engine &engine, const std::string &text) const {
    return text == default_negative_ ? negative_ : encode(engine, text);
}

}  // namespace seesr
