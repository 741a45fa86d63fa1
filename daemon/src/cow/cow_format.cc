#include "cow/cow_format.h"

#include <zlib.h>

#include <cstring>

namespace dmcowd::cow {

namespace {

void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t Get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

constexpr size_t kCrcOffset = 508;

uint32_t HeaderCrc(const uint8_t* in) { return static_cast<uint32_t>(crc32(0L, in, kCrcOffset)); }

uint64_t RoundUp(uint64_t v, uint64_t align) { return (v + align - 1) / align * align; }

bool ValidChunkSectors(uint32_t cs) { return cs >= kMinChunkSectors && cs <= kMaxChunkSectors && (cs & (cs - 1)) == 0; }

// Where data starts for a table of `entries`: after the table, chunk aligned.
uint64_t DataStart(uint64_t entries, uint32_t chunk_sectors) {
  return RoundUp(kTableOffset + RoundUp(entries * 8, 4096), uint64_t{chunk_sectors} * 512);
}

}  // namespace

uint64_t DevChunks(uint64_t virtual_sectors, uint32_t chunk_sectors) {
  return (virtual_sectors + chunk_sectors - 1) / chunk_sectors;
}

void EncodeHeader(const Header& h, uint8_t out[kHeaderSector]) {
  std::memset(out, 0, kHeaderSector);
  std::memcpy(out, kMagic, 8);
  Put32(out + 8, kVersion);
  Put32(out + 12, static_cast<uint32_t>(kHeaderBytes));
  Put32(out + 16, h.chunk_sectors);
  Put32(out + 20, h.flags);
  Put64(out + 24, h.virtual_sectors);
  Put64(out + 32, h.table_offset);
  Put64(out + 40, h.table_entries);
  Put64(out + 48, h.data_offset);
  Put64(out + 56, h.data_chunks);
  Put64(out + 64, h.alloc_limit);
  Put64(out + 72, h.base_sectors);
  Put32(out + kCrcOffset, HeaderCrc(out));
}

bool HasMagic(const uint8_t in[kHeaderSector]) { return std::memcmp(in, kMagic, 8) == 0; }

Status DecodeHeader(const uint8_t in[kHeaderSector], uint64_t file_size, const std::string& file, Header* h) {
  auto corrupt = [&](const std::string& what) { return Status::Corrupt(file + ": cow header: " + what); };
  if (!HasMagic(in)) return corrupt("no magic");
  // The version first: another version may lay out (and check) its header
  // differently.
  const uint32_t version = Get32(in + 8);
  if (version != kVersion) {
    return Status::NotSupported(file + ": cow header version " + std::to_string(version) + " (this dmcowd reads 1)");
  }
  if (Get32(in + kCrcOffset) != HeaderCrc(in)) return corrupt("checksum mismatch");
  if (Get32(in + 12) != kHeaderBytes) return corrupt("header size is not 4096");
  Header r;
  r.chunk_sectors = Get32(in + 16);
  r.flags = Get32(in + 20);
  r.virtual_sectors = Get64(in + 24);
  r.table_offset = Get64(in + 32);
  r.table_entries = Get64(in + 40);
  r.data_offset = Get64(in + 48);
  r.data_chunks = Get64(in + 56);
  r.alloc_limit = Get64(in + 64);
  r.base_sectors = Get64(in + 72);
  for (size_t i = 80; i < kCrcOffset; i++) {
    if (in[i]) return corrupt("reserved byte " + std::to_string(i) + " is not zero");
  }
  if (r.flags) return Status::NotSupported(file + ": cow header has unknown flags 0x" + std::to_string(r.flags));
  if (!ValidChunkSectors(r.chunk_sectors)) {
    return corrupt("chunk size " + std::to_string(r.chunk_sectors) + " sectors is not a power of two in 8..65536");
  }
  // 2^55 sectors (16 EiB) bounds every product below.
  if (r.virtual_sectors == 0 || r.virtual_sectors > (uint64_t{1} << 55)) {
    return corrupt("device size " + std::to_string(r.virtual_sectors) + " sectors is out of range");
  }
  if (r.table_offset != kTableOffset) return corrupt("table offset is not 4096");
  if (r.table_entries != DevChunks(r.virtual_sectors, r.chunk_sectors)) {
    return corrupt("table has " + std::to_string(r.table_entries) + " entries for a device of " +
                   std::to_string(DevChunks(r.virtual_sectors, r.chunk_sectors)) + " chunks");
  }
  if (r.data_offset % r.chunk_bytes() || r.data_offset < DataStart(r.table_entries, r.chunk_sectors) ||
      r.data_offset > (uint64_t{1} << 62)) {
    return corrupt("data offset " + std::to_string(r.data_offset) + " overlaps the table or is not chunk aligned");
  }
  if (r.data_chunks == 0 || r.data_chunks > ((uint64_t{1} << 62) - r.data_offset) / r.chunk_bytes()) {
    return corrupt("data area of " + std::to_string(r.data_chunks) + " chunks is out of range");
  }
  if (r.end() > file_size) {
    return corrupt("data area ends at byte " + std::to_string(r.end()) + ", beyond the end of the COW (" +
                   std::to_string(file_size) + " bytes)");
  }
  if (r.alloc_limit > r.data_chunks) {
    return corrupt("allocation limit " + std::to_string(r.alloc_limit) + " exceeds the data area (" +
                   std::to_string(r.data_chunks) + " chunks)");
  }
  *h = r;
  return Status::OK();
}

Status MakeLayout(uint64_t virtual_sectors, uint32_t chunk_sectors, uint64_t cow_size, const std::string& file,
                  Header* h) {
  if (!ValidChunkSectors(chunk_sectors)) {
    return Status::InvalidArgument("chunk size of " + std::to_string(chunk_sectors) +
                                   " sectors: must be a power of two from 4 KiB to 32 MiB");
  }
  if (virtual_sectors == 0 || virtual_sectors > (uint64_t{1} << 55)) {
    return Status::InvalidArgument(file + ": device size " + std::to_string(virtual_sectors) +
                                   " sectors is out of range");
  }
  Header r;
  r.chunk_sectors = chunk_sectors;
  r.virtual_sectors = virtual_sectors;
  r.base_sectors = virtual_sectors;
  r.table_entries = DevChunks(virtual_sectors, chunk_sectors);
  r.data_offset = DataStart(r.table_entries, chunk_sectors);
  if (cow_size == 0) {
    r.data_chunks = r.table_entries;
  } else {
    r.data_chunks = cow_size > r.data_offset ? (cow_size - r.data_offset) / r.chunk_bytes() : 0;
    if (r.data_chunks == 0) {
      return Status::InvalidArgument(file + ": " + std::to_string(cow_size) + " bytes hold no data chunk (need " +
                                     std::to_string(r.data_offset + r.chunk_bytes()) + ")");
    }
  }
  r.alloc_limit = 0;
  *h = r;
  return Status::OK();
}

}  // namespace dmcowd::cow
