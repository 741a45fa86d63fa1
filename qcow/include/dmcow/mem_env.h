// MemEnv: an Env whose files live in memory, for tests and fuzzing.
//
// Files are kept in a map from path to bytes. Paths are plain keys: no
// directories, no normalisation ("a/b" and "a//b" are different files).
// Semantics follow the File contract exactly: Read returns a short count at
// the end of the file, Write grows the file (a gap reads as zeros), Truncate
// shrinks or grows, Sync does nothing (everything is "durable" at once; a
// crash-simulation layer can wrap this Env to model lost writes).
//
// Every File opened on a path shares that path's bytes, as POSIX descriptors
// share an inode: writes through one are seen by the others, and PutFile on
// an open path replaces the content under them.
//
// Thread safety: all methods, of the Env and of its Files, may be called
// concurrently. A File may outlive the MemEnv that opened it.
#ifndef DMCOW_MEM_ENV_H_
#define DMCOW_MEM_ENV_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include "dmcow/mutex.h"

#include "dmcow/env.h"

namespace dmcow {

class MemEnv final : public Env {
 public:
  MemEnv() = default;
  MemEnv(const MemEnv&) = delete;
  MemEnv& operator=(const MemEnv&) = delete;

  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override;
  bool FileExists(const std::string& path) override;

  // Creates `path` or replaces its content.
  void PutFile(const std::string& path, std::vector<uint8_t> bytes);
  void PutFile(const std::string& path, const std::string& bytes);

  // The content of `path`; false if there is no such file.
  bool GetFile(const std::string& path, std::vector<uint8_t>* bytes) const;

  // Makes `path` name the same file as `existing` (a hard link: one content,
  // one File::Identity); false if `existing` does not exist.
  bool LinkFile(const std::string& existing, const std::string& path);

  // Removes `path`; false if there was no such file. Open Files keep the
  // bytes they had (like an unlinked inode).
  bool DeleteFile(const std::string& path);

  // Every path, sorted.
  std::vector<std::string> ListFiles() const;

  // The per-file state, shared by the Files opened on it.
  struct Node {
    mutable Mutex mu;
    std::vector<uint8_t> data GUARDED_BY(mu);
  };

 private:
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<Node>> files_ GUARDED_BY(mu_);
};

// A new, empty MemEnv.
std::unique_ptr<Env> NewMemEnv();

}  // namespace dmcow

#endif  // DMCOW_MEM_ENV_H_
