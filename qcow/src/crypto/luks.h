// LUKS1 as qcow2 embeds it (crypt_method 2): the LUKS1 header (the LUKS1
// on-disk format specification, version 1.2.3, section 2) at the offset
// QEMU's full-disk-encryption header extension names (docs/interop/
// qcow2.txt, "Full disk encryption header pointer"), key material after it
// in the same region, offsets counted from the header's first byte; the
// payload is not at payload_offset but in the image's data clusters, each
// sector's IV made from its host sector (QEMU's crypt_physical_offset).
//
// The header is hostile input: every string is NUL-terminated in its
// field, key length, stripes (4000, as QEMU requires) and PBKDF2 iteration
// counts are bounded, and each active slot's key material lies inside the
// region, after the header, overlapping no other slot's.
#ifndef DMCOW_QCOW_CRYPTO_LUKS_H_
#define DMCOW_QCOW_CRYPTO_LUKS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "crypto/sector_cipher.h"
#include "dmcow/env.h"
#include "dmcow/image.h"
#include "dmcow/status.h"

namespace dmcow {

inline constexpr size_t kLuksHeaderBytes = 592;
inline constexpr int kLuksSlots = 8;
inline constexpr uint32_t kLuksStripes = 4000;
inline constexpr uint32_t kLuksSlotActive = 0x00AC71F3;
inline constexpr uint32_t kLuksSlotInactive = 0x0000DEAD;
inline constexpr size_t kLuksDigestBytes = 20;
inline constexpr size_t kLuksSaltBytes = 32;
// Bound on PBKDF2 iterations of a slot or the master key digest: some 30 s
// of SHA-256 on one core, far above what cryptsetup or qemu-img choose
// (about a million for their default 2 s), so a hostile header cannot
// keep an open busy for hours.
inline constexpr uint32_t kLuksMaxIterations = 1u << 25;

struct LuksKeySlot {
  bool active = false;
  uint32_t iterations = 0;
  uint8_t salt[kLuksSaltBytes] = {};
  uint32_t key_offset_sectors = 0;
  uint32_t stripes = 0;
};

struct LuksHeader {
  std::string cipher_name;  // "aes"
  std::string cipher_mode;  // "xts-plain64", "cbc-essiv:sha256"
  std::string hash_spec;    // "sha256"
  uint32_t payload_offset_sectors = 0;
  uint32_t key_bytes = 0;
  uint8_t mk_digest[kLuksDigestBytes] = {};
  uint8_t mk_digest_salt[kLuksSaltBytes] = {};
  uint32_t mk_digest_iterations = 0;
  std::string uuid;
  LuksKeySlot slots[kLuksSlots];
  CipherSpec spec;  // from cipher_name, cipher_mode and key_bytes
};

// Reads and checks the header at `offset` of `file`, in a region of
// `length` bytes. `who` names the image in errors.
Status ReadLuksHeader(File* file, uint64_t offset, uint64_t length, const std::string& who, LuksHeader* h);

// qemu-img info's view of `h` (QCryptoBlockInfoLUKS).
void DescribeLuks(const LuksHeader& h, EncryptionInfo* info);

// QEMU's words when no slot opens.
inline constexpr char kWrongKeyMessage[] = "Invalid password, cannot unlock any keyslot";

// Tries `passphrase` on each active slot in turn; on success *data_cipher
// holds the master key. InvalidArgument "Invalid password, cannot unlock
// any keyslot" (QEMU's words) when none opens.
Status UnlockLuks(File* file, uint64_t offset, const LuksHeader& h, const std::string& passphrase,
                  const std::string& who, std::unique_ptr<SectorCipher>* data_cipher);

// Whether `passphrase` opens active slot `slot` (QEMU's load_key), its
// master key checked against the header's digest.
Status LuksSlotOpens(File* file, uint64_t offset, const LuksHeader& h, int slot, const std::string& passphrase,
                     const std::string& who, bool* opens);

// Makes inactive slot `slot` hold `master_key` under `passphrase` (PBKDF2
// for `iter_time_ms`): the key material is written and synced before the
// header names the slot active, so a crash leaves the slot inactive or
// whole.
Status LuksAddSlot(File* file, uint64_t offset, LuksHeader* h, int slot, const uint8_t* master_key,
                   const std::string& passphrase, uint64_t iter_time_ms, const std::string& who);

// Makes active slot `slot` inactive: the header first (synced), then its
// key material overwritten with random bytes, so the passphrase opens
// nothing even in the old bytes.
Status LuksEraseSlot(File* file, uint64_t offset, LuksHeader* h, int slot, const std::string& who);

// What a new LUKS header is made of (qemu-img create's encrypt.* options).
struct LuksCreateOptions {
  CipherSpec spec{"aes-256", "xts", "plain64", ""};
  std::string hash = "sha256";
  uint64_t iter_time_ms = 2000;  // PBKDF2 time for a slot; the master key digest gets an eighth
};

// A new LUKS1 region, laid out as QEMU's qcrypto_block_luks_create lays it
// out: the header, then 4 KiB-aligned room for eight slots' key material,
// slot 0 holding a random master key under `passphrase`, the others
// inactive. *region holds the header and slot 0's material (the rest of
// the region is zeros); *region_length is the whole region's size.
Status BuildLuks(const LuksCreateOptions& options, const std::string& passphrase, const std::string& who,
                 std::vector<uint8_t>* region, uint64_t* region_length);

// The bytes BuildLuks's region takes for `spec` (0 for a cipher dmcow lacks).
uint64_t LuksRegionBytes(const CipherSpec& spec);

}  // namespace dmcow

#endif  // DMCOW_QCOW_CRYPTO_LUKS_H_
