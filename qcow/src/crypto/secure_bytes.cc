#include "crypto/secure_bytes.h"

#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cstring>
#include <utility>

namespace dmcow {

SecureBytes::SecureBytes(size_t size) : data_(size ? new uint8_t[size]() : nullptr), size_(size) {
  if (size_ != 0) locked_ = mlock(data_, size_) == 0;
}

SecureBytes::SecureBytes(const void* data, size_t size) : SecureBytes(size) {
  if (size != 0) std::memcpy(data_, data, size);
}

SecureBytes::~SecureBytes() { Release(); }

SecureBytes::SecureBytes(SecureBytes&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      locked_(std::exchange(other.locked_, false)) {}

SecureBytes& SecureBytes::operator=(SecureBytes&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    locked_ = std::exchange(other.locked_, false);
  }
  return *this;
}

void SecureBytes::Release() {
  if (data_ == nullptr) return;
  OPENSSL_cleanse(data_, size_);
  if (locked_) munlock(data_, size_);
  delete[] data_;
  data_ = nullptr;
  size_ = 0;
  locked_ = false;
}

}  // namespace dmcow
