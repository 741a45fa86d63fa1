// The files of an image's chain, opened once.
//
// dmcow-qcow attach runs as root and turns names written inside an image
// into kernel devices, so every file of the chain is opened exactly once, by
// attach (OpenChain), and what was opened is what gets used: the descriptors
// go to each dmcowd (inherited; the qcow2 plugin's image_fd/chainN settings),
// whose engine reads them through an FdEnv, whose loop device is set up on the
// same descriptor, and whose QEMU lock is taken on the same open file
// description. No path of the chain is resolved twice, so swapping a
// symbolic link or a directory between two opens cannot put another file
// under the device.
//
// Each open is safe for whatever the name turns out to be: O_PATH first
// (no side effect, never blocks: a FIFO, a tty or a watchdog is not opened),
// fstat, the type checked, and only then the file itself opened, through
// /proc/self/fd (the same inode, not the name again) with
// O_NONBLOCK|O_CLOEXEC|O_NOCTTY; O_NONBLOCK is cleared once it is open.
// What may be opened:
//   the image itself   a regular file or a block device (the user named it)
//   backing files      regular files; block devices only with
//                      allow_device_backing (backing images on LVM volumes)
//   data files         regular files, only with open_data_files (attach
//                      refuses them; their type is checked first for the
//                      message)
// FIFOs, sockets, character devices and directories are always refused,
// with a message naming the image and the file.
#ifndef DMCOWD_CHAIN_FILES_H_
#define DMCOWD_CHAIN_FILES_H_

#include <sys/stat.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/image.h"
#include "dmcow/status.h"

namespace dmcowd {

using dmcow::Status;

// An open descriptor, closed with the object.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// One file of the chain, top (the image) first.
struct ChainFile {
  std::string name;        // as the engine names it: the image's, or the referrer's backing name resolved
  std::string format;      // "qcow2", "qcow" or "raw"
  std::string encryption;  // "luks", "aes" (legacy), "" for none
  UniqueFd fd;             // O_RDWR for a writable image, else O_RDONLY
  struct stat st = {};
  // Its external data file, with ChainPolicy::open_data_files: the name the
  // engine opens it by, and the descriptor (opened as `fd` is).
  std::string data_file_name;
  UniqueFd data_fd;
};

struct ChainPolicy {
  bool writable = false;                                 // open the image (only) read-write
  bool follow_backing = true;                            // false: the image alone (--no-backing)
  bool allow_device_backing = false;                     // backing files may be block devices
  int max_depth = dmcow::OpenOptions{}.max_chain_depth;  // the engine's bound
  // The image goes by the name the kernel gives the file it opened (its real
  // path, as realpath would say, without resolving the name a second time),
  // not `path` as given: relative backing names are then found next to the
  // real file. Falls back to `path` made absolute.
  bool real_image_name = false;
  // External data files are opened (a regular file each, once), else refused.
  bool open_data_files = false;
  // Who serves the chain, for the refusals' messages.
  std::string server = "attach";
};

// Opens `path` (safely, as above) and, unless told not to, its backing
// chain, each name resolved once, relative to the referring image's name as
// the engine resolves it. Loops (by file identity) and over-deep chains are
// refused; formats are probed (or taken from the backing format extension)
// by the engine.
Status OpenChain(const std::string& path, const ChainPolicy& policy, std::vector<ChainFile>* out);

// The name the kernel gives an open file ("/proc/self/fd/N"), or "" when it
// has none that is a usable absolute path (deleted, no /proc).
std::string OpenFileName(int fd);

// The engine's view of files opened already: OpenFile(name) hands out a
// duplicate of the descriptor registered under exactly that name, and any
// other name is refused (or handed to `fallback`, if set). Nothing is
// opened by name.
class FdEnv final : public dmcow::Env {
 public:
  using Fallback =
      std::function<Status(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file)>;
  // Takes `fd` (closed with the FdEnv). A second Add of a name replaces it.
  void Add(const std::string& name, UniqueFd fd);
  // The registered descriptor (still owned here), or -1.
  int Fd(const std::string& name) const;
  void set_fallback(Fallback f) { fallback_ = std::move(f); }
  void Clear() {
    files_.clear();
    fallback_ = nullptr;
  }

  Status OpenFile(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) override;
  bool FileExists(const std::string& path) override { return files_.count(path) != 0; }

 private:
  std::map<std::string, UniqueFd> files_;
  Fallback fallback_;
};

}  // namespace dmcowd

#endif  // DMCOWD_CHAIN_FILES_H_
