#include "dm_crypt.h"

#include <linux/keyctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "dm.h"
#include "sys_error.h"

namespace dmcowd::dm {

namespace {

// libkeyutils is three syscalls away: not worth a dependency.
long AddKey(const char* type, const char* description, const void* payload, size_t len, int32_t keyring) {
  return ::syscall(SYS_add_key, type, description, payload, len, keyring);
}

void DropKey(long serial) {
  // Invalidate: gone at once, from every keyring; unlink where the kernel
  // lacks it (before 3.5), which frees it with its last link.
  if (::syscall(SYS_keyctl, KEYCTL_INVALIDATE, serial) != 0)
    (void)::syscall(SYS_keyctl, KEYCTL_UNLINK, serial, KEY_SPEC_PROCESS_KEYRING);
}

}  // namespace

Status LoadCrypt(const std::string& name, const CryptTable& table) {
  if (table.key == nullptr || table.key_len == 0 || table.key_len > 64) {
    return Status::InvalidArgument(name + ": a dm-crypt key of " + std::to_string(table.key_len) + " bytes");
  }
  if (table.cipher.empty() || table.cipher.find_first_of(" \t\n") != std::string::npos) {
    return Status::InvalidArgument(name + ": cipher '" + table.cipher + "'");
  }
  // The process keyring: dm-crypt looks the key up in the keyrings of the
  // task that loads the table (request_key), which is this process.
  const std::string description = "dmcow:" + name;
  const long serial = AddKey("logon", description.c_str(), table.key, table.key_len, KEY_SPEC_PROCESS_KEYRING);
  if (serial < 0) return Errno(name + ": adding the dm-crypt key to the kernel keyring", errno);
  const std::string params =
      table.cipher + " :" + std::to_string(table.key_len) + ":logon:" + description + " 0 " + table.device + " 0";
  Status s = LoadTargets(name, {Target{0, table.sectors, "crypt", params}});
  DropKey(serial);
  return s;
}

}  // namespace dmcowd::dm
