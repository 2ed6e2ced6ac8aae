#include "verification.hpp"

#include "failure.hpp"
#include "sha256.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>

namespace fs = std::filesystem;

namespace seesr {
namespace {

constexpr const char *kStampFormat = "seesr-verified";
constexpr int kStampVersion = 1;
// A file changed this close to its check is not stamped: a change within the same timestamp tick could
// otherwise go unseen. Coarser than any common file system's granularity but FAT's.
constexpr std::int64_t kRacyNs = 1'000'000'000;

std::int64_t nanoseconds(const timespec &time) { return std::int64_t(time.tv_sec) * 1'000'000'000 + time.tv_nsec; }

std::int64_t now_ns() {
    timespec now{};
    clock_gettime(CLOCK_REALTIME, &now);
    return nanoseconds(now);
}

// `data`[key], or an empty object where it has no such member (a reference: loops below hold on to it).
const Json &member_or_empty(const Json &data, const char *key) {
    static const Json kEmpty = Json::object();
    auto found = data.find(key);
    return found != data.end() ? *found : kEmpty;
}

// Every file the manifest pins, relative path -> sha256 (as Manifest.all_files: networks, segments, files).
std::map<std::string, std::string> pinned_files(const Json &data) {
    std::map<std::string, std::string> pinned;
    for (const auto &[name, entry] : data["networks"].items()) {
        std::vector<const Json *> owners{&entry};
        const Json &tiled = member_or_empty(entry, "tiled");
        if (tiled.contains("segments")) {
            for (const auto &segment : tiled["segments"]) owners.push_back(&segment);
        }
        for (const Json *owner : owners) {
            for (const auto &[precision, files] : member_or_empty(*owner, "files").items()) {
                for (const auto &[rel, hash] : files["sha256"].items()) pinned[rel] = hash.get<std::string>();
            }
        }
    }
    for (const auto &[rel, hash] : member_or_empty(data, "files").items()) pinned[rel] = hash.get<std::string>();
    return pinned;
}

Json stamp_record(const std::string &sha256, const struct stat &info) {
    return {{"sha256", sha256},
            {"size", static_cast<std::int64_t>(info.st_size)},
            {"mtime_ns", nanoseconds(info.st_mtim)},
            {"ctime_ns", nanoseconds(info.st_ctim)},
            {"inode", static_cast<std::uint64_t>(info.st_ino)}};
}

// rel -> record from every readable stamp (earlier locations win). An unreadable stamp only means more
// hashing, so it is ignored rather than reported.
Json read_stamps(const std::vector<fs::path> &stamps) {
    Json known = Json::object();
    for (auto location = stamps.rbegin(); location != stamps.rend(); ++location) {
        std::ifstream in(*location, std::ios::binary);
        if (!in) continue;
        Json stamp = Json::parse(in, nullptr, false);
        if (stamp.is_object() && stamp.value("format", Json()) == kStampFormat &&
            stamp.value("version", Json()) == kStampVersion && stamp.contains("files") && stamp["files"].is_object()) {
            known.update(stamp["files"]);
        }
    }
    return known;
}

mode_t umask_mode() {
    // /proc gives the umask without changing it (umask() would race other threads creating files).
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::strtol(line.c_str() + 6, nullptr, 8));
    }
    return 022;
}

// `text` to `path` through a temporary file renamed onto it (readers never see half a stamp), with the mode a
// new file gets (0666 less the umask); false when the folder takes no file.
bool write_atomically(const fs::path &path, const std::string &text) {
    std::error_code failed;
    fs::create_directories(path.parent_path(), failed);
    std::string tmp =
        (path.parent_path() / ("." + path.filename().string() + "." + std::to_string(getpid()) + ".XXXXXX.tmp")).string();
    int fd = mkstemps(tmp.data(), 4);
    if (fd < 0) return false;
    bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    written = fchmod(fd, 0666 & ~umask_mode()) == 0 && written;
    written = ::close(fd) == 0 && written;
    if (!written || std::rename(tmp.c_str(), path.c_str()) != 0) {
        ::unlink(tmp.c_str());
        return false;
    }
    return true;
}

// The stamp at the first location that takes it ("" where none does: every open then hashes again, which is
// slower but not wrong, so it is no error, as in the Python runtime).
fs::path write_stamp(const std::vector<fs::path> &stamps, const std::string &bundle, const Json &verified) {
    Json stamp = {{"format", kStampFormat}, {"version", kStampVersion}, {"bundle", bundle}, {"files", verified}};
    const std::string text = stamp.dump(1) + "\n";
    for (const auto &location : stamps) {
        if (write_atomically(location, text)) return location;
    }
    return {};
}

}  // namespace

std::vector<fs::path> stamp_locations(const fs::path &root) {
    const char *cache = std::getenv("XDG_CACHE_HOME");
    const char *home = std::getenv("HOME");
    fs::path cache_dir = cache != nullptr && *cache ? fs::path(cache) : fs::path(home != nullptr ? home : "") / ".cache";
    std::error_code failed;
    fs::path resolved = fs::weakly_canonical(fs::absolute(root), failed);
    Sha256 key;
    const std::string text = resolved.string();
    key.update(text.data(), text.size());
    return {root / kStampFile, cache_dir / "seesr" / "verified" / (key.hexdigest().substr(0, 32) + ".json")};
}

Verification verify_bundle(const Manifest &manifest, VerifyMode mode) {
    const auto stamps = stamp_locations(manifest.root());
    const Json known = mode == VerifyMode::automatic ? read_stamps(stamps) : Json::object();
    Verification report;
    Json verified = Json::object();
    std::vector<std::string> problems;
    for (const auto &[rel, expected] : pinned_files(manifest.data())) {
        const fs::path path = manifest.file(rel);
        const std::int64_t checked_at = now_ns();
        struct stat info {};
        if (::stat(path.c_str(), &info) != 0) {
            problems.push_back(errno == ENOENT ? "missing " + rel : "cannot be read: " + rel + " (" + std::strerror(errno) + ")");
            continue;
        }
        if (!S_ISREG(info.st_mode)) {
            problems.push_back("not a regular file: " + rel);
            continue;
        }
        Json record = stamp_record(expected, info);
        if (known.contains(rel) && known[rel] == record) {
            report.trusted.push_back(rel);
            verified[rel] = record;
            continue;
        }
        const std::string actual = sha256_file(path);
        report.hashed.push_back(rel);
        if (actual != expected) {
            problems.push_back("sha256 mismatch for " + rel + " (the file's is " + actual + ", the manifest's " + expected + ")");
        } else if (std::max(nanoseconds(info.st_mtim), nanoseconds(info.st_ctim)) < checked_at - kRacyNs) {
            verified[rel] = record;
        }
    }
    if (!report.hashed.empty()) {
        std::error_code failed;
        report.stamp = write_stamp(stamps, fs::weakly_canonical(fs::absolute(manifest.root()), failed).string(), verified);
    }
    if (!problems.empty()) {
        std::string message = manifest.root().string() +
                              ": bundle files do not match the manifest (damaged or altered; rebuild or download the "
                              "bundle again):";
        for (const auto &problem : problems) message += "\n  " + problem;
        throw bundle_error(message);
    }
    return report;
}

}  // namespace seesr
