// Helpers shared by the tests: temporary directories, running the real QEMU
// tools, reading files.
#ifndef DMCOW_TESTS_TEST_UTIL_H_
#define DMCOW_TESTS_TEST_UTIL_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

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

// In a test case that needs the QEMU tools: returns from it, with a warning,
// where they are not installed (scripts/test.sh installs them).
#define SKIP_WITHOUT_QEMU()                                 \
  do {                                                      \
    if (!dmcow_test::HaveQemuImg()) {                       \
      WARN("qemu-img/qemu-io not installed: test skipped"); \
      return;                                               \
    }                                                       \
  } while (0)

std::vector<uint8_t> ReadWholeFile(const std::string& path);
void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data);

// sha256sum of a file, lowercase hex.
std::string Sha256OfFile(const std::string& path);

// Deterministic bytes, partly compressible (runs, text-like) and partly
// random, so compressed clusters get a range of sizes.
std::vector<uint8_t> MixedData(std::mt19937_64& rng, size_t len);

// Directory holding fixtures/ (the source tree root).
std::string SourceDir();

// Opens `path` for writing (through `env`, or POSIX files); a failure fails
// the current test with the engine's message.
std::unique_ptr<dmcow::Image> MustOpenWritable(const std::string& path, dmcow::Env* env = nullptr);

// Raw deflate with QEMU's 4 KiB window (windowBits -12, level 9), as
// qemu-img convert -c stores a compressed cluster's data.
std::vector<uint8_t> QemuDeflate(const std::vector<uint8_t>& in);

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_TEST_UTIL_H_
