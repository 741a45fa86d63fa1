#include "test_util.h"

#include <openssl/sha.h>

#include <sys/wait.h>
#include <unistd.h>

#include <zlib.h>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

namespace dmcow_test {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base ? base : "/tmp") + "/dmcow-test-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) FAIL("mkdtemp failed");
  path_ = buf.data();
}

TempDir::~TempDir() {
  if (!path_.empty() && !std::getenv("DMCOW_KEEP_TEMP")) Run("rm -rf '" + path_ + "'");
}

int Run(const std::string& command, std::string* output) {
  std::string full = command + " 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (!pipe) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  int status = pclose(pipe);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void MustRun(const std::string& command) {
  std::string out;
  int rc = Run(command, &out);
  INFO("command: " << command << "\noutput: " << out);
  REQUIRE(rc == 0);
}

bool HaveQemuImg() { return Run("command -v qemu-img && command -v qemu-io") == 0; }

namespace {
int skipped_test_cases = 0;
}  // namespace

void NoteSkipped(const std::string& reason) {
  WARN("skipped: " << reason);
  ++skipped_test_cases;
}

int SkippedCount() { return skipped_test_cases; }

Result Exec(const std::string& dir, const std::string& command) {
  Result r;
  r.rc = Run("{ cd '" + dir + "' && " + command + " 2>/dev/null; }", &r.out);
  return r;
}

Result ExecErr(const std::string& dir, const std::string& command) {
  Result r;
  r.rc = Run("{ cd '" + dir + "' && " + command + " 2>&1 >/dev/null; }", &r.out);
  return r;
}

namespace {

// `command` run in `dir`, its stdout and stderr through the files `out` and
// `err`. Grouped: Run appends its own 2>&1.
SplitResult ExecThrough(const std::string& dir, const std::string& command, const std::string& out,
                        const std::string& err) {
  SplitResult r;
  r.rc = Run("{ cd '" + dir + "' && " + command + " >'" + out + "' 2>'" + err + "'; }");
  r.out = ReadText(out);
  r.err = ReadText(err);
  return r;
}

}  // namespace

SplitResult Exec(const std::string& dir, const std::string& logs, const std::string& command) {
  return ExecThrough(dir, command, logs + "/out", logs + "/err");
}

SplitResult Exec(const TempDir& dir, const std::string& tool, const std::string& args) {
  return ExecThrough(dir.path(), "timeout 10 " + tool + " " + args, dir / ".stdout", dir / ".stderr");
}

void CheckSameAsQemu(const SplitResult& theirs, const SplitResult& ours) {
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  CHECK(ours.out == theirs.out);
  CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
}

std::string ReplaceAll(std::string text, const std::string& from, const std::string& to) {
  for (size_t at = 0; (at = text.find(from, at)) != std::string::npos; at += to.size())
    text.replace(at, from.size(), to);
  return text;
}

std::string ReadText(const std::string& path) {
  std::vector<uint8_t> b = ReadWholeFile(path);
  return std::string(b.begin(), b.end());
}

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

uint64_t BE64(const std::vector<uint8_t>& bytes, uint64_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | bytes.at(at + i);
  return v;
}

uint32_t BE32(const std::vector<uint8_t>& bytes, uint64_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) v = v << 8 | bytes.at(at + i);
  return v;
}

void PutBE64(std::vector<uint8_t>& bytes, uint64_t at, uint64_t value) {
  for (int i = 7; i >= 0; i--, value >>= 8) bytes.at(at + i) = static_cast<uint8_t>(value);
}

std::string Sha256OfFile(const std::string& path) {
  std::string out;
  if (Run("sha256sum '" + path + "'", &out) != 0) return "";
  return out.substr(0, 64);
}

std::string BlockDigestOfFile(const std::string& path) {
  constexpr size_t kBlock = 65536;
  const std::vector<uint8_t> content = ReadWholeFile(path);
  auto le = [](uint64_t v, int bytes) {
    std::string s;
    for (int i = 0; i < bytes; i++) s.push_back(static_cast<char>(v >> (8 * i)));
    return s;
  };
  std::string input = "dmcow-blk-sha256-v1" + le(content.size(), 8) + le(kBlock, 4);
  uint64_t zero_run = 0;
  for (size_t at = 0; at < content.size(); at += kBlock) {
    const size_t n = std::min(kBlock, content.size() - at);
    if (std::all_of(content.begin() + at, content.begin() + at + n, [](uint8_t b) { return b == 0; })) {
      zero_run++;
      continue;
    }
    if (zero_run) input += std::string(1, '\0') + le(zero_run, 8);
    zero_run = 0;
    unsigned char h[SHA256_DIGEST_LENGTH];
    SHA256(content.data() + at, n, h);
    input += std::string(1, '\1') + std::string(reinterpret_cast<char*>(h), sizeof(h));
  }
  if (zero_run) input += std::string(1, '\0') + le(zero_run, 8);
  unsigned char root[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(input.data()), input.size(), root);
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char c : root) {
    hex.push_back(kHex[c >> 4]);
    hex.push_back(kHex[c & 15]);
  }
  return hex;
}

std::vector<uint8_t> MixedData(std::mt19937_64& rng, size_t len) {
  std::vector<uint8_t> data(len);
  static const char kWords[] = "the quick brown fox jumps over the lazy dog qcow2 cluster refcount ";
  size_t pos = 0;
  while (pos < len) {
    size_t run = std::min<size_t>(len - pos, 64 + rng() % 4096);
    switch (rng() % 3) {
      case 0: std::fill(data.begin() + pos, data.begin() + pos + run, static_cast<uint8_t>(rng())); break;
      case 1:
        for (size_t i = 0; i < run; i++) data[pos + i] = static_cast<uint8_t>(rng());
        break;
      default:
        for (size_t i = 0; i < run; i++) data[pos + i] = kWords[(pos + i) % (sizeof(kWords) - 1)];
        break;
    }
    pos += run;
  }
  return data;
}

std::string SourceDir() { return DMCOW_SOURCE_DIR; }

std::unique_ptr<dmcow::Image> MustOpenWritable(const std::string& path, dmcow::Env* env) {
  dmcow::OpenOptions options;
  options.writable = true;
  if (env != nullptr) options.env = env;
  std::unique_ptr<dmcow::Image> image;
  dmcow::Status s = dmcow::OpenImage(path, options, &image);
  INFO(s.ToString());
  REQUIRE(s.ok());
  return image;
}

dmcow::DeviceImage* Device(dmcow::Image* image) {
  dmcow::DeviceImage* device = image->AsDeviceImage();
  INFO(image->filename() << " (" << image->info().format << ") has no block-device calls");
  REQUIRE(device != nullptr);
  return device;
}

std::vector<uint8_t> QemuDeflate(const std::vector<uint8_t>& in) {
  z_stream s{};
  REQUIRE(deflateInit2(&s, 9, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) == Z_OK);
  std::vector<uint8_t> out(deflateBound(&s, in.size()) + 64);
  s.next_in = const_cast<uint8_t*>(in.data());
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = out.data();
  s.avail_out = static_cast<uInt>(out.size());
  REQUIRE(deflate(&s, Z_FINISH) == Z_STREAM_END);
  out.resize(s.total_out);
  deflateEnd(&s);
  return out;
}

std::vector<size_t> SampledIndices(size_t count) {
  const char* env = std::getenv("DMCOW_TEST_SAMPLE");
  const size_t wanted = env && *env ? std::strtoull(env, nullptr, 10) : 0;
  std::vector<size_t> picked;
  if (wanted == 0 || wanted >= count) {
    for (size_t i = 0; i < count; i++) picked.push_back(i);
    return picked;
  }
  for (size_t k = 0; k < wanted; k++) {
    const size_t i = wanted == 1 ? 0 : (k * (count - 1) + (wanted - 1) / 2) / (wanted - 1);
    if (picked.empty() || picked.back() != i) picked.push_back(i);
  }
  static std::set<size_t> told;  // a test case re-runs once per section
  if (told.insert(count).second)
    std::fprintf(stderr, "DMCOW_TEST_SAMPLE=%zu: %zu of %zu cases run (release ctest runs them all)\n", wanted,
                 picked.size(), count);
  return picked;
}

std::vector<uint8_t> GuestContent(dmcow::Env* env, const std::string& path, const std::string& snapshot) {
  dmcow::OpenOptions o;
  o.env = env;
  o.snapshot = snapshot;
  std::unique_ptr<dmcow::Image> image;
  dmcow::Status s = dmcow::OpenImage(path, o, &image);
  INFO(s.ToString());
  REQUIRE(s.ok());
  std::vector<uint8_t> bytes(image->virtual_size());
  REQUIRE(image->Read(0, bytes.data(), bytes.size()).ok());
  return bytes;
}

// The dirty ranges of `bitmap` as QEMU reads them: qemu-nbd exports it, and
// map shows its dirty ranges as "data": false. The export is read-only, so
// SIGKILL ends it at once (qemu-nbd takes over a second to leave by itself);
// once it is a zombie its files and locks are gone (the reaper here can
// take a second more).
std::vector<std::pair<uint64_t, uint64_t>> QemuDirtyRanges(const std::string& dir, const std::string& image,
                                                           const std::string& bitmap) {
  MustRun("cd '" + dir +
          "' && rm -f nbd.sock nbd.pid && qemu-nbd --fork --pid-file=nbd.pid -k \"$PWD/nbd.sock\" -r -B " + bitmap +
          " -f qcow2 " + image);
  Result map = Exec(dir,
                    "qemu-img map --output=json --image-opts driver=nbd,server.type=unix,server.path=nbd.sock,"
                    "x-dirty-bitmap=qemu:dirty-bitmap:" +
                        bitmap);
  MustRun("cd '" + dir +
          "' && p=$(cat nbd.pid) && kill -9 $p 2>/dev/null; while [ -e /proc/$p ] && "
          "! grep -q '^[0-9]* (.*) Z' /proc/$p/stat 2>/dev/null; do sleep 0.01; done");
  REQUIRE(map.rc == 0);
  std::vector<std::pair<uint64_t, uint64_t>> dirty;
  for (const auto& e : nlohmann::json::parse(map.out)) {
    if (e["data"].get<bool>()) continue;
    const uint64_t start = e["start"], length = e["length"];
    if (!dirty.empty() && dirty.back().first + dirty.back().second == start) {
      dirty.back().second += length;
    } else {
      dirty.emplace_back(start, length);
    }
  }
  return dirty;
}

BitmapRanges QemuConsistentBitmaps(const std::string& dir, const std::string& image) {
  BitmapRanges ranges;
  const nlohmann::json info =
      nlohmann::json::parse(Exec(dir, "qemu-img info --output=json " + image).out, nullptr, false);
  if (!info.is_object() || !info.contains("format-specific")) return ranges;
  for (const nlohmann::json& b : info["format-specific"]["data"].value("bitmaps", nlohmann::json::array())) {
    bool in_use = false;
    for (const nlohmann::json& f : b["flags"]) in_use |= f == "in-use";
    if (!in_use) ranges[b["name"]] = QemuDirtyRanges(dir, image, b["name"]);
  }
  return ranges;
}

}  // namespace dmcow_test
