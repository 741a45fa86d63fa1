// A dm-crypt device over a block device, keyed through the kernel keyring:
// the key is added as a `logon` key (which userspace can never read back),
// the table names it (":LEN:logon:DESC"), the kernel copies it at table
// load, and the key is invalidated right after. The key so never appears on
// a table line that `dmsetup table --showkeys`, a log or a core dump of
// dmsetup could show.
//
// Thread safety: as dm.h.
#ifndef DMCOWD_DM_CRYPT_H_
#define DMCOWD_DM_CRYPT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "dmcow/status.h"

namespace dmcowd::dm {

using dmcow::Status;

struct CryptTable {
  std::string cipher;  // dm-crypt's "aes-xts-plain64"
  const uint8_t* key = nullptr;
  size_t key_len = 0;  // 1..64
  std::string device;  // "major:minor" of what it encrypts
  uint64_t sectors = 0;
  // Sector s of the crypt device is sector s of `device`, and its IV is s
  // (iv_offset 0, offset 0): for a LUKS qcow2 image file, its host sector.
};

// Loads `table` as `name`'s inactive table (Resume makes it live).
Status LoadCrypt(const std::string& name, const CryptTable& table);

}  // namespace dmcowd::dm

#endif  // DMCOWD_DM_CRYPT_H_
