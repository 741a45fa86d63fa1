// LUKS key slots of an encrypted qcow2 image (qemu-img amend -o
// encrypt.*): QEMU's qcrypto_block_luks_amend_options, its checks in its
// order and words. Crash ordering is crypto/luks.cc's: a slot's material
// is on disk before the header names it, and a slot is named inactive
// before its material is destroyed.
#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

Status Qcow2Image::ChangeKeySlots(const KeySlotChange& c) {
  auto refuse = [&](const std::string& why) { return Status::InvalidArgument(filename() + ": " + why); };
  if (!info_.encrypted) return refuse("Can't amend encryption options - encryption not present");
  if (luks_ == nullptr) return refuse("Only LUKS encryption options can be amended");
  if (!writable_) return Status::NotSupported(filename() + ": key slots change only through a writable open");
  if (cipher_ == nullptr) return NoKey();
  WriterLock lock(&rw_mu_);
  LuksHeader& h = *luks_;
  int active = 0;
  for (const LuksKeySlot& s : h.slots) active += s.active;
  if (c.activate) {
    if (c.old_secret != nullptr) return refuse("'old-secret' must not be given when activating keyslots");
    if (c.new_secret == nullptr) return refuse("'new-secret' is required to activate a keyslot");
    int slot = -1;
    if (c.has_keyslot) {
      if (c.keyslot < 0 || c.keyslot >= kLuksSlots) {
        return refuse("Invalid keyslot " + std::to_string(static_cast<uint32_t>(c.keyslot)) +
                      " specified, must be between 0 and " + std::to_string(kLuksSlots - 1));
      }
      slot = static_cast<int>(c.keyslot);
    } else {
      for (int i = 0; i < kLuksSlots && slot < 0; i++) {
        if (!h.slots[i].active) slot = i;
      }
      if (slot < 0) return refuse("Can't add a keyslot - all keyslots are in use");
    }
    if (h.slots[slot].active) {
      return refuse("Refusing to overwrite active keyslot " + std::to_string(slot) + " - please erase it first");
    }
    DMCOW_RETURN_IF_ERROR(LuksAddSlot(file_.get(), luks_offset_, &h, slot, cipher_->key().data(), *c.new_secret,
                                      c.iter_time_ms, filename()));
  } else {
    if (c.new_secret != nullptr) return refuse("'new-secret' must not be given when erasing keyslots");
    if (!c.has_keyslot && c.old_secret == nullptr) {
      return refuse(
          "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be "
          "given");
    }
    std::vector<int> erase;
    if (c.has_keyslot) {
      if (c.keyslot < 0 || c.keyslot >= kLuksSlots) {
        return refuse("Invalid keyslot " + std::to_string(static_cast<int32_t>(c.keyslot)) +
                      " specified, must be between 0 and " + std::to_string(kLuksSlots - 1));
      }
      const int slot = static_cast<int>(c.keyslot);
      if (c.old_secret != nullptr) {
        bool opens = false;
        DMCOW_RETURN_IF_ERROR(LuksSlotOpens(file_.get(), luks_offset_, h, slot, *c.old_secret, filename(), &opens));
        if (!opens) {
          return refuse("Given keyslot " + std::to_string(slot) +
                        " doesn't contain the given old password for erase operation");
        }
      }
      if (!h.slots[slot].active)
        return refuse("Given keyslot " + std::to_string(slot) + " is already erased (inactive) ");
      if (active == 1) {
        return refuse("Attempt to erase the only active keyslot " + std::to_string(slot) +
                      " which will erase all the data in the image irreversibly - refusing operation");
      }
      erase.push_back(slot);
    } else {
      for (int i = 0; i < kLuksSlots; i++) {
        bool opens = false;
        DMCOW_RETURN_IF_ERROR(LuksSlotOpens(file_.get(), luks_offset_, h, i, *c.old_secret, filename(), &opens));
        if (opens) erase.push_back(i);
      }
      if (erase.empty()) return refuse("No keyslots match given (old) password for erase operation");
      if (static_cast<int>(erase.size()) == active) {
        return refuse(
            "All the active keyslots match the (old) password that was given and erasing them will erase all the "
            "data in the image irreversibly - refusing operation");
      }
    }
    for (int slot : erase) DMCOW_RETURN_IF_ERROR(LuksEraseSlot(file_.get(), luks_offset_, &h, slot, filename()));
  }
  DescribeLuks(h, &info_.encryption);
  return Status::OK();
}

}  // namespace dmcow
