// The C++ wrapper (seesr.hpp) over the real library and a real bundle: RAII, exceptions carrying the
// status and message. Driven by tests/test_cpp_runtime.py; prints one line per check, exits 1 on a failure.
#include "seesr.hpp"

#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string &what) {
    std::printf("%s %s\n", ok ? "ok" : "FAILED", what.c_str());
    failures += ok ? 0 : 1;
}

struct Thrown {
    seesr_status status = SEESR_OK;  // SEESR_OK: the call did not throw
    std::string message;
    bool says(const std::string &part) const { return message.find(part) != std::string::npos; }
};

Thrown thrown(const std::function<void()> &call) {
    Thrown result;
    try {
        call();
    } catch (const seesr::Error &error) {
        result = {error.status(), error.what()};
    }
    return result;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s BUNDLE\n", argv[0]);
        return 64;
    }
    seesr::EngineOptions engine;
    engine.verify = SEESR_VERIFY_NEVER;

    expect(seesr::abi_version() == SEESR_ABI_VERSION, "ABI version matches the header");
    const std::string info = seesr::engine_info_json();
    const bool lists_cpu = info.find("\"name\":\"CPU\"") != std::string::npos;
    expect(info.find("\"engine\":\"openvino\"") != std::string::npos && lists_cpu,
           "engine_info_json lists OpenVINO's CPU device: " + info);
    Thrown unknown_engine = thrown([&] { seesr::engine_info_json("nonesuch"); });
    expect(unknown_engine.status == SEESR_ERROR_ENGINE && unknown_engine.says("unknown engine 'nonesuch'"),
           "an unknown engine's info throws SEESR_ERROR_ENGINE naming it: " + unknown_engine.message);
    Thrown missing = thrown([&] { seesr::Pipeline pipeline("/nonexistent/bundle", engine); });
    expect(missing.status == SEESR_ERROR_BUNDLE && missing.says("/nonexistent/bundle"),
           "a missing bundle throws SEESR_ERROR_BUNDLE naming it: " + missing.message);
    Thrown verified = thrown([&] { seesr::Pipeline pipeline(argv[1]); });  // the default: verify AUTO
    expect(verified.status == SEESR_OK, "the bundle's files verified on open" + verified.message);

    seesr::EngineOptions spilling = engine;
    spilling.tiled_vae_spill_dir = "/nonexistent/spill";
    Thrown spill = thrown([&] { seesr::Pipeline pipeline(argv[1], spilling); });
    expect(spill.status == SEESR_ERROR_INVALID_ARGUMENT &&
               spill.says("tiled_vae_spill_dir '/nonexistent/spill' does not exist"),
           "a missing spill folder throws SEESR_ERROR_INVALID_ARGUMENT naming it: " + spill.message);

    seesr::Pipeline pipeline(argv[1], engine);
    seesr::Pipeline moved = std::move(pipeline);
    expect(moved.bundle_schema_version() == 1, "schema version 1");
    expect(!moved.bundle_name().empty(), "bundle name " + moved.bundle_name());
    expect(moved.options_json().find("\"steps\"") != std::string::npos, "options table lists steps");

    seesr::Options options(moved);
    options.set("steps", 3).set("guidance", 2.5).set("color_fix", "wavelet").set("tiled_vae", false);
    Thrown zero_steps = thrown([&] { options.set("steps", 0); });
    expect(zero_steps.status == SEESR_ERROR_OPTION && zero_steps.says("steps must be in [1, 999], got 0"),
           "steps 0 refused: " + zero_steps.message);
    Thrown unknown = thrown([&] { options.set("colour", "x"); });
    expect(unknown.status == SEESR_ERROR_OPTION && unknown.says("unknown option 'colour'"),
           "unknown option refused: " + unknown.message);
    std::vector<std::uint8_t> rgb(16 * 16 * 3, 100);
    Thrown stride = thrown([&] { moved.upscale(rgb.data(), 16, 16, 47, &options); });
    expect(stride.status == SEESR_ERROR_IMAGE && stride.says("got 47"), "short stride: " + stride.message);

    // Several host threads describing at once through one pipeline agree with one thread alone.
    std::vector<std::uint8_t> gradient(40 * 24 * 3);
    for (std::size_t i = 0; i < gradient.size(); ++i) gradient[i] = static_cast<std::uint8_t>(i * 7 % 251);
    const seesr::Image alone = moved.describe(gradient.data(), 40, 24, 120, &options);
    expect(alone.pixels() == nullptr && !alone.prompt().empty(), "describe: tags '" + alone.tags() + "'");
    std::vector<std::string> prompts(4);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
        threads.emplace_back([&, i] { prompts[i] = moved.describe(gradient.data(), 40, 24, 120, &options).prompt(); });
    }
    for (auto &thread : threads) thread.join();
    bool same = true;
    for (const auto &prompt : prompts) same = same && prompt == alone.prompt();
    expect(same, "4 threads describe alike");

    // Several host threads upscaling at once through one pipeline and one options object: the same pixels.
    options.set("steps", 2).set("process_size", 64).set("guidance", 3.0).set("color_fix", "adain");
    const seesr::Image single = moved.upscale(gradient.data(), 40, 24, 120, &options);
    const std::vector<std::uint8_t> expected(single.pixels(), single.pixels() + 3 * 160 * 96);
    expect(single.width() == 160 && single.height() == 96 && single.stride() == 480, "upscale: 160x96");
    std::vector<std::vector<std::uint8_t>> upscaled(4);
    threads.clear();
    for (std::size_t i = 0; i < upscaled.size(); ++i) {
        threads.emplace_back([&, i] {
            const Thrown failed = thrown([&] {  // a failure leaves this thread's pixels empty: not alike
                const seesr::Image image = moved.upscale(gradient.data(), 40, 24, 120, &options);
                upscaled[i].assign(image.pixels(), image.pixels() + 3 * image.width() * image.height());
            });
            if (failed.status != SEESR_OK) std::printf("thread %zu: %s\n", i, failed.message.c_str());
        });
    }
    for (auto &thread : threads) thread.join();
    same = true;
    for (const auto &pixels : upscaled) same = same && pixels == expected;
    expect(same, "4 threads upscale alike");
    return failures == 0 ? 0 : 1;
}
