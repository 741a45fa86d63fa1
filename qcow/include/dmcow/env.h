// Env: every byte the engine reads or writes goes through these interfaces,
// so tests can substitute an in-memory file, inject I/O errors, or simulate a
// crash that drops unsynced writes (see tests/).
//
// Thread safety: File::Read, File::Write and File::WriteZeroes may be called
// concurrently from several threads on one File (they are positional, like
// pread/pwrite). Sync, Truncate and Size are safe to call concurrently with
// them.
#ifndef DMCOW_ENV_H_
#define DMCOW_ENV_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "dmcow/status.h"

namespace dmcow {

// Which stored file a File reads: two paths naming one file (a symbolic
// link, a hard link, "dir/../img") give equal identities. Backing chains use
// it to find loops before they load any table.
struct FileIdentity {
  uint64_t device = 0;
  uint64_t inode = 0;
  friend bool operator==(const FileIdentity&, const FileIdentity&) = default;
};

class File {
 public:
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  virtual ~File() = default;

  // The path the file was opened with; used in every error message.
  virtual const std::string& name() const = 0;

  // Reads up to `len` bytes at `offset` into `buf`. *bytes_read < len only
  // when the file ends first (it is then the number of bytes that exist).
  virtual Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) = 0;

  // Writes exactly `len` bytes at `offset`, growing the file if needed.
  virtual Status Write(uint64_t offset, const void* buf, size_t len) = 0;

  // Makes [offset, offset + len) read as zeros, growing the file if needed,
  // without moving data where the file system can (fallocate ZERO_RANGE or
  // PUNCH_HOLE), else by writing zeros. Durable, like Write, only after Sync.
  virtual Status WriteZeroes(uint64_t offset, uint64_t len);

  // Writes zeros over [offset, offset + len) as data, never as an unwritten
  // extent, so block status sees data there (qemu's preallocation=full).
  // Durable, like Write, only after Sync.
  Status WriteZeroBytes(uint64_t offset, uint64_t len);

  // Makes [offset, offset + len) read as zeros and gives its storage back
  // where the file system can (fallocate PUNCH_HOLE, as QEMU's write-zeroes
  // with MAY_UNMAP on a raw file), else as WriteZeroes. The file's size does
  // not change. Durable, like Write, only after Sync.
  virtual Status Deallocate(uint64_t offset, uint64_t len);

  // Reserves storage for [offset, offset + len), growing the file if
  // needed, without changing what it reads (posix_fallocate, as QEMU's
  // preallocation=falloc). NotSupported where the Env or the file system
  // cannot: the range then stays sparse, as in QEMU.
  virtual Status Allocate(uint64_t offset, uint64_t len);

  // Returns once every write issued before the call is durable.
  virtual Status Sync() = 0;

  virtual Status Size(uint64_t* size) = 0;
  virtual Status Truncate(uint64_t size) = 0;

  // Bytes the file occupies on its storage (st_blocks * 512); 0 if unknown.
  virtual uint64_t AllocatedBytes() { return 0; }

  // Whether [offset, offset + *len) is stored data or a hole, with *len at
  // most max_len, where the file system can tell (SEEK_DATA/SEEK_HOLE).
  // The default reports everything as data.
  virtual Status GetAllocation(uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) {
    (void)offset;
    *is_data = true;
    *len = max_len;
    return Status::OK();
  }

  // The identity of the stored file (st_dev/st_ino of the open descriptor).
  // NotSupported where the Env cannot tell; callers then compare names.
  virtual Status Identity(FileIdentity* id) {
    (void)id;
    return Status::NotSupported(name() + ": the file's identity is not known");
  }

  // The operating system's descriptor of the open file, or -1 where there
  // is none (in-memory files, wrappers that do not pass it on). For what
  // must act on the very file the engine opened rather than open its path
  // again: a QEMU-compatible lock (dmcow/image_lock.h).
  virtual int NativeFd() const { return -1; }

  // Reads exactly `len` bytes; a short read is a Corrupt error naming `what`
  // (e.g. "L2 table") and the offset.
  Status ReadExact(uint64_t offset, size_t len, void* buf, const char* what);
};

enum class OpenMode {
  kReadOnly,
  kReadWrite,      // the file must exist
  kCreateTruncate  // create or truncate to zero, read-write
};

class Env {
 public:
  virtual ~Env() = default;

  virtual Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) = 0;
  virtual bool FileExists(const std::string& path) = 0;

  // The process-wide environment backed by POSIX files. Never deleted.
  static Env* Default();
};

// A File over a descriptor the caller already opened (dmcowd gets the files
// of an attached chain this way: opened once, by dmcow-qcow attach). The
// File owns `fd` and closes it; `name` is for messages. Behaves as the
// files Env::Default() opens: positional I/O, fdatasync, fstat.
Status NewPosixFileFromFd(int fd, const std::string& name, std::unique_ptr<File>* file);

}  // namespace dmcow

#endif  // DMCOW_ENV_H_
