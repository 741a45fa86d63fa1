// Helpers shared by the tests: temporary directories, running the real QEMU
// tools, reading files.
#ifndef DMCOW_TESTS_TEST_UTIL_H_
#define DMCOW_TESTS_TEST_UTIL_H_

#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "dmcow/device_image.h"
#include "dmcow/env.h"
#include "dmcow/image.h"

namespace dmcow_test {

// A fresh directory under $TMPDIR, removed with its content on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs `command` with /bin/sh; returns its exit status (-1 if it did not
// exit normally). Output (stdout and stderr) goes to *output when given.
int Run(const std::string& command, std::string* output = nullptr);

// Like Run, but a non-zero exit fails the current test with the output.
void MustRun(const std::string& command);

bool HaveQemuImg();

// Marks the running test case skipped, saying why, and returns from it. A
// binary that skipped a test case and failed none exits 77 (tests/test_main.cc),
// which CTest reports as skipped, never as passed; scripts/test.sh fails on
// any skip, since it installs every tool the tests need.
#define DMCOW_SKIP(reason)           \
  do {                               \
    dmcow_test::NoteSkipped(reason); \
    return;                          \
  } while (0)

// In a test case that needs the QEMU tools (scripts/install-deps.sh installs them).
#define SKIP_WITHOUT_QEMU()                                                       \
  do {                                                                            \
    if (!dmcow_test::HaveQemuImg()) DMCOW_SKIP("qemu-img/qemu-io not installed"); \
  } while (0)

// What DMCOW_SKIP records: a warning in the test's output and a count.
void NoteSkipped(const std::string& reason);
int SkippedCount();

// A command's exit status (-1 if it did not exit normally) and one stream.
struct Result {
  int rc = -1;
  std::string out;
};

// Runs `command` in `dir` with /bin/sh: out is its stdout, stderr discarded.
Result Exec(const std::string& dir, const std::string& command);

// The same with out its stderr, stdout discarded.
Result ExecErr(const std::string& dir, const std::string& command);

// A command's exit status and both streams, kept apart.
struct SplitResult {
  int rc = -1;
  std::string out, err;
};

// Runs `command` in `dir`; its streams pass through files in `logs`.
SplitResult Exec(const std::string& dir, const std::string& logs, const std::string& command);

// Runs `tool args` in `dir` under a 10 s timeout (a hang then fails the
// test with exit 124 instead of hanging the suite); streams kept apart.
SplitResult Exec(const TempDir& dir, const std::string& tool, const std::string& args);

// Both tools ran the same command line: the same exit code, stdout and
// stderr ("dmcow-img" read as "qemu-img"); each difference is a failed
// CHECK, shown with both outputs.
void CheckSameAsQemu(const SplitResult& theirs, const SplitResult& ours);

// The cases (shapes, images) of a list that this run covers: every one,
// unless DMCOW_TEST_SAMPLE=N asks for N of them, evenly spread with the
// first and last always in (CI's sanitizer pass: the same code paths under
// ASan, fewer shapes; the release run, `ctest --test-dir build`, takes
// them all). Sampled cases are named in the
// test's output, so a run says what it left out.
std::vector<size_t> SampledIndices(size_t count);
template <typename Container>
auto Sampled(const Container& all) {
  std::vector<const std::remove_reference_t<decltype(*std::begin(all))>*> picked;
  for (size_t i : SampledIndices(std::size(all))) picked.push_back(&*(std::begin(all) + i));
  return picked;
}

// The dirty ranges (start, length) of persistent bitmap `bitmap` of the
// qcow2 image `image` in `dir`, as QEMU reads them (qemu-nbd exports it).
std::vector<std::pair<uint64_t, uint64_t>> QemuDirtyRanges(const std::string& dir, const std::string& image,
                                                           const std::string& bitmap);

// The dirty ranges of every bitmap of `image` in `dir` that QEMU holds
// consistent (not in use), by name.
using BitmapRanges = std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>>;
BitmapRanges QemuConsistentBitmaps(const std::string& dir, const std::string& image = "img");

// A file's bytes as a string ("" if it cannot be read).
std::string ReadText(const std::string& path);

// `text` with every `from` replaced by `to` (e.g. one tool's name for the
// other's in their messages).
std::string ReplaceAll(std::string text, const std::string& from, const std::string& to);

#ifdef DMCOW_IMG_PATH
// The dmcow-img of this build (dmcow_test(... NEEDS_DMCOW_IMG)); Ours() is
// its path quoted for /bin/sh.
inline constexpr char kDmcowImg[] = DMCOW_IMG_PATH;
inline std::string Ours() { return std::string("'") + kDmcowImg + "'"; }
// dmcow-img `args` in `dir`, under the timeout.
inline SplitResult Ours(const TempDir& dir, const std::string& args) { return Exec(dir, Ours(), args); }
#endif

std::vector<uint8_t> ReadWholeFile(const std::string& path);
void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data);

// Big-endian fields of a file's bytes (bounds checked), for crafting images.
uint64_t BE64(const std::vector<uint8_t>& bytes, uint64_t at);
uint32_t BE32(const std::vector<uint8_t>& bytes, uint64_t at);
void PutBE64(std::vector<uint8_t>& bytes, uint64_t at, uint64_t value);

// sha256sum of a file, lowercase hex.
std::string Sha256OfFile(const std::string& path);

// The block digest blk-sha256 of a plain file's bytes, computed straight
// from its definition in docs/checksum.md (every block read and tested, no
// block status): the reference dmcow-img checksum is held to.
std::string BlockDigestOfFile(const std::string& path);

// Deterministic bytes, partly compressible (runs, text-like) and partly
// random, so compressed clusters get a range of sizes.
std::vector<uint8_t> MixedData(std::mt19937_64& rng, size_t len);

// Directory holding fixtures/ (the source tree root).
std::string SourceDir();

// Opens `path` for writing (through `env`, or POSIX files); a failure fails
// the current test with the engine's message.
std::unique_ptr<dmcow::Image> MustOpenWritable(const std::string& path, dmcow::Env* env = nullptr);

// What the guest reads of the image at `path` (through `env`), or of its
// internal snapshot `snapshot` (id or name); a failed open or read fails
// the current test.
std::vector<uint8_t> GuestContent(dmcow::Env* env, const std::string& path, const std::string& snapshot = "");

// The block-device calls of a qcow2 or qcow v1 image
// (Image::AsDeviceImage); an image without them (raw) fails the test.
dmcow::DeviceImage* Device(dmcow::Image* image);
inline dmcow::DeviceImage* Device(const std::unique_ptr<dmcow::Image>& image) { return Device(image.get()); }

// Raw deflate with QEMU's 4 KiB window (windowBits -12, level 9), as
// qemu-img convert -c stores a compressed cluster's data.
std::vector<uint8_t> QemuDeflate(const std::vector<uint8_t>& in);

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_TEST_UTIL_H_
