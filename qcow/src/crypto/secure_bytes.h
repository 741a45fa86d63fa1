// Key material: held in memory locked against swapping where the limit on
// locked memory allows (as cryptsetup does, a failed mlock is not an
// error), and wiped with OPENSSL_cleanse when released, so no passphrase
// or master key outlives its use in a page the kernel could write out.
#ifndef DMCOW_QCOW_CRYPTO_SECURE_BYTES_H_
#define DMCOW_QCOW_CRYPTO_SECURE_BYTES_H_

#include <cstddef>
#include <cstdint>

namespace dmcow {

class SecureBytes {
 public:
  SecureBytes() = default;
  explicit SecureBytes(size_t size);
  SecureBytes(const void* data, size_t size);
  ~SecureBytes();
  SecureBytes(SecureBytes&& other) noexcept;
  SecureBytes& operator=(SecureBytes&& other) noexcept;
  SecureBytes(const SecureBytes&) = delete;
  SecureBytes& operator=(const SecureBytes&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void Release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool locked_ = false;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_CRYPTO_SECURE_BYTES_H_
