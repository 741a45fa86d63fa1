// Image creation: raw, qcow (version 1) and qcow2 (v2/v3), as `qemu-img
// create` makes them.
//
// A fresh qcow2 image has exactly the layout QEMU 7.2 gives it for the same
// options: CreateImage replays QEMU's own allocation sequence (header, one
// refcount table and block, then the L1 table, then, with preallocation, L2
// tables, data clusters and refcount growth in QEMU's order) on an in-memory
// model and writes the result. The file is byte-identical to qemu-img's for
// every option combination the tests cover (see tests/create_test.cc), and
// the same options always give the same bytes: nothing depends on the time,
// the machine or randomness.
//
// Thread safety: CreateImage may run concurrently for distinct paths.
#ifndef DMCOW_CREATE_H_
#define DMCOW_CREATE_H_

#include <cstdint>
#include <string>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

struct CreateOptions {
  // No size given: take the backing file's virtual size (qemu-img create
  // without SIZE). Without a backing file this is an error.
  static constexpr uint64_t kSizeUnset = UINT64_MAX;

  std::string format = "qcow2";  // "qcow2", "qcow" or "raw"
  uint64_t size = kSizeUnset;    // virtual size in bytes; rounded up to 512 (qcow2, raw)

  // qcow2 only (ignored for raw and qcow).
  std::string compat = "1.1";     // "1.1"/"v3" or "0.10"/"v2"
  uint64_t cluster_size = 65536;  // power of two, 512 to 2 MiB
  uint32_t refcount_bits = 16;    // power of two, 1 to 64 (16 for compat 0.10)
  bool lazy_refcounts = false;
  bool extended_l2 = false;               // needs compat 1.1 and clusters of at least 16 KiB
  std::string compression_type = "zlib";  // "zlib" or "zstd"
  std::string data_file;                  // external data file, created or truncated (compat 1.1)
  bool data_file_raw = false;             // needs data_file; implies preallocation=metadata

  // qcow2 "off", "metadata", "falloc", "full"; raw "off", "falloc", "full";
  // qcow accepts and ignores any of the four (as QEMU does).
  std::string preallocation = "off";

  // qcow2 and qcow. The name is stored as given and resolved, when opened,
  // relative to the new image's directory.
  std::string backing_file;
  std::string backing_fmt;   // required with backing_file, as in qemu-img 7.2
  bool open_backing = true;  // false: qemu-img -u, the backing file is not opened

  // Encryption (qcow2 and qcow): "" none, "aes" (legacy AES-128-CBC, the
  // key the secret's first 16 bytes) or "luks" (qcow2 only: a LUKS1
  // header in the image, data under a random master key). The secret, the
  // LUKS passphrase or AES key, is not copied: it must outlive the call.
  std::string encrypt_format;
  const std::string* encrypt_secret = nullptr;
  std::string encrypt_cipher_alg = "aes-256";  // LUKS: QEMU's names (qapi/crypto.json)
  std::string encrypt_cipher_mode = "xts";
  std::string encrypt_ivgen_alg = "plain64";
  std::string encrypt_ivgen_hash_alg = "sha256";  // essiv only
  std::string encrypt_hash_alg = "sha256";
  uint64_t encrypt_iter_time_ms = 2000;

  Env* env = Env::Default();  // all file access
};

// What qemu-img does before it prints "Formatting ...": checks the backing
// file (not the image itself, present and openable unless !open_backing,
// with a format) and, when options->size is kSizeUnset, sets it to the
// backing file's virtual size. CreateImage calls it too; a caller that wants
// the final size first (to print it) may call it beforehand.
Status PrepareCreateOptions(const std::string& path, CreateOptions* options);

// True for the names of QEMU 7.2's block drivers (its BlockdevDriver
// enumeration: "qcow2", "raw", "vmdk", "file", ...): what qemu-img takes
// as a backing format.
bool IsQemuDriverName(const std::string& name);

// Creates (or truncates and rewrites) the image at `path`. Every option is
// checked first, with qemu-img's messages, prefixed by "PATH: "; nothing is
// written when a check fails. On an I/O failure a partly written file may
// remain.
Status CreateImage(const std::string& path, const CreateOptions& options);

}  // namespace dmcow

#endif  // DMCOW_CREATE_H_
