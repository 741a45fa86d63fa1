// The replies a daemon writes to the dm-cow channel (kmod/dm-cow-abi.h),
// built in one place for dmcowd (daemon/src/channel.cc) and for the VM
// tests' scripted responder (tests/vm/responder.cc).
#ifndef DMCOWD_REPLIES_H_
#define DMCOWD_REPLIES_H_

#include <cstdint>

#include "dm-cow-abi.h"

namespace dmcow_replies {

// Answer to request `seq` (0 for none): chunks [chunk, chunk + nr_chunks)
// map as `map` (DMCOW_MAP_*), at cow_sector where the kind has a place.
inline dmcow_reply MapReply(uint64_t seq, uint32_t map, uint64_t chunk, uint64_t nr_chunks, uint64_t cow_sector) {
  dmcow_reply r{};
  r.seq = seq;
  r.kind = DMCOW_REP_MAP;
  r.map = map;
  r.chunk = chunk;
  r.nr_chunks = nr_chunks;
  r.cow_sector = cow_sector;
  return r;
}

// The same mapping, unasked (PUSH).
inline dmcow_reply PushReply(uint32_t map, uint64_t chunk, uint64_t nr_chunks, uint64_t cow_sector) {
  dmcow_reply r = MapReply(0, map, chunk, nr_chunks, cow_sector);
  r.kind = DMCOW_REP_PUSH;
  return r;
}

inline dmcow_reply InvalidateReply(uint64_t chunk, uint64_t nr_chunks) {
  dmcow_reply r{};
  r.kind = DMCOW_REP_INVALIDATE;
  r.chunk = chunk;
  r.nr_chunks = nr_chunks;
  return r;
}

inline dmcow_reply FlushAck(uint64_t seq) {
  dmcow_reply r{};
  r.seq = seq;
  r.kind = DMCOW_REP_FLUSH_ACK;
  return r;
}

// Request `seq` fails with the positive errno `error`.
inline dmcow_reply ErrorReply(uint64_t seq, uint32_t error) {
  dmcow_reply r{};
  r.seq = seq;
  r.kind = DMCOW_REP_ERROR;
  r.error = error;
  return r;
}

}  // namespace dmcow_replies

#endif  // DMCOWD_REPLIES_H_
