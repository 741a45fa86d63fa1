#include "channel.h"
#include "dmcowd/replies.h"
#include "sys_error.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace dmcowd {

Status Channel::Open(const std::string& ident, int timeout_ms) {
  Close();
  path_ = std::string(DMCOW_DEV_DIR) + ident;
  for (int waited = 0;; waited += 10) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ >= 0) return Status::OK();
    if (errno != ENOENT || waited >= timeout_ms) return Errno(path_ + ": open", errno);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void Channel::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Status Channel::Handshake(const DeviceSpec& spec, int timeout_ms, dmcow_request* hello) {
  pollfd p = {fd_, POLLIN, 0};
  int r;
  do {
    r = ::poll(&p, 1, timeout_ms);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return Errno(path_ + ": poll", errno);
  if (r == 0) return Status::IOError(path_ + ": no HELLO from the kernel within " + std::to_string(timeout_ms) + " ms");
  dmcow_request req;
  int n = Read(&req, 1);
  if (n < 0) return Errno(path_ + ": read", -n);
  if (n != 1 || req.kind != DMCOW_REQ_HELLO) {
    return Status::IOError(path_ + ": first request is of kind " + std::to_string(req.kind) + ", not HELLO");
  }
  const uint64_t chunks = (spec.sectors + spec.chunk_sectors - 1) / spec.chunk_sectors;
  if (req.version != DMCOW_ABI_VERSION) {
    return Status::NotSupported(path_ + ": kernel speaks ABI version " + std::to_string(req.version) +
                                ", dmcowd speaks " + std::to_string(DMCOW_ABI_VERSION));
  }
  // The kernel counts chunks up to the end of its last cow target; linear
  // segments after it are not its business.
  if (req.chunk_sectors != spec.chunk_sectors || req.nr_chunks == 0 || req.nr_chunks > chunks) {
    return Status::InvalidArgument(path_ + ": kernel reports " + std::to_string(req.nr_chunks) + " chunks of " +
                                   std::to_string(req.chunk_sectors) + " sectors, the plugin " +
                                   std::to_string(chunks) + " of " + std::to_string(spec.chunk_sectors));
  }
  const bool rtd = req.features & DMCOW_FEATURE_READ_TO_DAEMON;
  if (rtd != spec.read_to_daemon) return Status::InvalidArgument(path_ + ": kernel features disagree with the plugin");
  dmcow_reply rep{};
  rep.seq = req.seq;
  rep.kind = DMCOW_REP_HELLO;
  rep.version = DMCOW_ABI_VERSION;
  ssize_t w = Write(&rep, 1);
  if (w < 0) return Errno(path_ + ": HELLO reply", static_cast<int>(-w));
  if (hello) *hello = req;
  return Status::OK();
}

int Channel::Read(dmcow_request* out, size_t max) {
  for (;;) {
    ssize_t n = ::read(fd_, out, max * sizeof(dmcow_request));
    if (n >= 0) return static_cast<int>(static_cast<size_t>(n) / sizeof(dmcow_request));
    if (errno != EINTR) return -errno;
  }
}

ssize_t Channel::Write(const dmcow_reply* replies, size_t n) {
  for (;;) {
    ssize_t w = ::write(fd_, replies, n * sizeof(dmcow_reply));
    if (w >= 0) return w;
    if (errno != EINTR) return -errno;
  }
}

namespace {

// The mapping's cow_dev sector where its kind has a place there, else 0.
uint64_t CowSectorOf(const Mapping& m) {
  const bool has_cow = m.kind == MapKind::kRW || m.kind == MapKind::kRO || m.kind == MapKind::kFilledRW;
  return has_cow ? m.cow_sector : 0;
}

}  // namespace

dmcow_reply MakeMapReply(uint64_t seq, const Mapping& m) {
  return dmcow_replies::MapReply(seq, static_cast<uint32_t>(m.kind), m.chunk, m.nr_chunks, CowSectorOf(m));
}

dmcow_reply MakePush(const Mapping& m) {
  return dmcow_replies::PushReply(static_cast<uint32_t>(m.kind), m.chunk, m.nr_chunks, CowSectorOf(m));
}

dmcow_reply MakeInvalidate(uint64_t chunk, uint64_t nr_chunks) {
  return dmcow_replies::InvalidateReply(chunk, nr_chunks);
}

dmcow_reply MakeFlushAck(uint64_t seq) { return dmcow_replies::FlushAck(seq); }

dmcow_reply MakeError(uint64_t seq, int error) { return dmcow_replies::ErrorReply(seq, static_cast<uint32_t>(error)); }

}  // namespace dmcowd
