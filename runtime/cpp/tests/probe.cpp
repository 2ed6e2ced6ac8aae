// seesr_probe: the library's internals on the command line, for the parity tests in tests/test_cpp_runtime.py.
//
//   seesr_probe manifest BUNDLE            -> {"ok": true, "name": ..., "networks": [...]}
//   seesr_probe tokenize TOKENIZER_JSON    stdin: a JSON list of texts -> {"ok": true, "ids": [[...], ...]}
//   seesr_probe timesteps    stdin: {"config": {...}, "steps": [n, ...]}
//                            -> {"ok": true, "alphas_cumprod": [...], "timesteps": [[...] or {"status", "message"}, ...]}
//   seesr_probe sample       stdin: {"config": {...}, "steps": n, "sample": [...], "eps": [[...] per step],
//                            "noise": [[...] per step]} -> {"ok": true, "noised": [...], "samples": [[...] per step]}
//                            ("noised": add_noise(sample, noise[0]) at the first timestep)
//   seesr_probe run BUNDLE NETWORK   stdin: {"engine": "openvino", "device": "CPU", "threads": n,
//                            "feeds": [{"name", "dtype": "float32" | "int64", "shape", "file"}], "out": folder}
//                            -> {"ok": true, "outputs": [{"shape", "file"}]} (raw little-endian files)
//   seesr_probe dape-input   stdin: {"file" (RGB8 rows), "width", "height", "stride", "size", "mean", "std", "out"}
//                            -> {"ok": true, "shape": [...]}, the float32 tensor written to "out"
//   seesr_probe tiles        stdin: {"height", "width", "tile", "overlap"} -> {"ok": true, "origins", "weights"}
//   seesr_probe blend        stdin: {"shape", "tile", "overlap", "field", "out"}: tiles predicted as the field's
//                            window times (1 + the tile's index), blended -> {"ok": true}, the result in "out"
//   seesr_probe noise        stdin: {"seed", "count", "out"} -> {"ok": true}, `count` float32 draws in "out"
//   seesr_probe resize       stdin: {"file" (RGB8 rows), "width", "height", "stride", "to": [w, h], "out"}
//                            -> {"ok": true}, the bicubic-resized RGB8 rows in "out"
//   seesr_probe encode-text BUNDLE   stdin: {"threads": n, "prompts": [...], "negatives": [...], "out": folder}
//                            -> {"ok": true, "prompts": [{"shape", "file"}], "negatives": [{"shape", "file"}]}
//   seesr_probe compiles BUNDLE      stdin: {"threads": n, "options": {...}, "images": [{"file" (RGB8 rows), "width",
//                            "height", "stride"}]} -> {"ok": true, "compiles": [shapes compiled during each upscale]}
//   seesr_probe sha256 FILE...       -> {"ok": true, "sha256": [hex, ...]}
//   seesr_probe verify BUNDLE MODE   (MODE "auto" or "always") -> {"ok": true, "hashed": [...], "trusted": [...],
//                            "stamp": path or ""}
//
// A failure answers {"ok": false, "status": <seesr_status>, "message": ...}.
//
// Every answer is one JSON object on stdout; exit status 0 unless the command line itself is wrong.
#include "failure.hpp"
#include "clip_tokenizer.hpp"
#include "engine.hpp"
#include "imaging.hpp"
#include "noise.hpp"
#include "resample.hpp"
#include "tiling.hpp"
#include "pipeline.hpp"
#include "manifest.hpp"
#include "scheduler.hpp"
#include "sha256.hpp"
#include "verification.hpp"

#include <cstdio>
#include <fstream>
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

Json probe_timesteps(const Json &request) {
    seesr::DdpmScheduler scheduler(seesr::DdpmConfig::from_json(request["config"]));
    Json timesteps = Json::array();
    for (const Json &steps : request["steps"]) {
        try {
            timesteps.push_back(scheduler.set_timesteps(steps.get<int>()));
        } catch (const seesr::Failure &failure) {
            timesteps.push_back({{"status", static_cast<int>(failure.status())}, {"message", failure.what()}});
        }
    }
    return {{"ok", true}, {"alphas_cumprod", scheduler.alphas_cumprod()}, {"timesteps", timesteps}};
}

Json probe_sample(const Json &request) {
    seesr::DdpmScheduler scheduler(seesr::DdpmConfig::from_json(request["config"]));
    const auto &timesteps = scheduler.set_timesteps(request["steps"].get<int>());
    std::vector<float> sample = request["sample"].get<std::vector<float>>();
    const auto eps = request["eps"].get<std::vector<std::vector<float>>>();
    const auto noise = request["noise"].get<std::vector<std::vector<float>>>();
    std::vector<float> noised(sample.size());
    scheduler.add_noise(sample.data(), noise.at(0).data(), sample.size(), timesteps.at(0), noised.data());
    Json samples = Json::array();
    for (std::size_t i = 0; i < timesteps.size(); ++i) {
        scheduler.step(eps.at(i).data(), timesteps[i], sample.data(), noise.at(i).data(), sample.size());
        samples.push_back(sample);
    }
    return {{"ok", true}, {"noised", noised}, {"samples", samples}};
}

template <typename T>
std::vector<T> read_values(const std::string &path, std::size_t count) {
    std::vector<T> values(count);
    std::ifstream in(path, std::ios::binary);
    in.read(reinterpret_cast<char *>(values.data()), static_cast<std::streamsize>(count * sizeof(T)));
    if (!in) throw seesr::Failure(SEESR_ERROR_INVALID_ARGUMENT, "cannot read " + std::to_string(count) + " values from " + path);
    return values;
}

Json probe_run(const std::string &bundle, const std::string &network, const Json &request) {
    const seesr::Manifest manifest = seesr::Manifest::load(bundle);
    seesr::EngineSettings settings;
    settings.device = request.value("device", "CPU");
    settings.threads = request.value("threads", 0);
    settings.precision = request.value("precision", "fp32");
    auto engine = seesr::create_engine(request.value("engine", "openvino"), manifest, settings);
    std::vector<seesr::NamedTensor> feeds;
    for (const Json &feed : request["feeds"]) {
        const seesr::Shape shape = feed["shape"].get<seesr::Shape>();
        const std::string file = feed["file"];
        feeds.push_back({feed["name"], feed["dtype"] == "int64"
                                           ? seesr::Tensor::i64(shape, read_values<std::int64_t>(file, seesr::element_count(shape)))
                                           : seesr::Tensor::f32(shape, read_values<float>(file, seesr::element_count(shape)))});
    }
    Json outputs = Json::array();
    const std::string out = request["out"];
    const auto results = engine->run(network, feeds);
    for (std::size_t i = 0; i < results.size(); ++i) {
        const std::string file = out + "/" + std::to_string(i) + ".bin";
        std::ofstream(file, std::ios::binary)
            .write(reinterpret_cast<const char *>(results[i].f32_data()),
                   static_cast<std::streamsize>(results[i].count() * sizeof(float)));
        outputs.push_back({{"shape", results[i].shape()}, {"file", file}});
    }
    return {{"ok", true}, {"outputs", outputs}};
}

Json probe_dape_input(const Json &request) {
    const std::int32_t width = request["width"], height = request["height"], stride = request["stride"];
    const auto pixels = read_values<std::uint8_t>(request["file"], static_cast<std::size_t>(stride) * height);
    const seesr::Tensor x = seesr::dape_input({pixels.data(), width, height, stride}, request["size"],
                                              request["mean"].get<std::vector<float>>(),
                                              request["std"].get<std::vector<float>>());
    std::ofstream(request["out"].get<std::string>(), std::ios::binary)
        .write(reinterpret_cast<const char *>(x.f32_data()), static_cast<std::streamsize>(x.count() * sizeof(float)));
    return {{"ok", true}, {"shape", x.shape()}};
}

Json written(const seesr::Tensor &tensor, const std::string &file) {
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char *>(tensor.f32_data()), static_cast<std::streamsize>(tensor.count() * sizeof(float)));
    return {{"shape", tensor.shape()}, {"file", file}};
}

Json probe_encode_text(const std::string &bundle, const Json &request) {
    seesr::EngineSettings settings;
    settings.threads = request.value("threads", 0);
    const seesr::Pipeline pipeline(bundle, "openvino", settings);
    const std::string out = request["out"];
    Json prompts = Json::array(), negatives = Json::array();
    for (const Json &text : request["prompts"]) {
        prompts.push_back(written(pipeline.encode_prompt(text), out + "/prompt" + std::to_string(prompts.size()) + ".bin"));
    }
    for (const Json &text : request["negatives"]) {
        negatives.push_back(
            written(pipeline.encode_negative(text), out + "/negative" + std::to_string(negatives.size()) + ".bin"));
    }
    return {{"ok", true}, {"prompts", prompts}, {"negatives", negatives}};
}

// Upscales one after the other through one pipeline, and the shapes its engine compiled during each.
Json probe_compiles(const std::string &bundle, const Json &request) {
    seesr::EngineSettings settings;
    settings.threads = request.value("threads", 0);
    const seesr::Pipeline pipeline(bundle, "openvino", settings);
    seesr::Options options;
    const Json given = request.value("options", Json::object());
    for (const auto &[name, value] : given.items()) options[name] = value;
    Json compiles = Json::array();
    for (const Json &image : request["images"]) {
        const std::int32_t width = image["width"], height = image["height"], stride = image["stride"];
        const auto pixels = read_values<std::uint8_t>(image["file"], static_cast<std::size_t>(stride) * height);
        const std::size_t before = pipeline.compiles();
        pipeline.upscale({pixels.data(), width, height, stride}, options, {});
        compiles.push_back(pipeline.compiles() - before);
    }
    return {{"ok", true}, {"compiles", compiles}};
}

Json probe_tiles(const Json &request) {
    const auto origins = seesr::tile_origins(request["height"], request["width"], request["tile"], request["overlap"]);
    Json listed = Json::array();
    for (const auto &[y, x] : origins) listed.push_back({y, x});
    return {{"ok", true}, {"origins", listed}, {"weights", seesr::gaussian_tile_weights(request["tile"])}};
}

Json probe_blend(const Json &request) {
    const seesr::Shape shape = request["shape"].get<seesr::Shape>();
    const std::int64_t h = shape[2], w = shape[3];
    const auto field = read_values<float>(request["field"], seesr::element_count(shape));
    int index = 0;
    const seesr::Tensor blended = seesr::blend_tiles(shape, request["tile"], request["overlap"],
                                                     [&](std::int64_t y, std::int64_t x, std::int64_t tile) {
        std::vector<float> window;
        const float scale = 1.0f + static_cast<float>(index++);
        for (std::int64_t p = 0; p < shape[0] * shape[1]; ++p) {
            for (std::int64_t i = 0; i < tile; ++i) {
                for (std::int64_t j = 0; j < tile; ++j) window.push_back(field[(p * h + y + i) * w + x + j] * scale);
            }
        }
        return seesr::Tensor::f32({shape[0], shape[1], tile, tile}, std::move(window));
    });
    written(blended, request["out"]);
    return {{"ok", true}};
}

Json probe_noise(const Json &request) {
    seesr::SeededNoise noise(request["seed"].get<std::uint64_t>());
    written(noise.draw("initial", {request["count"].get<std::int64_t>()}), request["out"]);
    return {{"ok", true}};
}

Json probe_resize(const Json &request) {
    const std::int32_t width = request["width"], height = request["height"], stride = request["stride"];
    const auto pixels = read_values<std::uint8_t>(request["file"], static_cast<std::size_t>(stride) * height);
    const seesr::Rgb8Image resized =
        seesr::resize_bicubic({pixels.data(), width, height, stride}, request["to"][0], request["to"][1]);
    std::ofstream(request["out"].get<std::string>(), std::ios::binary)
        .write(reinterpret_cast<const char *>(resized.pixels.data()), static_cast<std::streamsize>(resized.pixels.size()));
    return {{"ok", true}};
}

Json probe_sha256(int count, char **files) {
    Json digests = Json::array();
    for (int i = 0; i < count; ++i) digests.push_back(seesr::sha256_file(files[i]));
    return {{"ok", true}, {"sha256", digests}};
}

Json probe_verify(const char *bundle, const std::string &mode) {
    auto report = seesr::verify_bundle(seesr::Manifest::load(bundle),
                                       mode == "always" ? seesr::VerifyMode::always : seesr::VerifyMode::automatic);
    return {{"ok", true}, {"hashed", report.hashed}, {"trusted", report.trusted}, {"stamp", report.stamp.string()}};
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
        } else if (command == "timesteps" && argc == 2) {
            answer = probe_timesteps(Json::parse(std::cin));
        } else if (command == "run" && argc == 4) {
            answer = probe_run(argv[2], argv[3], Json::parse(std::cin));
        } else if (command == "dape-input" && argc == 2) {
            answer = probe_dape_input(Json::parse(std::cin));
        } else if (command == "encode-text" && argc == 3) {
            answer = probe_encode_text(argv[2], Json::parse(std::cin));
        } else if (command == "compiles" && argc == 3) {
            answer = probe_compiles(argv[2], Json::parse(std::cin));
        } else if (command == "tiles" && argc == 2) {
            answer = probe_tiles(Json::parse(std::cin));
        } else if (command == "blend" && argc == 2) {
            answer = probe_blend(Json::parse(std::cin));
        } else if (command == "noise" && argc == 2) {
            answer = probe_noise(Json::parse(std::cin));
        } else if (command == "resize" && argc == 2) {
            answer = probe_resize(Json::parse(std::cin));
        } else if (command == "sha256" && argc >= 3) {
            answer = probe_sha256(argc - 2, argv + 2);
        } else if (command == "verify" && argc == 4) {
            answer = probe_verify(argv[2], argv[3]);
        } else if (command == "sample" && argc == 2) {
            answer = probe_sample(Json::parse(std::cin));
        } else {
            std::fprintf(stderr, "usage: %s manifest BUNDLE | tokenize TOKENIZER_JSON | timesteps | sample | run BUNDLE NETWORK | dape-input | encode-text BUNDLE | tiles | blend | noise | resize | sha256 FILE... | verify BUNDLE MODE\n", argv[0]);
            return 64;
        }
    } catch (const seesr::Failure &failure) {
        answer = failure_json(failure);
    }
    std::cout << answer.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
    return 0;
}
