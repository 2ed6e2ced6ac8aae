// seesr_probe: the library's internals on the command line, for the parity tests in tests/test_cpp_runtime.py.
//
//   seesr_probe manifest BUNDLE            -> {"ok": true, "name": ..., "networks": [...]}
//   seesr_probe tokenize TOKENIZER_JSON    stdin: a JSON list of texts -> {"ok": true, "ids": [[...], ...]}
//
// A failure answers {"ok": false, "status": <seesr_status>, "message": ...}.
//
// Every answer is one JSON object on stdout; exit status 0 unless the command line itself is wrong.
#include "failure.hpp"
#include "clip_tokenizer.hpp"
#include "manifest.hpp"

#include <cstdio>
#include <iostream>
#include <string>

namespace {

using seesr::Json;

Json failure_json(const seesr::Failure &failure) {
    return {{"ok", false}, {"status", static_cast<int>(failure.status())}, {"message", failure.what()}};
}

Json probe_manifest(const std::string &bundle) {
    seesr::Manifest manifest = seesr::Manifest::load(bundle);
    Json networks = Json::array();
    for (const auto &[name, entry] : manifest.data()["networks"].items()) networks.push_back(name);
    return {{"ok", true}, {"name", manifest.data()["name"]}, {"networks", networks}};
}

Json probe_tokenize(const std::string &tokenizer_json) {
    const seesr::ClipTokenizer tokenizer = seesr::ClipTokenizer::from_file(tokenizer_json);
    Json ids = Json::array();
    for (const Json &text : Json::parse(std::cin)) ids.push_back(tokenizer.encode(text.get<std::string>()));
    return {{"ok", true}, {"ids", ids}};
}

}  // namespace

int main(int argc, char **argv) {
    const std::string command = argc > 1 ? argv[1] : "";
    Json answer;
    try {
        if (command == "manifest" && argc == 3) {
            answer = probe_manifest(argv[2]);
        } else if (command == "tokenize" && argc == 3) {
            answer = probe_tokenize(argv[2]);
        } else {
            std::fprintf(stderr, "usage: %s manifest BUNDLE | tokenize TOKENIZER_JSON\n", argv[0]);
            return 64;
        }
    } catch (const seesr::Failure &failure) {
        answer = failure_json(failure);
    }
    std::cout << answer.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
    return 0;
}
