// dmcow-img convert: qemu-img convert, raw output only for now.
//
// Two worker threads take 2 MiB chunks of the guest range in turn. Ranges
// that read as zeros (GetMapExtent) are never read nor written: the output is
// truncated to the virtual size first, so they stay holes. Data is read and
// scanned for zero runs (-S) that become holes too, as qemu-img does.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kChunk = 2 << 20;
constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxSparse = 16 << 20;
constexpr int kThreads = 2;

class Converter {
 public:
  Converter(Image* src, int fd, uint64_t min_sparse, Progress* progress)
      : src_(src), fd_(fd), size_(src->virtual_size()), min_sparse_(min_sparse), progress_(progress) {}

  // Runs the workers; on failure prints the first error and returns false.
  bool Run() {
    std::vector<std::thread> threads;
    try {
      for (int i = 0; i < kThreads; i++) threads.emplace_back([this] { Worker(); });
    } catch (const std::system_error& e) {  // no second thread: the first does it all
      if (threads.empty()) Fail(std::string("cannot start a thread: ") + e.what());
    }
    for (auto& t : threads) t.join();
    if (!error_.empty()) PrintError(error_);
    return error_.empty();
  }

 private:
  void Worker() {
    try {
      WorkerLoop();
    } catch (const std::exception& e) {  // e.g. bad_alloc: nothing may leave a thread
      Fail(e.what());
      failed_.store(true);
    }
  }

  void WorkerLoop() {
    std::vector<char> buf(kChunk);
    while (!failed_.load()) {
      uint64_t start = next_chunk_.fetch_add(1) * kChunk;
      if (start >= size_) break;
      uint64_t end = std::min(start + kChunk, size_);
      if (!CopyChunk(start, end, buf.data())) {
        failed_.store(true);
        break;
      }
      std::lock_guard<std::mutex> lock(mu_);
      progress_->Advance(static_cast<float>(end - start) * 100.0f / static_cast<float>(size_));
    }
  }

  bool CopyChunk(uint64_t start, uint64_t end, char* buf) {
    uint64_t offset = start;
    while (offset < end) {
      MapExtent e;
      Status s = GetMapExtent(src_, offset, end - offset, &e);
      if (s.ok() && e.length == 0) s = Status::Corrupt("empty map extent at offset " + std::to_string(offset));
      if (!s.ok()) return Fail("error while reading block status at offset " + std::to_string(offset) + ": " +
                               s.ToString());
      uint64_t len = std::min(e.length, end - offset);
      if (e.zero) {
        if (min_sparse_ == 0) {  // -S 0: fully allocate the output
          std::memset(buf, 0, len);
          if (!WriteAll(buf, len, offset)) return false;
        }
      } else {
        s = src_->Read(offset, buf, len);
        if (!s.ok()) return Fail("error while reading at byte " + std::to_string(offset) + ": " + s.ToString());
        if (!WriteSparse(buf, len, offset)) return false;
      }
      offset += len;
    }
    return true;
  }

  // Writes `buf` except its zero runs that qemu-img would leave as holes:
  // leading and trailing zero sectors, and inner runs of >= min_sparse bytes.
  bool WriteSparse(const char* buf, uint64_t len, uint64_t offset) {
    if (min_sparse_ == 0) return WriteAll(buf, len, offset);
    uint64_t pos = 0;
    while (pos < len) {
      // Skip a zero run, then find the end of the data that follows: it
      // extends over zero runs shorter than min_sparse.
      uint64_t n;
      while (pos < len && IsZero(buf + pos, n = std::min(kSector, len - pos))) pos += n;
      if (pos == len) break;
      uint64_t data_end = pos, scan = pos;
      while (scan < len) {
        n = std::min(kSector, len - scan);
        if (!IsZero(buf + scan, n)) {
          scan += n;
          data_end = scan;
          continue;
        }
        uint64_t zero_start = scan;
        while (scan < len && IsZero(buf + scan, n = std::min(kSector, len - scan))) scan += n;
        if (scan - zero_start >= min_sparse_) break;
      }
      if (!WriteAll(buf + pos, data_end - pos, offset + pos)) return false;
      pos = data_end;
    }
    return true;
  }

  bool WriteAll(const char* buf, uint64_t len, uint64_t offset) {
    while (len > 0) {
      ssize_t n = pwrite(fd_, buf, len, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return Fail("error while writing at byte " + std::to_string(offset) + ": " +
                    (n < 0 ? std::strerror(errno) : "short write"));
      }
      buf += n;
      len -= static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
    }
    return true;
  }

  bool Fail(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty()) error_ = msg;
    return false;
  }

  Image* src_;
  int fd_;
  uint64_t size_;
  uint64_t min_sparse_;
  Progress* progress_;
  std::atomic<uint64_t> next_chunk_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;  // guards error_ and progress_
  std::string error_;
};

// -l: "snapshot.id=ID[,snapshot.name=NAME]" or a bare id or name. Finds the
// snapshot in `info` and returns its id, or prints qemu's error.
bool ResolveSnapshot(const std::string& arg, const ImageInfo& info, std::string* id) {
  std::string want_id, want_name;
  bool either = false;
  if (arg.rfind("snapshot.", 0) == 0) {
    size_t pos = 0;
    while (pos <= arg.size()) {
      size_t comma = arg.find(',', pos);
      if (comma == std::string::npos) comma = arg.size();
      std::string item = arg.substr(pos, comma - pos);
      size_t eq = item.find('=');
      std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (key == "snapshot.id") {
        want_id = value;
      } else if (key == "snapshot.name") {
        want_name = value;
      } else {
        PrintError("Invalid parameter '" + key + "'");
        PrintError("Failed in parsing snapshot param '" + arg + "'");
        return false;
      }
      pos = comma + 1;
    }
  } else {
    want_id = want_name = arg;
    either = true;
  }
  for (int pass = 0; pass < 2; pass++) {  // qemu tries the id before the name
    for (const SnapshotInfo& sn : info.snapshots) {
      bool match = either ? (pass == 0 ? sn.id == want_id : sn.name == want_name)
                          : (want_id.empty() || sn.id == want_id) && (want_name.empty() || sn.name == want_name);
      if (match) {
        *id = sn.id;
        return true;
      }
    }
  }
  PrintError("Failed to load snapshot: Can't find snapshot");
  return false;
}

}  // namespace

int CmdConvert(int argc, char** argv) {
  CLI::App app{"Convert the disk image SRC to DST (raw output only).", "dmcow-img convert"};
  std::string format, out_format = "raw", snapshot, sparse_text;
  std::vector<std::string> files;
  bool progress_flag = false, quiet = false, force_share = false;
  app.add_option("-f,--format", format, "Source image format; probed if omitted");
  app.add_option("-O", out_format, "Output format (only raw is supported)");
  app.add_option("-l", snapshot, "Snapshot to convert: snapshot.id=ID, snapshot.name=NAME, or an id or name");
  app.add_flag("-p", progress_flag, "Show progress");
  app.add_flag("-q", quiet, "Quiet mode (no progress)");
  app.add_option("-S", sparse_text, "Zero run length that becomes a hole (default 4k, 0 = fully allocate)");
  app.add_flag("-U,--force-share", force_share, "Open the source in shared mode (always the case)");
  app.add_option("FILES", files, "SRC DST");
  if (auto rc = ParseCommandLine(app, argc, argv)) return *rc;

  uint64_t min_sparse = 4096;
  if (!sparse_text.empty()) {
    if (!ParseSize(sparse_text, &min_sparse)) {
      PrintError("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for");
      PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
      return 1;
    }
    if (min_sparse % kSector != 0 || min_sparse > kMaxSparse) {
      PrintError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                 "16777216. Select 0 to disable sparse detection (fully allocates output).");
      return 1;
    }
  }
  if (files.size() < 2) {
    PrintError("Must specify image file name");
    return 1;
  }
  if (files.size() > 2) {
    PrintError("Converting several source images into one is not supported");
    return 1;
  }
  if (out_format != "raw") {
    PrintError("Output format '" + out_format + "' is not supported yet; only -O raw is");
    return 1;
  }
  const std::string& src_name = files[0];
  const std::string& dst_name = files[1];

  OpenOptions options;
  options.format = format;
  std::unique_ptr<Image> src;
  if (!OpenImageOrReport(src_name, options, &src).ok()) return 1;
  if (!snapshot.empty()) {
    if (!ResolveSnapshot(snapshot, src->info(), &options.snapshot)) return 1;
    src.reset();
    if (!OpenImageOrReport(src_name, options, &src).ok()) return 1;
  }

  // A regular file is truncated to the virtual size, so what is not written
  // reads as zeros. A device is not: every byte is written (as with -S 0).
  int fd = open(dst_name.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  struct stat st;
  bool regular = fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  if (fd >= 0 && !regular) min_sparse = 0;
  if (fd < 0 || (regular && ftruncate(fd, static_cast<off_t>(src->virtual_size())) != 0)) {
    PrintError(dst_name + ": error while converting raw: Could not create '" + dst_name + "': " +
               std::strerror(errno));
    if (fd >= 0) close(fd);
    return 1;
  }

  Progress progress(progress_flag && !quiet, 1.0f);
  progress.Set(0);
  bool ok = Converter(src.get(), fd, min_sparse, &progress).Run();
  if (ok) progress.Set(100);
  progress.End();
  if (close(fd) != 0 && ok) {
    PrintError(dst_name + ": error while closing: " + std::strerror(errno));
    ok = false;
  }
  return ok ? 0 : 1;
}

}  // namespace dmcow::cli
