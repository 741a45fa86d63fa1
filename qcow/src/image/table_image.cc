#include "image/table_image.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "util.h"

namespace dmcow {

Status TableImage::GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, 1));
  ReaderLock lock(&rw_mu_);
  Mapping m;
  DMCOW_RETURN_IF_ERROR(Lookup(offset, max_len, &m));
  *out = m.extent;
  if (out->state == ClusterState::kData && out->has_host_offset && HostHolesReadAsZero()) {
    bool is_data = true;
    uint64_t len = out->length;
    DMCOW_RETURN_IF_ERROR(data_file()->GetAllocation(out->host_offset, out->length, &is_data, &len));
    if (len > 0 && len < out->length) out->length = len;
    out->host_hole = !is_data;  // past the end of the file too (SEEK_DATA fails with ENXIO)
  }
  // As QEMU: no offset for encrypted data, whose host bytes are not the guest's.
  if (info_.encrypted) out->has_host_offset = false;
  return Status::OK();
}

Status TableImage::Read(uint64_t offset, void* buf, size_t len) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  ReaderLock lock(&rw_mu_);
  return ReadLocked(offset, buf, len);
}

Status TableImage::ReadLocked(uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  const uint64_t cluster_mask = info_.cluster_size - 1;
  while (len > 0) {
    Mapping m;
    DMCOW_RETURN_IF_ERROR(Lookup(offset, len, &m));
    const size_t n = static_cast<size_t>(m.extent.length);
    switch (m.extent.state) {
      case ClusterState::kUnallocated: DMCOW_RETURN_IF_ERROR(ReadBacking(offset, out, n)); break;
      case ClusterState::kZero: std::memset(out, 0, n); break;
      case ClusterState::kData: {
        if (info_.encrypted) {
          DMCOW_RETURN_IF_ERROR(ReadEncrypted(offset, m.extent.host_offset, out, n));
          break;
        }
        size_t got = 0;
        DMCOW_RETURN_IF_ERROR(data_file()->Read(m.extent.host_offset, n, out, &got));
        std::memset(out + got, 0, n - got);  // past the end of the file reads as zeros, as in QEMU
        break;
      }
      case ClusterState::kCompressed:
        DMCOW_RETURN_IF_ERROR(
            compressed_->Read(m.compressed_offset, m.compressed_bytes, offset & cluster_mask, out, n));
        break;
    }
    offset += n;
    out += n;
    len -= n;
  }
  return Status::OK();
}

Status TableImage::NoKey() const { return Status::KeyRefused(Status::KeyRefusal::kMissing, filename(), kNoKeyMessage); }

Status TableImage::SetUpEncryption(const std::string* key, bool allow_missing, const LuksHeader* luks,
                                   uint64_t luks_offset) {
  info_.encrypted = true;
  iv_from_host_ = luks != nullptr;
  if (luks != nullptr) {
    DescribeLuks(*luks, &info_.encryption);
    luks_ = std::make_unique<LuksHeader>(*luks);
    luks_offset_ = luks_offset;
  } else {
    info_.encryption.format = "aes";
  }
  if (key == nullptr) return allow_missing ? Status::OK() : NoKey();
  if (luks != nullptr) return UnlockLuks(file_.get(), luks_offset, *luks, *key, filename(), &cipher_);
  // QEMU's crypto/block-qcow.c: AES-128-CBC, the key the secret's first 16
  // bytes, zero-padded; the IV the guest sector (plain64).
  SecureBytes aes_key(16);
  std::memcpy(aes_key.data(), key->data(), std::min<size_t>(key->size(), 16));
  return SectorCipher::Create({"aes-128", "cbc", "plain64", ""}, aes_key.data(), aes_key.size(), filename(), &cipher_);
}

Status TableImage::ReadEncrypted(uint64_t guest, uint64_t host, uint8_t* out, size_t n) const {
  if (cipher_ == nullptr) return NoKey();
  // Clusters are sector-aligned in the file, so guest and host share the
  // offset within a sector.
  const uint64_t lead = guest % kCryptSectorSize;
  const uint64_t whole = RoundUp(lead + n, kCryptSectorSize);
  const uint64_t first_sector = ((iv_from_host_ ? host : guest) - lead) / kCryptSectorSize;
  const bool direct = lead == 0 && whole == n;
  std::vector<uint8_t> bounce(direct ? 0 : whole);
  uint8_t* buf = direct ? out : bounce.data();
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(data_file()->Read(host - lead, whole, buf, &got));
  std::memset(buf + got, 0, whole - got);  // past the end of the file: zeros, decrypted as QEMU decrypts them
  DMCOW_RETURN_IF_ERROR(cipher_->Decrypt(first_sector, buf, whole));
  if (!direct) std::memcpy(out, buf + lead, n);
  return Status::OK();
}

Status TableImage::SealForWrite(uint64_t guest, uint64_t host, const uint8_t* data, size_t n,
                                std::vector<uint8_t>* sealed, uint64_t* sealed_host) const {
  if (cipher_ == nullptr) return NoKey();
  const uint64_t lead = guest % kCryptSectorSize;
  const uint64_t whole = RoundUp(lead + n, kCryptSectorSize);
  sealed->resize(whole);
  if (lead != 0) DMCOW_RETURN_IF_ERROR(ReadEncrypted(guest - lead, host - lead, sealed->data(), kCryptSectorSize));
  if (whole > kCryptSectorSize && (lead + n) % kCryptSectorSize != 0) {
    const uint64_t tail = whole - kCryptSectorSize;
    DMCOW_RETURN_IF_ERROR(
        ReadEncrypted(guest - lead + tail, host - lead + tail, sealed->data() + tail, kCryptSectorSize));
  } else if (lead == 0 && n % kCryptSectorSize != 0) {
    DMCOW_RETURN_IF_ERROR(ReadEncrypted(guest, host, sealed->data(), kCryptSectorSize));
  }
  std::memcpy(sealed->data() + lead, data, n);
  *sealed_host = host - lead;
  return cipher_->Encrypt(((iv_from_host_ ? host : guest) - lead) / kCryptSectorSize, sealed->data(), whole);
}

Status TableImage::KernelCipher(const DeviceImage::KernelCipherUse& use) const {
  if (!info_.encrypted) return Status::NotFound(filename() + ": not encrypted");
  if (cipher_ == nullptr) return NoKey();
  if (!iv_from_host_) {
    return Status::NotSupported(filename() +
                                ": legacy AES encryption (its IV is the guest sector) cannot be mapped by dm-crypt");
  }
  // dm-crypt's "cipher-chainmode-ivmode[:ivopts]": the algorithm's family
  // (the key length says which AES), as cryptsetup builds it from a LUKS
  // header. ecb takes no IV.
  const CipherSpec& spec = cipher_->spec();
  std::string cipher = spec.alg.substr(0, spec.alg.find('-')) + "-" + spec.mode;
  if (!spec.ivgen.empty()) cipher += "-" + spec.ivgen;
  if (!spec.ivgen_hash.empty()) cipher += ":" + spec.ivgen_hash;
  // It goes on a table line: nothing but the names above may reach it.
  if (cipher.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-:") != std::string::npos) {
    return Status::NotSupported(filename() + ": cipher '" + cipher + "' has no dm-crypt name");
  }
  return use(cipher, cipher_->key().data(), cipher_->key().size());
}

Status TableImage::NotServable() const {
  return Status::NotSupported(filename() + ": serving as a block device needs a qcow2 image" +
                              std::string(info().format == "qcow2" ? " open for writing" : ""));
}

Status TableImage::CheckClusterRange(uint64_t first, uint64_t count, const char* what) const {
  const uint64_t clusters = DivRoundUp(info_.virtual_size, info_.cluster_size);
  if (count == 0 || first >= clusters || count > clusters - first) {
    return Status::InvalidArgument(filename() + ": " + what + " guest clusters " + std::to_string(first) + "+" +
                                   std::to_string(count) + " outside the disk");
  }
  return Status::OK();
}

Status TableImage::CopyGuestClustersLocked(uint64_t first, uint64_t count, uint64_t host_offset, File* dest) {
  const uint64_t cs = info_.cluster_size;
  const uint64_t vsize = info_.virtual_size;
  std::vector<uint8_t> buf;
  for (uint64_t i = 0; i < count; i++) {
    const uint64_t guest = (first + i) * cs;
    const uint64_t host = host_offset + i * cs;
    const uint64_t n = std::min(cs, vsize - guest);
    Mapping m;
    DMCOW_RETURN_IF_ERROR(Lookup(guest, n, &m));
    const bool reads_zeros = m.extent.length >= n && (m.extent.state == ClusterState::kZero ||
                                                      (m.extent.state == ClusterState::kUnallocated && !backing()));
    if (reads_zeros && cipher_ == nullptr) {
      DMCOW_RETURN_IF_ERROR(dest->WriteZeroes(host, cs));
      continue;
    }
    buf.resize(cs);
    if (reads_zeros) {
      std::memset(buf.data(), 0, cs);
    } else {
      std::memset(buf.data() + n, 0, cs - n);
      DMCOW_RETURN_IF_ERROR(ReadLocked(guest, buf.data(), n));
    }
    if (cipher_ != nullptr) {
      DMCOW_RETURN_IF_ERROR(cipher_->Encrypt((iv_from_host_ ? host : guest) / kCryptSectorSize, buf.data(), cs));
    }
    DMCOW_RETURN_IF_ERROR(dest->Write(host, buf.data(), cs));
  }
  return Status::OK();
}

}  // namespace dmcow
