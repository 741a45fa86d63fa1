// Passphrases of encrypted images for dmcow-qcow attach: from --key-file
// (the file's bytes as they are, as qemu-img's `--object secret,file=`
// reads them) or typed at a terminal (without echo, the line's newline
// dropped, as cryptsetup asks), and handed to dmcowd on an inherited
// memfd: never on a command line, in the environment or in a file on disk.
// Each passphrase is wiped when its KeySet goes.
#ifndef DMCOWD_ATTACH_KEYS_H_
#define DMCOWD_ATTACH_KEYS_H_

#include <cstddef>
#include <map>
#include <string>

#include "chain_files.h"
#include "dmcow/status.h"

namespace dmcowd {

using dmcow::Status;

// Why a legacy AES image is not attached (dmcow-qcow before starting
// anything, the qcow2 plugin if asked directly), after the image's name.
inline constexpr char kLegacyAesRefusal[] =
    ": legacy AES encryption cannot be attached: its IV is the guest sector, which dm-crypt cannot map (QEMU's "
    "emulators refuse it too); convert it to LUKS with qemu-img convert -O qcow2 -o encrypt.format=luks first";

// Longest passphrase taken (qemu-img takes any; this is a bound, not a rule).
inline constexpr size_t kMaxPassphrase = 64 << 10;

// Gives *s room for a passphrase of kMaxPassphrase bytes, locked in memory
// where the process may lock it (never swapped out), so that it is never
// reallocated (no stray copy left unwiped). Wipe with WipePassphrase.
void ReservePassphrase(std::string* s);
void WipePassphrase(std::string* s);
// Reads `fd` to its end into *out (reserved as above; at most
// kMaxPassphrase bytes, else an error naming `what`).
Status ReadPassphrase(int fd, const std::string& what, std::string* out);

class KeySet {
 public:
  KeySet() = default;
  ~KeySet();
  KeySet(const KeySet&) = delete;
  KeySet& operator=(const KeySet&) = delete;

  // One --key-file argument: "FILE" for the image, "N=FILE" for the N-th
  // file below it (N = 1, 2...); "-" reads standard input.
  Status AddKeyFile(const std::string& arg);
  // Asks for the passphrase of `image` (at chain depth `depth`) on the
  // terminal standard input is; NotFound if it is none.
  Status Prompt(size_t depth, const std::string& image);

  bool Has(size_t depth) const { return keys_.count(depth) != 0; }
  const std::map<size_t, std::string>& keys() const { return keys_; }
  // A memfd holding the passphrase at `depth`, positioned at its start.
  Status SecretFd(size_t depth, UniqueFd* out) const;

 private:
  std::map<size_t, std::string> keys_;  // by chain depth
};

}  // namespace dmcowd

#endif  // DMCOWD_ATTACH_KEYS_H_
