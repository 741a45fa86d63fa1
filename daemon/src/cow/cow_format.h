// The cow plugin's on-disk format (daemon/DESIGN.md, "The cow plugin's
// on-disk format"): a 4 KiB header, a table of one u64 per device chunk,
// then the data chunks. Everything little-endian.
#ifndef DMCOWD_COW_COW_FORMAT_H_
#define DMCOWD_COW_COW_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "dmcow/status.h"

namespace dmcowd::cow {

using dmcow::Status;

inline constexpr char kMagic[8] = {'D', 'M', 'C', 'O', 'W', 'C', 'O', 'W'};
inline constexpr uint32_t kVersion = 1;
inline constexpr uint64_t kHeaderBytes = 4096;
inline constexpr size_t kHeaderSector = 512;  // the fields live here
inline constexpr uint64_t kTableOffset = kHeaderBytes;
inline constexpr uint32_t kMinChunkSectors = 8;
inline constexpr uint32_t kMaxChunkSectors = 65536;
inline constexpr uint64_t kEntriesPerSector = 512 / 8;

struct Header {
  uint32_t chunk_sectors = 0;
  uint32_t flags = 0;
  uint64_t virtual_sectors = 0;  // device size
  uint64_t table_offset = kTableOffset;
  uint64_t table_entries = 0;  // device chunks
  uint64_t data_offset = 0;    // bytes, chunk aligned
  uint64_t data_chunks = 0;    // capacity
  uint64_t alloc_limit = 0;    // data chunks that may be in use
  uint64_t base_sectors = 0;   // base size when formatted

  uint64_t chunk_bytes() const { return uint64_t{chunk_sectors} * 512; }
  // Byte offset of data chunk `i`.
  uint64_t DataOffset(uint64_t i) const { return data_offset + i * chunk_bytes(); }
  uint64_t table_bytes() const { return table_entries * 8; }
  // Bytes the COW must have to hold every data chunk.
  uint64_t end() const { return data_offset + data_chunks * chunk_bytes(); }
};

void EncodeHeader(const Header& h, uint8_t out[kHeaderSector]);

// Decodes and checks a header read from `file`, whose size is `file_size`.
// NotSupported for another version or unknown flags, Corrupt for anything
// inconsistent (the message names the field).
Status DecodeHeader(const uint8_t in[kHeaderSector], uint64_t file_size, const std::string& file, Header* h);

// Whether the sector holds our magic at all (a damaged header is Corrupt,
// a foreign one needs --format).
bool HasMagic(const uint8_t in[kHeaderSector]);

// The layout of a new COW for a device of `virtual_sectors`. With
// `cow_size` 0 (a new file) the data area holds every chunk; otherwise it is
// what fits in `cow_size` bytes (at least one chunk, or InvalidArgument).
Status MakeLayout(uint64_t virtual_sectors, uint32_t chunk_sectors, uint64_t cow_size, const std::string& file,
                  Header* h);

uint64_t DevChunks(uint64_t virtual_sectors, uint32_t chunk_sectors);

}  // namespace dmcowd::cow

#endif  // DMCOWD_COW_COW_FORMAT_H_
