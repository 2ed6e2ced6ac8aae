// seesr-upscale-cpp: a PNG upscaled x4 by the native runtime, from C++ through seesr.hpp.
//
//   seesr-upscale-cpp IN.png OUT.png --bundle DIR [--steps N] [--seed N] [--precision P] [--threads N]
//                     [--tiled-vae-spill-dir DIR] [--memory-budget SIZE] [--print-plan yes] [--progress yes]
//                     [--verify auto|always|never]
//   (P: fp32, bf16, fp16, int8, int8-bf16; SIZE: 4GB, 2500MB, 4GiB, bytes, as `seesr upscale --memory-budget`;
//   --print-plan yes: the memory plan as JSON on stderr before upscaling; --progress yes: "step I/N done" lines
//   on stderr; --verify: the bundle's sha256 check, as seesr_verify)
//
// Exit status: 0 on success; 64 for a usage error; 65 for an unreadable input; 73 for an unwritable output;
// otherwise the seesr_status of the failing call. Every error is one line on stderr.
#include "seesr.hpp"

#include <png.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

const char *const USAGE =
    "usage: seesr-upscale-cpp IN.png OUT.png --bundle DIR [--steps N] [--seed N] [--precision P] [--threads N] "
    "[--tiled-vae-spill-dir DIR] [--memory-budget SIZE] [--print-plan yes] [--progress yes] "
    "[--verify auto|always|never]";

struct Arguments {
    std::string input, output;
    std::map<std::string, std::string> flags;  // --name value
};

// Empty when the command line is usable, else what to print (one line).
std::string parse(int argc, char **argv, Arguments &args) {
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        std::string word = argv[i];
        if (word.rfind("--", 0) == 0) {
            if (i + 1 >= argc) return USAGE;
            args.flags[word.substr(2)] = argv[++i];
        } else {
            positional.push_back(word);
        }
    }
    for (const auto &[name, _] : args.flags) {
        if (name != "bundle" && name != "steps" && name != "seed" && name != "precision" && name != "threads" &&
            name != "tiled-vae-spill-dir" && name != "memory-budget" && name != "print-plan" &&
            name != "progress" && name != "verify") {
            return "error: unknown option --" + name;
        }
    }
    if (positional.size() != 2 || !args.flags.count("bundle")) return USAGE;
    args.input = positional[0];
    args.output = positional[1];
    return "";
}

// "step I/N done" on stderr after each step (what benchmarks/edge_memory.py times steps by).
int print_step(void *, std::int32_t step, std::int32_t total) {
    std::cerr << "step " << step << "/" << total << " done" << std::endl;
    return 0;
}

// A whole number from a flag, or false (the message names the flag and the text).
bool integer(const std::string &flag, const std::string &text, long long &out) {
    char *end = nullptr;
    out = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0') {
        std::cerr << "error: --" << flag << " must be a whole number, got '" << text << "'\n";
        return false;
    }
    return true;
}

// The file's pixels as 8-bit RGB (libpng converts palette, grey, 16-bit and alpha, composited on black).
bool read_png(const std::string &path, std::vector<std::uint8_t> &rgb, int &width, int &height) {
    png_image image;
    std::memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&image, path.c_str())) {
        std::cerr << "error: " << path << ": not a readable PNG (" << image.message << ")\n";
        return false;
    }
    image.format = PNG_FORMAT_RGB;
    rgb.resize(PNG_IMAGE_SIZE(image));
    if (!png_image_finish_read(&image, nullptr, rgb.data(), 0, nullptr)) {
        std::cerr << "error: " << path << ": " << image.message << "\n";
        png_image_free(&image);
        return false;
    }
    width = static_cast<int>(image.width);
    height = static_cast<int>(image.height);
    return true;
}

bool write_png(const std::string &path, const seesr::Image &out) {
    png_image image;
    std::memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    image.width = static_cast<png_uint_32>(out.width());
    image.height = static_cast<png_uint_32>(out.height());
    image.format = PNG_FORMAT_RGB;
    if (!png_image_write_to_file(&image, path.c_str(), 0, out.pixels(), out.stride(), nullptr)) {
        std::cerr << "error: cannot write " << path << " (" << image.message << ")\n";
        return false;
    }
    return true;
}

}  // namespace

int main(int argc, char **argv) {
    Arguments args;
    const std::string refusal = parse(argc, argv, args);
    if (!refusal.empty()) {
        std::cerr << refusal << "\n";
        return 64;
    }
    long long steps = 0, seed = 0, threads = 0;
    if ((args.flags.count("steps") && !integer("steps", args.flags["steps"], steps)) ||
        (args.flags.count("seed") && !integer("seed", args.flags["seed"], seed)) ||
        (args.flags.count("threads") && !integer("threads", args.flags["threads"], threads))) {
        return 64;
    }
    const std::map<std::string, seesr_verify> verify_modes = {
        {"auto", SEESR_VERIFY_AUTO}, {"always", SEESR_VERIFY_ALWAYS}, {"never", SEESR_VERIFY_NEVER}};
    if (args.flags.count("verify") && !verify_modes.count(args.flags["verify"])) {
        std::cerr << "error: --verify must be auto, always or never, got '" << args.flags["verify"] << "'\n";
        return 64;
    }
    std::vector<std::uint8_t> rgb;
    int width = 0, height = 0;
    if (!read_png(args.input, rgb, width, height)) return 65;
    try {
        seesr::EngineOptions engine;
        if (args.flags.count("precision")) engine.precision = args.flags["precision"];
        engine.threads = static_cast<int>(threads);
        if (args.flags.count("tiled-vae-spill-dir")) engine.tiled_vae_spill_dir = args.flags["tiled-vae-spill-dir"];
        if (args.flags.count("verify")) engine.verify = verify_modes.at(args.flags["verify"]);
        if (args.flags.count("memory-budget")) engine.memory_budget = seesr::parse_byte_size(args.flags["memory-budget"]);
        seesr::Pipeline pipeline(args.flags["bundle"], engine);
        seesr::Options options(pipeline);
        if (args.flags.count("steps")) options.set("steps", static_cast<std::int64_t>(steps));
        if (args.flags.count("seed")) options.set("seed", static_cast<std::int64_t>(seed));
        if (args.flags.count("progress") && args.flags["progress"] == "yes") options.on_progress(print_step, nullptr);
        if (args.flags.count("print-plan") && args.flags["print-plan"] == "yes") {
            std::cerr << pipeline.memory_plan_json(width, height, &options) << "\n";
        }
        seesr::Image out = pipeline.upscale(rgb.data(), width, height, 3 * width, &options);
        if (!write_png(args.output, out)) return 73;
        std::cout << args.input << " -> " << args.output << " (" << out.width() << "x" << out.height()
                  << "); tags: " << out.tags() << "\n";
    } catch (const seesr::Error &error) {
        std::cerr << "error: " << error.what() << "\n";
        return static_cast<int>(error.status());
    }
    return 0;
}
