// Channel: one open /dev/dm-cow/<ident> (docs/abi.md section 2). Read and
// Write may be called from different threads (the kernel serialises them);
// Open/Close are not thread-safe.
#ifndef DMCOWD_CHANNEL_H_
#define DMCOWD_CHANNEL_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "dm-cow-abi.h"
#include "dmcow/status.h"
#include "dmcowd/plugin.h"

namespace dmcowd {

inline constexpr size_t kMaxBatch = 64;  // requests per read(), the kernel's limit

// Where replies go (a Channel, or a fake kernel in tests).
class ReplySink {
 public:
  virtual ~ReplySink() = default;
  // write(2) semantics of docs/abi.md section 2: bytes applied, or -errno.
  virtual ssize_t Write(const dmcow_reply* replies, size_t n) = 0;
};

class Channel final : public ReplySink {
 public:
  Channel() = default;
  ~Channel() { Close(); }
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Opens the channel of `ident`, waiting up to timeout_ms for its node.
  Status Open(const std::string& ident, int timeout_ms);
  void Close();
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

  // Reads HELLO, checks it against the device and answers it.
  Status Handshake(const DeviceSpec& spec, int timeout_ms, dmcow_request* hello);

  // Reads up to `max` requests (blocking unless none and nonblocking).
  // Returns their number, or -errno.
  int Read(dmcow_request* out, size_t max);

  // write(2) of `n` replies: bytes applied, or -errno (docs/abi.md 2).
  ssize_t Write(const dmcow_reply* replies, size_t n) override;

 private:
  int fd_ = -1;
  std::string path_;
};

dmcow_reply MakeMapReply(uint64_t seq, const Mapping& m);
dmcow_reply MakePush(const Mapping& m);
dmcow_reply MakeInvalidate(uint64_t chunk, uint64_t nr_chunks);
dmcow_reply MakeFlushAck(uint64_t seq);
dmcow_reply MakeError(uint64_t seq, int error);

}  // namespace dmcowd

#endif  // DMCOWD_CHANNEL_H_
