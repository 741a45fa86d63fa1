// Hostile-input tests: valid qcow2 (v2, v3, extended L2, with a snapshot)
// and qcow v1 images are built in memory, byte by byte; each rule the engine
// enforces when opening or reading is then broken in a copy, and the copy
// must be refused with a one-line Status that names the file and the
// problem: no crash, no hang, no large allocation.
//
// Every case here is listed in docs/format-rules.md.
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "heap_peak.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr size_t kMaxPeakBytes = 64 * kMiB;
constexpr double kMaxSeconds = 10.0;

// ---------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------
using Bytes = std::vector<uint8_t>;

void Put8(Bytes* b, uint64_t off, uint8_t v) {
  if (b->size() < off + 1) b->resize(off + 1);
  (*b)[off] = v;
}
void Put16(Bytes* b, uint64_t off, uint16_t v) {
  for (int i = 0; i < 2; i++) Put8(b, off + i, static_cast<uint8_t>(v >> (8 * (1 - i))));
}
void Put32(Bytes* b, uint64_t off, uint32_t v) {
  for (int i = 0; i < 4; i++) Put8(b, off + i, static_cast<uint8_t>(v >> (8 * (3 - i))));
}
void Put64(Bytes* b, uint64_t off, uint64_t v) {
  for (int i = 0; i < 8; i++) Put8(b, off + i, static_cast<uint8_t>(v >> (8 * (7 - i))));
}
void PutBytes(Bytes* b, uint64_t off, const std::string& s) {
  for (size_t i = 0; i < s.size(); i++) Put8(b, off + i, static_cast<uint8_t>(s[i]));
}

Bytes DataPattern(size_t len, uint32_t seed) {
  Bytes b(len);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < len; i++) {
    x = x * 1103515245u + 12345u;
    b[i] = static_cast<uint8_t>(x >> 16);
  }
  return b;
}

Bytes TextPattern(size_t len) {
  static const char kText[] = "qcow2 compressed cluster; the quick brown fox jumps over the lazy dog. ";
  Bytes b(len);
  for (size_t i = 0; i < len; i++) b[i] = static_cast<uint8_t>(kText[(i * 7 / 5) % (sizeof(kText) - 1)]);
  return b;
}

// ---------------------------------------------------------------------------
// qcow2 image builder
// ---------------------------------------------------------------------------
// Header field offsets (docs/interop/qcow2.rst).
constexpr uint64_t kHdrVersion = 4;
constexpr uint64_t kHdrBackingOffset = 8;
constexpr uint64_t kHdrBackingSize = 16;
constexpr uint64_t kHdrClusterBits = 20;
constexpr uint64_t kHdrSize = 24;
constexpr uint64_t kHdrCrypt = 32;
constexpr uint64_t kHdrL1Size = 36;
constexpr uint64_t kHdrL1Offset = 40;
constexpr uint64_t kHdrRefTableOffset = 48;
constexpr uint64_t kHdrRefTableClusters = 56;
constexpr uint64_t kHdrNbSnapshots = 60;
constexpr uint64_t kHdrSnapshotsOffset = 64;
constexpr uint64_t kHdrIncompat = 72;
constexpr uint64_t kHdrAutoclear = 88;
constexpr uint64_t kHdrRefcountOrder = 96;
constexpr uint64_t kHdrHeaderLength = 100;
constexpr uint64_t kHdrCompressionType = 104;

constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureTable = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCrypto = 0x0537be77;

constexpr uint64_t kCopied = 1ULL << 63;
constexpr uint64_t kCompressedFlag = 1ULL << 62;

// Appends one header extension: type, length (the real one unless
// `declared_len` says otherwise), data, zero padding to 8 bytes.
void AppendExt(Bytes* out, uint32_t type, const Bytes& data, std::optional<uint32_t> declared_len = {}) {
  uint64_t at = out->size();
  Put32(out, at, type);
  Put32(out, at + 4, declared_len ? *declared_len : static_cast<uint32_t>(data.size()));
  out->insert(out->end(), data.begin(), data.end());
  out->resize((out->size() + 7) & ~size_t{7}, 0);
}

Bytes BitmapsExt(uint32_t nb, uint32_t reserved, uint64_t dir_size, uint64_t dir_offset) {
  Bytes d;
  Put32(&d, 0, nb);
  Put32(&d, 4, reserved);
  Put64(&d, 8, dir_size);
  Put64(&d, 16, dir_offset);
  return d;
}

struct Qcow2Spec {
  uint32_t version = 3;
  uint32_t cluster_bits = 12;
  uint64_t size = kMiB;
  bool extended_l2 = false;
  bool snapshot = false;      // one internal snapshot "snap1" (id "1") with an empty L1
  bool bitmap = false;        // one persistent bitmap "bm0", 64 KiB granularity, all clear
  uint32_t bitmap_extra = 0;  // extra data bytes in its directory entry (QEMU refuses any)
  std::string backing;
  std::string backing_format;
  std::vector<std::pair<uint8_t, std::string>> extra_incompat_names;  // feature table entries
  Bytes raw_extensions;                                               // appended verbatim after the standard extensions
};

// Cluster layout: 0 header, 1 refcount table, 2 refcount block, 3 L1,
// 4 L2, 5 data (guest cluster 0), 6 compressed data (guest cluster 1),
// 7 snapshot table, 8 snapshot L1, then the bitmap directory and the bitmap
// table. Guest cluster 2 is a zero cluster (v3), the rest is unallocated.
struct Qcow2Built {
  Bytes file;
  Bytes guest;  // expected guest content with no backing file
  uint64_t cs = 0;
  uint64_t l1_offset = 0, l2_offset = 0, data_offset = 0, compressed_offset = 0, compressed_bytes = 0;
  uint64_t snapshot_table = 0, snapshot_l1 = 0;
  uint64_t bitmap_dir = 0, bitmap_table = 0;
};

Qcow2Built BuildQcow2(const Qcow2Spec& spec) {
  Qcow2Built b;
  const uint64_t cs = uint64_t{1} << spec.cluster_bits;
  b.cs = cs;
  const uint64_t l2_entry_bytes = spec.extended_l2 ? 16 : 8;
  const uint64_t l2_entries = cs / l2_entry_bytes;
  const uint64_t l1_size = (spec.size + cs * l2_entries - 1) / (cs * l2_entries);
  REQUIRE(l1_size * 8 <= cs);
  const uint64_t nclusters = (spec.snapshot ? 9 : 7) + (spec.bitmap ? 2 : 0);
  if (spec.bitmap) {
    b.bitmap_dir = (nclusters - 2) * cs;
    b.bitmap_table = (nclusters - 1) * cs;
  }
  Bytes& f = b.file;
  f.assign(nclusters * cs, 0);

  // Header.
  Put32(&f, 0, 0x514649fb);
  Put32(&f, kHdrVersion, spec.version);
  Put32(&f, kHdrClusterBits, spec.cluster_bits);
  Put64(&f, kHdrSize, spec.size);
  Put32(&f, kHdrL1Size, static_cast<uint32_t>(l1_size));
  b.l1_offset = 3 * cs;
  Put64(&f, kHdrL1Offset, b.l1_offset);
  Put64(&f, kHdrRefTableOffset, 1 * cs);
  Put32(&f, kHdrRefTableClusters, 1);
  if (spec.snapshot) {
    b.snapshot_table = 7 * cs;
    b.snapshot_l1 = 8 * cs;
    Put32(&f, kHdrNbSnapshots, 1);
    Put64(&f, kHdrSnapshotsOffset, b.snapshot_table);
  }
  uint64_t header_length = 72;
  if (spec.version >= 3) {
    header_length = 112;
    Put64(&f, kHdrIncompat, spec.extended_l2 ? (1ULL << 4) : 0);
    Put32(&f, kHdrRefcountOrder, 4);
    Put32(&f, kHdrHeaderLength, static_cast<uint32_t>(header_length));
    Put8(&f, kHdrCompressionType, 0);
  }

  // Extensions, then the backing file name.
  Bytes ext;
  if (!spec.backing_format.empty()) {
    AppendExt(&ext, kExtBackingFormat, Bytes(spec.backing_format.begin(), spec.backing_format.end()));
  }
  if (spec.version >= 3) {
    std::vector<std::tuple<uint8_t, uint8_t, std::string>> names = {
        {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"},          {2, 1, "raw external data"}};
    for (const auto& [bit, name] : spec.extra_incompat_names) names.emplace_back(0, bit, name);
    Bytes table;
    for (const auto& [type, bit, name] : names) {
      Bytes entry(48, 0);
      entry[0] = type;
      entry[1] = bit;
      for (size_t i = 0; i < name.size() && i < 46; i++) entry[2 + i] = static_cast<uint8_t>(name[i]);
      table.insert(table.end(), entry.begin(), entry.end());
    }
    AppendExt(&ext, kExtFeatureTable, table);
  }
  if (spec.bitmap) {
    const uint64_t dir_size = (24 + spec.bitmap_extra + 3 + 7) & ~uint64_t{7};
    AppendExt(&ext, kExtBitmaps, BitmapsExt(1, 0, dir_size, b.bitmap_dir));
    Put64(&f, kHdrAutoclear, 1);
  }
  ext.insert(ext.end(), spec.raw_extensions.begin(), spec.raw_extensions.end());
  ext.resize(ext.size() + 8, 0);  // end of extensions
  REQUIRE(header_length + ext.size() + spec.backing.size() <= cs);
  std::copy(ext.begin(), ext.end(), f.begin() + header_length);
  if (!spec.backing.empty()) {
    uint64_t at = header_length + ext.size();
    PutBytes(&f, at, spec.backing);
    Put64(&f, kHdrBackingOffset, at);
    Put32(&f, kHdrBackingSize, static_cast<uint32_t>(spec.backing.size()));
  }

  // Refcounts: 16-bit, every cluster used once.
  Put64(&f, 1 * cs, 2 * cs);
  for (uint64_t i = 0; i < nclusters; i++) Put16(&f, 2 * cs + 2 * i, 1);

  // L1 -> L2.
  b.l2_offset = 4 * cs;
  Put64(&f, b.l1_offset, b.l2_offset | kCopied);

  b.guest.assign(spec.size, 0);
  // Guest cluster 0: data. With extended L2, the first 16 subclusters are
  // allocated and the last 16 read as zeros.
  b.data_offset = 5 * cs;
  Bytes data = DataPattern(cs, 1);
  std::copy(data.begin(), data.end(), f.begin() + b.data_offset);
  Put64(&f, b.l2_offset, b.data_offset | kCopied);
  if (spec.extended_l2) {
    Put64(&f, b.l2_offset + 8, (0xffff0000ULL << 32) | 0x0000ffffULL);
    std::copy(data.begin(), data.begin() + cs / 2, b.guest.begin());
  } else {
    std::copy(data.begin(), data.end(), b.guest.begin());
  }

  // Guest cluster 1: compressed.
  Bytes plain = TextPattern(cs);
  Bytes packed = QemuDeflate(plain);
  REQUIRE(packed.size() < cs);
  b.compressed_offset = 6 * cs;
  b.compressed_bytes = packed.size();
  std::copy(packed.begin(), packed.end(), f.begin() + b.compressed_offset);
  const uint64_t x = 62 - (spec.cluster_bits - 8);
  const uint64_t sectors = (packed.size() + 511) / 512;
  Put64(&f, b.l2_offset + l2_entry_bytes, kCompressedFlag | ((sectors - 1) << x) | b.compressed_offset);
  std::copy(plain.begin(), plain.end(), b.guest.begin() + cs);

  // Guest cluster 2: zero.
  if (spec.extended_l2) {
    Put64(&f, b.l2_offset + 2 * l2_entry_bytes + 8, 0xffffffffULL << 32);
  } else if (spec.version >= 3) {
    Put64(&f, b.l2_offset + 2 * l2_entry_bytes, 1);
  }

  if (spec.snapshot) {
    const uint64_t s = b.snapshot_table;
    Put64(&f, s + 0, b.snapshot_l1);
    Put32(&f, s + 8, static_cast<uint32_t>(l1_size));
    Put16(&f, s + 12, 1);           // id "1"
    Put16(&f, s + 14, 5);           // name "snap1"
    Put32(&f, s + 16, 1700000000);  // date
    Put32(&f, s + 36, 16);          // extra data: vm_state_size, disk_size
    Put64(&f, s + 40, 0);
    Put64(&f, s + 48, spec.size);
    PutBytes(&f, s + 56, "1snap1");
  }
  if (spec.bitmap) {
    // Directory entry; the table's one entry is 0: all bits clear.
    const uint64_t d = b.bitmap_dir;
    Put64(&f, d + 0, b.bitmap_table);
    Put32(&f, d + 8, 1);   // (1 MiB / 64 KiB) bits fit one cluster
    Put32(&f, d + 12, 2);  // flags: auto
    Put8(&f, d + 16, 1);   // type: dirty tracking
    Put8(&f, d + 17, 16);  // granularity 64 KiB
    Put16(&f, d + 18, 3);  // name "bm0"
    Put32(&f, d + 20, spec.bitmap_extra);
    PutBytes(&f, d + 24 + spec.bitmap_extra, "bm0");
  }
  return b;
}

// ---------------------------------------------------------------------------
// qcow v1 image builder: 48-byte header, backing name at 48, L1 at cluster 1,
// L2 at cluster 2, data at cluster 3 (guest cluster 0), compressed data at
// cluster 4 (guest cluster 1); the rest unallocated.
// ---------------------------------------------------------------------------
constexpr uint64_t kQ1BackingOffset = 8;
constexpr uint64_t kQ1BackingSize = 16;
constexpr uint64_t kQ1Size = 24;
constexpr uint64_t kQ1ClusterBits = 32;
constexpr uint64_t kQ1L2Bits = 33;
constexpr uint64_t kQ1Crypt = 36;
constexpr uint64_t kQ1L1Offset = 40;

struct Qcow1Built {
  Bytes file;
  Bytes guest;
  uint64_t cs = 0;
  uint64_t l1_offset = 0, l2_offset = 0, data_offset = 0, compressed_offset = 0;
};

Qcow1Built BuildQcow1(const std::string& backing = "") {
  Qcow1Built b;
  const uint32_t cluster_bits = 12, l2_bits = 9;
  const uint64_t cs = 4096, size = kMiB;
  b.cs = cs;
  Bytes& f = b.file;
  f.assign(5 * cs, 0);
  Put32(&f, 0, 0x514649fb);
  Put32(&f, 4, 1);
  if (!backing.empty()) {
    Put64(&f, kQ1BackingOffset, 48);
    Put32(&f, kQ1BackingSize, static_cast<uint32_t>(backing.size()));
    PutBytes(&f, 48, backing);
  }
  Put64(&f, kQ1Size, size);
  Put8(&f, kQ1ClusterBits, cluster_bits);
  Put8(&f, kQ1L2Bits, l2_bits);
  b.l1_offset = cs;
  Put64(&f, kQ1L1Offset, b.l1_offset);
  b.l2_offset = 2 * cs;
  Put64(&f, b.l1_offset, b.l2_offset);
  b.guest.assign(size, 0);
  b.data_offset = 3 * cs;
  Bytes data = DataPattern(cs, 7);
  std::copy(data.begin(), data.end(), f.begin() + b.data_offset);
  std::copy(data.begin(), data.end(), b.guest.begin());
  Put64(&f, b.l2_offset, b.data_offset);
  Bytes plain = TextPattern(cs);
  Bytes packed = QemuDeflate(plain);
  b.compressed_offset = 4 * cs;
  std::copy(packed.begin(), packed.end(), f.begin() + b.compressed_offset);
  Put64(&f, b.l2_offset + 8, (1ULL << 63) | (uint64_t{packed.size()} << (63 - cluster_bits)) | b.compressed_offset);
  std::copy(plain.begin(), plain.end(), b.guest.begin() + cs);
  return b;
}

// "none", or where two byte strings first differ (cheap to print, unlike
// Catch's rendering of two 1 MiB vectors).
std::string FirstDifference(const Bytes& got, const Bytes& want) {
  if (got.size() != want.size()) return "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
  auto m = std::mismatch(got.begin(), got.end(), want.begin());
  if (m.first == got.end()) return "none";
  return "offset " + std::to_string(m.first - got.begin());
}

// ---------------------------------------------------------------------------
// Opening and reading
// ---------------------------------------------------------------------------
std::string CodeName(Status::Code c) {
  switch (c) {
    case Status::Code::kOk: return "OK";
    case Status::Code::kIoError: return "IOError";
    case Status::Code::kCorrupt: return "Corrupt";
    case Status::Code::kNotSupported: return "NotSupported";
    case Status::Code::kInvalidArgument: return "InvalidArgument";
    case Status::Code::kNotFound: return "NotFound";
    case Status::Code::kBusy: return "Busy";
    case Status::Code::kNoSpace: return "NoSpace";
  }
  return "?";
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

struct Outcome {
  Status status;
  bool opened = false;
  Bytes content;  // when everything succeeded
};

// Opens `path` and, if that works, reads the whole disk and walks its map.
Outcome OpenAndReadAll(Env* env, const std::string& path, const std::string& format, const std::string& snapshot = "",
                       bool keep_content = false) {
  OpenOptions options;
  options.env = env;
  options.format = format;
  options.snapshot = snapshot;
  Outcome out;
  std::unique_ptr<Image> image;
  out.status = OpenImage(path, options, &image);
  if (!out.status.ok()) return out;
  out.opened = true;
  const uint64_t size = image->virtual_size();
  REQUIRE(size <= 256 * kMiB);
  Bytes chunk(64 * kKiB);
  if (keep_content) out.content.reserve(size);
  for (uint64_t off = 0; off < size;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), size - off));
    out.status = image->Read(off, chunk.data(), n);
    if (!out.status.ok()) return out;
    if (keep_content) out.content.insert(out.content.end(), chunk.begin(), chunk.begin() + n);
    off += n;
  }
  for (uint64_t off = 0; off < size;) {
    MapExtent e;
    out.status = GetMapExtent(image.get(), off, size - off, &e);
    if (!out.status.ok()) return out;
    REQUIRE(e.length > 0);
    off += e.length;
  }
  return out;
}

enum class Stage { kOpen, kRead };

struct Case {
  std::string name;
  Bytes bytes;
  std::string format;  // forced format
  Status::Code code;
  std::string expect;  // distinctive part of the message
  Stage stage = Stage::kOpen;
  // Also open with format detection: same result, or (when set) this one.
  bool probe = true;
  std::optional<std::string> probe_expect;
  std::string snapshot;
  std::vector<std::pair<std::string, Bytes>> extra_files;  // put beside the image
};

void CheckFailure(const Case& c, const std::string& path, const Outcome& o, Status::Code code,
                  const std::string& expect, std::optional<Stage> stage) {
  const std::string& msg = o.status.message();
  INFO("case " << c.name << " (" << path << "): " << CodeName(o.status.code()) << ": " << msg);
  REQUIRE_FALSE(o.status.ok());
  CHECK(CodeName(o.status.code()) == CodeName(code));
  CHECK(msg.find('\n') == std::string::npos);
  CHECK(msg.find('\r') == std::string::npos);
  CHECK(Contains(msg, path));
  CHECK(Contains(msg, expect));
  if (stage) CHECK(o.opened == (*stage == Stage::kRead));
}

// Runs one malformed case with the given format hint; time and peak heap
// use are bounded.
void RunOne(const Case& c, const std::string& format, Status::Code code, const std::string& expect,
            std::optional<Stage> stage) {
  MemEnv env;
  const std::string path = "/img/" + c.name;
  env.PutFile(path, c.bytes);
  for (const auto& [name, bytes] : c.extra_files) env.PutFile("/img/" + name, bytes);
  ResetHeapPeak();
  auto start = std::chrono::steady_clock::now();
  Outcome o = OpenAndReadAll(&env, path, format, c.snapshot);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  size_t peak = HeapPeakSinceReset();
  INFO("case " << c.name << " format '" << format << "': " << seconds << " s, peak heap " << peak << " bytes");
  CHECK(seconds < kMaxSeconds);
  CHECK(peak < kMaxPeakBytes);
  CheckFailure(c, path, o, code, expect, stage);
}

void RunCases(const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    SECTION(c.name) {
      RunOne(c, c.format, c.code, c.expect, c.stage);
      if (c.probe) {
        if (c.probe_expect) {
          RunOne(c, "", Status::Code::kCorrupt, *c.probe_expect, std::nullopt);
        } else {
          RunOne(c, "", c.code, c.expect, c.stage);
        }
      }
    }
  }
}

// A mutated copy of `base`.
template <typename F>
Bytes Mutate(const Bytes& base, F f) {
  Bytes b = base;
  f(&b);
  return b;
}

Bytes Prefix(const Bytes& b, size_t n) { return Bytes(b.begin(), b.begin() + std::min(n, b.size())); }

// Offset of the data of the first header extension of `type` in a built image.
uint64_t FindExt(const Bytes& b, uint32_t type, uint64_t header_length = 112) {
  uint64_t off = header_length;
  while (off + 8 <= b.size()) {
    uint32_t t = (uint32_t{b[off]} << 24) | (uint32_t{b[off + 1]} << 16) | (uint32_t{b[off + 2]} << 8) | b[off + 3];
    uint32_t len =
        (uint32_t{b[off + 4]} << 24) | (uint32_t{b[off + 5]} << 16) | (uint32_t{b[off + 6]} << 8) | b[off + 7];
    if (t == type) return off + 8;
    REQUIRE(t != 0);
    off += 8 + ((uint64_t{len} + 7) & ~uint64_t{7});
  }
  FAIL("extension not found");
  return 0;
}

Bytes ExtBytes(uint32_t type, const Bytes& data, std::optional<uint32_t> declared_len = {}) {
  Bytes out;
  AppendExt(&out, type, data, declared_len);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// The valid images really are valid.
// ---------------------------------------------------------------------------
TEST_CASE("built qcow2 and qcow images open and read back", "[malformed]") {
  struct Variant {
    std::string name;
    Qcow2Spec spec;
  };
  std::vector<Variant> variants;
  variants.push_back({"v3-c4k", Qcow2Spec{}});
  Qcow2Spec v2;
  v2.version = 2;
  variants.push_back({"v2-c4k", v2});
  Qcow2Spec ext;
  ext.cluster_bits = 14;
  ext.extended_l2 = true;
  variants.push_back({"v3-extl2-c16k", ext});
  Qcow2Spec c64k;
  c64k.cluster_bits = 16;
  c64k.size = 5 * kMiB + 512;
  variants.push_back({"v3-c64k", c64k});
  Qcow2Spec snap;
  snap.snapshot = true;
  variants.push_back({"v3-snapshot", snap});
  Qcow2Spec v2snap = v2;
  v2snap.snapshot = true;
  variants.push_back({"v2-snapshot", v2snap});
  Qcow2Spec bitmap;
  bitmap.bitmap = true;
  variants.push_back({"v3-bitmap", bitmap});

  const bool qemu = HaveQemuImg();
  if (!qemu) NoteSkipped("qemu-img not found: the built images are not cross-checked with QEMU");
  TempDir dir;

  for (const Variant& v : variants) {
    SECTION(v.name) {
      Qcow2Built b = BuildQcow2(v.spec);
      MemEnv env;
      const std::string path = "/img/" + v.name + ".qcow2";
      env.PutFile(path, b.file);
      for (const std::string format : {"qcow2", ""}) {
        Outcome o = OpenAndReadAll(&env, path, format, "", true);
        INFO(o.status.ToString());
        REQUIRE(o.status.ok());
        CHECK(FirstDifference(o.content, b.guest) == "none");
      }
      if (v.spec.snapshot) {
        Outcome o = OpenAndReadAll(&env, path, "qcow2", "snap1", true);
        INFO(o.status.ToString());
        REQUIRE(o.status.ok());
        CHECK(FirstDifference(o.content, Bytes(v.spec.size, 0)) == "none");
      }
      if (qemu) {
        const std::string file = dir / (v.name + ".qcow2");
        WriteWholeFile(file, b.file);
        MustRun("qemu-img check -f qcow2 '" + file + "'");
        MustRun("qemu-img convert -f qcow2 -O raw '" + file + "' '" + file + ".raw'");
        CHECK(FirstDifference(ReadWholeFile(file + ".raw"), b.guest) == "none");
      }
    }
  }

  SECTION("v3 with a raw backing file") {
    Qcow2Spec spec;
    spec.backing = "base.raw";
    spec.backing_format = "raw";
    Qcow2Built b = BuildQcow2(spec);
    MemEnv env;
    env.PutFile("/img/top.qcow2", b.file);
    Bytes base = DataPattern(spec.size, 99);
    env.PutFile("/img/base.raw", base);
    Outcome o = OpenAndReadAll(&env, "/img/top.qcow2", "", "", true);
    INFO(o.status.ToString());
    REQUIRE(o.status.ok());
    Bytes expect = base;
    std::copy(b.guest.begin(), b.guest.begin() + 3 * b.cs, expect.begin());  // data, compressed, zero
    CHECK(FirstDifference(o.content, expect) == "none");
  }

  SECTION("qcow v1") {
    Qcow1Built b = BuildQcow1();
    MemEnv env;
    env.PutFile("/img/v1.qcow", b.file);
    for (const std::string format : {"qcow", ""}) {
      Outcome o = OpenAndReadAll(&env, "/img/v1.qcow", format, "", true);
      INFO(o.status.ToString());
      REQUIRE(o.status.ok());
      CHECK(FirstDifference(o.content, b.guest) == "none");
    }
    if (qemu) {
      const std::string file = dir / "v1.qcow";
      WriteWholeFile(file, b.file);
      MustRun("qemu-img convert -f qcow -O raw '" + file + "' '" + file + ".raw'");
      CHECK(FirstDifference(ReadWholeFile(file + ".raw"), b.guest) == "none");
    }
  }
}

// ---------------------------------------------------------------------------
// qcow2 rules
// ---------------------------------------------------------------------------
std::vector<Case> Qcow2Cases() {
  const Status::Code kCorrupt = Status::Code::kCorrupt;
  const Status::Code kNotSupported = Status::Code::kNotSupported;
  const Qcow2Built v3 = BuildQcow2(Qcow2Spec{});
  Qcow2Spec v2spec;
  v2spec.version = 2;
  const Qcow2Built v2 = BuildQcow2(v2spec);
  Qcow2Spec snapspec;
  snapspec.snapshot = true;
  const Qcow2Built snap = BuildQcow2(snapspec);
  Qcow2Spec extspec;
  extspec.cluster_bits = 14;
  extspec.extended_l2 = true;
  const Qcow2Built ext = BuildQcow2(extspec);
  const Bytes& base = v3.file;
  const uint64_t cs = v3.cs;
  auto with = [](Qcow2Spec spec, auto edit) {
    edit(&spec);
    return BuildQcow2(spec).file;
  };

  std::vector<Case> c;
  auto add = [&](std::string name, Bytes bytes, Status::Code code, std::string expect) -> Case& {
    c.push_back(Case{name + ".qcow2", std::move(bytes), "qcow2", code, std::move(expect)});
    return c.back();
  };

  // Truncated files.
  add("empty", {}, kCorrupt, "file is too short to hold a qcow2 header").probe = false;  // probes as raw
  add("50-bytes", Prefix(base, 50), kCorrupt, "file is too short to hold a qcow2 header");
  add("v3-80-bytes", Prefix(base, 80), kCorrupt, "too short to hold a qcow2 version 3 header");
  add("v3-header-only", Prefix(base, 112), kCorrupt,
      "active L1 table at offset 0x3000 (8 bytes) lies beyond the end of the file");
  add("v2-header-only", Prefix(v2.file, 72), kCorrupt,
      "active L1 table at offset 0x3000 (8 bytes) lies beyond the end of the file");
  add("cluster0-only", Prefix(base, cs), kCorrupt, "lies beyond the end of the file");
  add("truncated-before-l2", Prefix(base, 4 * cs), kCorrupt, "L2 table at offset 0x4000").stage = Stage::kRead;

  // Magic, version, cluster size, header length, refcount width.
  add("bad-magic", Mutate(base, [](Bytes* b) { Put32(b, 0, 0x514649fa); }), kCorrupt, "not a qcow2 image (bad magic)")
      .probe = false;  // probes as raw
  add("version-0", Mutate(base, [](Bytes* b) { Put32(b, kHdrVersion, 0); }), kNotSupported,
      "unsupported qcow2 version 0");
  add("version-1", Mutate(base, [](Bytes* b) { Put32(b, kHdrVersion, 1); }), kNotSupported,
      "unsupported qcow2 version 1")
      .probe_expect = "cluster size";  // probes as qcow v1, whose cluster_bits byte is 0 here
  add("version-4", Mutate(base, [](Bytes* b) { Put32(b, kHdrVersion, 4); }), kNotSupported,
      "unsupported qcow2 version 4");
  add("cluster-bits-8", Mutate(base, [](Bytes* b) { Put32(b, kHdrClusterBits, 8); }), kCorrupt,
      "unsupported cluster size 2^8");
  add("cluster-bits-22", Mutate(base, [](Bytes* b) { Put32(b, kHdrClusterBits, 22); }), kCorrupt,
      "unsupported cluster size 2^22");
  add("cluster-bits-huge", Mutate(base, [](Bytes* b) { Put32(b, kHdrClusterBits, 0xffffffff); }), kCorrupt,
      "unsupported cluster size");
  add("header-length-96", Mutate(base, [](Bytes* b) { Put32(b, kHdrHeaderLength, 96); }), kCorrupt,
      "header length 96 is too short");
  add("header-length-108", Mutate(base, [](Bytes* b) { Put32(b, kHdrHeaderLength, 108); }), kCorrupt,
      "header length 108 is not a multiple of 8");
  add("header-length-8192", Mutate(base, [](Bytes* b) { Put32(b, kHdrHeaderLength, 8192); }), kCorrupt,
      "header length 8192 exceeds the cluster size");
  add("header-length-huge", Mutate(base, [](Bytes* b) { Put32(b, kHdrHeaderLength, 0x7ffffff8); }), kCorrupt,
      "exceeds the cluster size");
  add("refcount-order-7", Mutate(base, [](Bytes* b) { Put32(b, kHdrRefcountOrder, 7); }), kCorrupt,
      "refcount width 2^7 bits is too large");

  // Feature bits.
  add("unknown-incompat-named",
      Mutate(with(Qcow2Spec{},
                  [](Qcow2Spec* s) {
                    s->extra_incompat_names = {{5, "fancy new feature"}};
                  }),
             [](Bytes* b) { Put64(b, kHdrIncompat, 1ULL << 5); }),
      kNotSupported, "unsupported qcow2 feature(s): fancy new feature");
  add("unknown-incompat-unnamed", Mutate(base, [](Bytes* b) { Put64(b, kHdrIncompat, 1ULL << 40); }), kNotSupported,
      "unsupported qcow2 feature(s): bit 40");
  add("data-file-without-name", Mutate(base, [](Bytes* b) { Put64(b, kHdrIncompat, 1ULL << 2); }), kCorrupt,
      "uses an external data file but does not name it");
  add("data-file-raw-without-data-file", Mutate(base, [](Bytes* b) { Put64(b, kHdrAutoclear, 2); }), kCorrupt,
      "data-file-raw (autoclear feature bit 1) is set but the image has no external data file");

  // Encryption.
  // Without a key an encrypted image opens only for its metadata
  // (OpenOptions::allow_missing_keys); LUKS needs its header extension.
  add("crypt-aes", Mutate(base, [](Bytes* b) { Put32(b, kHdrCrypt, 1); }), Status::Code::kInvalidArgument,
      "Parameter 'encrypt.key-secret' is required for cipher");
  add("crypt-luks", Mutate(base, [](Bytes* b) { Put32(b, kHdrCrypt, 2); }), kCorrupt,
      "LUKS encryption without its header extension");
  add("crypt-3", Mutate(base, [](Bytes* b) { Put32(b, kHdrCrypt, 3); }), kCorrupt, "unknown encryption method 3");
  add("crypto-ext-without-luks",
      with(Qcow2Spec{}, [](Qcow2Spec* s) { s->raw_extensions = ExtBytes(kExtCrypto, Bytes(16, 0)); }), kCorrupt,
      "encryption header extension present but the image is not LUKS encrypted");

  // Compression type.
  add("compression-type-2",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrIncompat, 1ULL << 3);
               Put8(b, kHdrCompressionType, 2);
             }),
      kNotSupported, "unknown compression type 2");
  add("compression-type-2-no-bit", Mutate(base, [](Bytes* b) { Put8(b, kHdrCompressionType, 2); }), kNotSupported,
      "unknown compression type 2");
  add("compression-bit-without-type", Mutate(base, [](Bytes* b) { Put64(b, kHdrIncompat, 1ULL << 3); }), kCorrupt,
      "compression type 0 disagrees with the compression type feature bit");
  add("compression-type-without-bit", Mutate(base, [](Bytes* b) { Put8(b, kHdrCompressionType, 1); }), kCorrupt,
      "compression type 1 disagrees with the compression type feature bit");
  add("compression-bit-header-104",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrIncompat, 1ULL << 3);
               Put8(b, kHdrCompressionType, 1);
               Put32(b, kHdrHeaderLength, 104);
             }),
      kCorrupt, "compression type 0 disagrees");  // the type byte lies outside the header

  // Extended L2.
  add("extended-l2-c4k", Mutate(base, [](Bytes* b) { Put64(b, kHdrIncompat, 1ULL << 4); }), kCorrupt,
      "extended L2 entries need clusters of at least 16 KiB");

  // Backing file name.
  add("backing-offset-past-cluster",
      Mutate(base,
             [&](Bytes* b) {
               Put64(b, kHdrBackingOffset, cs + 8);
               Put32(b, kHdrBackingSize, 4);
             }),
      kCorrupt, "backing file name offset 0x1008 is outside the first cluster");
  add("backing-offset-huge",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrBackingOffset, ~0ULL);
               Put32(b, kHdrBackingSize, 4);
             }),
      kCorrupt, "is outside the first cluster");
  add("backing-name-1024",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrBackingOffset, 2048);
               Put32(b, kHdrBackingSize, 1024);
             }),
      kCorrupt, "backing file name is too long (1024 bytes)");
  add("backing-name-past-cluster",
      Mutate(base,
             [&](Bytes* b) {
               Put64(b, kHdrBackingOffset, cs - 8);
               Put32(b, kHdrBackingSize, 100);
             }),
      kCorrupt, "backing file name is too long (100 bytes)");
  add("backing-name-max-u32",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrBackingOffset, 512);
               Put32(b, kHdrBackingSize, 0xffffffff);
             }),
      kCorrupt, "backing file name is too long");

  // Header extensions.
  add("extension-too-large",
      with(Qcow2Spec{}, [](Qcow2Spec* s) { s->raw_extensions = ExtBytes(0x12345678, Bytes(8, 0), 0x7fffffff); }),
      kCorrupt, "header extension 0x12345678 at offset");
  c.back().expect = "is too large (2147483647 bytes)";
  add("extension-past-cluster",
      with(Qcow2Spec{},
           [&](Qcow2Spec* s) { s->raw_extensions = ExtBytes(0x12345678, Bytes(8, 0), static_cast<uint32_t>(cs)); }),
      kCorrupt, "header extension 0x12345678");
  add("extension-end-marker-too-large",
      with(Qcow2Spec{}, [](Qcow2Spec* s) { s->raw_extensions = ExtBytes(0, {}, 0x7fffffff); }), kCorrupt,
      "header extension 0 at offset 0x1f8 is too large (2147483647 bytes)");
  add("extension-header-cut-by-backing-name",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrBackingOffset, 116);
               Put32(b, kHdrBackingSize, 4);
             }),
      kCorrupt, "header extension at offset 0x70 is truncated");
  add("backing-format-16-bytes",
      with(Qcow2Spec{},
           [](Qcow2Spec* s) {
             s->backing = "base.raw";
             s->backing_format = "0123456789abcdef";
           }),
      kCorrupt, "backing format name is too long (16 bytes)");
  const auto bitmaps = [&](Bytes ext_bytes, bool autoclear) {
    return Mutate(with(Qcow2Spec{}, [&](Qcow2Spec* s) { s->raw_extensions = ext_bytes; }), [&](Bytes* b) {
      if (autoclear) Put64(b, kHdrAutoclear, 1);
    });
  };
  add("bitmaps-ext-length-16", bitmaps(ExtBytes(kExtBitmaps, Bytes(16, 0)), true), kCorrupt,
      "bitmaps extension has invalid length 16");
  add("bitmaps-ext-length-16-stale", bitmaps(ExtBytes(kExtBitmaps, Bytes(16, 0)), false), kCorrupt,
      "bitmaps extension has invalid length 16");
  add("bitmaps-zero", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(0, 0, 0, 0)), true), kCorrupt,
      "bitmaps extension lists zero bitmaps");
  add("bitmaps-too-many", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(65536, 0, 24, 5 * cs)), true), kCorrupt,
      "image has 65536 bitmaps, more than the maximum of 65535");
  add("bitmaps-reserved", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(1, 1, 24, 5 * cs)), true), kCorrupt,
      "bitmaps extension reserved field is not zero");
  add("bitmaps-directory-too-large", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(1, 0, 1024 * 65535 + 8, 5 * cs)), true),
      kCorrupt, "bitmap directory is too large");
  add("bitmaps-directory-unaligned", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(1, 0, 24, 5 * cs + 8)), true), kCorrupt,
      "bitmap directory offset 0x5008 is not cluster aligned");
  add("bitmaps-directory-past-eof", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(1, 0, 24, 1000 * cs)), true), kCorrupt,
      "bitmap directory at offset 0x3e8000");
  // The refcount block read as a directory entry: granularity_bits 0.
  add("bitmaps-directory-entry-invalid", bitmaps(ExtBytes(kExtBitmaps, BitmapsExt(1, 0, 24, 2 * cs)), true), kCorrupt,
      "bitmap granularity 2^0 is out of range");

  // Bitmap directory entries (QEMU's bitmap_list_load and check_dir_entry).
  Qcow2Spec bmspec;
  bmspec.bitmap = true;
  const Qcow2Built bm = BuildQcow2(bmspec);
  const uint64_t bd = bm.bitmap_dir;
  const uint64_t bext = FindExt(bm.file, kExtBitmaps);
  add("bitmap-extra-data", with(bmspec, [](Qcow2Spec* s) { s->bitmap_extra = 8; }), kNotSupported,
      "bitmap 'bm0' has extra data, which is not supported");
  add("bitmap-table-unaligned", Mutate(bm.file, [&](Bytes* b) { Put64(b, bd, bm.bitmap_table + 512); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table (1 entries at offset 0x8200)");
  add("bitmap-table-offset-0", Mutate(bm.file, [&](Bytes* b) { Put64(b, bd, 0); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table");
  add("bitmap-table-size-0", Mutate(bm.file, [&](Bytes* b) { Put32(b, bd + 8, 0); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table (0 entries");
  add("bitmap-table-too-large", Mutate(bm.file, [&](Bytes* b) { Put32(b, bd + 8, 0x8000000); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table (134217728 entries");
  add("bitmap-table-wrong-size", Mutate(bm.file, [&](Bytes* b) { Put32(b, bd + 8, 2); }), kCorrupt,
      "bitmap 'bm0' has 2 bitmap table entries where 1 are needed");
  add("bitmap-granularity-8", Mutate(bm.file, [&](Bytes* b) { Put8(b, bd + 17, 8); }), kCorrupt,
      "bitmap granularity 2^8 is out of range");
  add("bitmap-granularity-32", Mutate(bm.file, [&](Bytes* b) { Put8(b, bd + 17, 32); }), kCorrupt,
      "bitmap granularity 2^32 is out of range");
  add("bitmap-reserved-flags", Mutate(bm.file, [&](Bytes* b) { Put32(b, bd + 12, 6); }), kCorrupt,
      "bitmap 'bm0' has reserved flags set (0x6)");
  add("bitmap-type-2", Mutate(bm.file, [&](Bytes* b) { Put8(b, bd + 16, 2); }), kCorrupt,
      "bitmap 'bm0' has unknown type 2");
  add("bitmap-name-1024",
      Mutate(bm.file,
             [&](Bytes* b) {
               Put16(b, bd + 18, 1024);
               Put64(b, bext + 8, 24 + 1024);
             }),
      kCorrupt, "has a name longer than 1023 bytes");
  add("bitmap-directory-empty", Mutate(bm.file, [&](Bytes* b) { Put64(b, bext + 8, 0); }), kCorrupt,
      "bitmap directory is empty");
  add("bitmap-directory-fewer", Mutate(bm.file, [&](Bytes* b) { Put32(b, bext, 2); }), kCorrupt,
      "bitmap directory holds 1 bitmaps where its header extension gives 2");
  add("bitmap-directory-more", Mutate(bm.file, [&](Bytes* b) { Put64(b, bext + 8, 64); }), kCorrupt,
      "bitmap directory holds more bitmaps than the 1 its header extension gives");
  add("bitmap-directory-cut", Mutate(bm.file, [&](Bytes* b) { Put64(b, bext + 8, 16); }), kCorrupt,
      "bitmap directory is truncated");
  add("bitmap-entry-overflows", Mutate(bm.file, [&](Bytes* b) { Put16(b, bd + 18, 9); }), kCorrupt,
      "bitmap directory entry overflows the directory");
  // Bitmap table entries (QEMU's bitmap_table_load and check_table_entry), for a bitmap not in use.
  const uint64_t bt = bm.bitmap_table;
  add("bitmap-table-entry-reserved", Mutate(bm.file, [&](Bytes* b) { Put64(b, bt, 2); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table entry at offset 0x8000 (0x2): reserved bits set");
  add("bitmap-table-entry-reserved-high",
      Mutate(bm.file, [&](Bytes* b) { Put64(b, bt, (1ULL << 56) | bm.data_offset); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table entry at offset 0x8000 (0x100000000005000): reserved bits set");
  add("bitmap-table-entry-unaligned", Mutate(bm.file, [&](Bytes* b) { Put64(b, bt, bm.data_offset + 512); }), kCorrupt,
      "bitmap 'bm0' has an invalid bitmap table entry at offset 0x8000 (0x5200): a data offset that is not cluster "
      "aligned");
  add("bitmap-table-entry-all-ones-with-offset", Mutate(bm.file, [&](Bytes* b) { Put64(b, bt, bm.data_offset | 1); }),
      kCorrupt, "bitmap 'bm0' has an invalid bitmap table entry at offset 0x8000 (0x5001): the all-ones flag set");

  // Virtual size and active L1 table.
  add("l1-size-huge", Mutate(base, [](Bytes* b) { Put32(b, kHdrL1Size, 32 * kMiB / 8 + 1); }), kCorrupt,
      "active L1 table is too large (4194305 entries)");
  add("l1-size-max-u32", Mutate(base, [](Bytes* b) { Put32(b, kHdrL1Size, 0xffffffff); }), kCorrupt,
      "active L1 table is too large");
  add("l1-size-0", Mutate(base, [](Bytes* b) { Put32(b, kHdrL1Size, 0); }), kCorrupt,
      "active L1 table is too small: 0 entries for 1048576 bytes need 1");
  add("l1-too-small-for-size", Mutate(base, [](Bytes* b) { Put64(b, kHdrSize, 3 * kMiB); }), kCorrupt,
      "active L1 table is too small: 1 entries for 3145728 bytes need 2");
  add("l1-unaligned", Mutate(base, [&](Bytes* b) { Put64(b, kHdrL1Offset, 3 * cs + 512); }), kCorrupt,
      "active L1 table offset 0x3200 is not cluster aligned");
  add("l1-empty-unaligned",
      Mutate(base,
             [&](Bytes* b) {
               Put64(b, kHdrSize, 0);
               Put32(b, kHdrL1Size, 0);
               Put64(b, kHdrL1Offset, 3 * cs + 8);
             }),
      kCorrupt, "active L1 table offset 0x3008 is not cluster aligned");
  add("l1-overflow", Mutate(base, [](Bytes* b) { Put64(b, kHdrL1Offset, 0xfffffffffffff000ULL); }), kCorrupt,
      "active L1 table at offset 0xfffffffffffff000 with 8 bytes overflows");
  add("l1-past-int64",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrL1Offset, 0x7ffffffffffff000ULL);
               Put32(b, kHdrL1Size, 0x1000);
             }),
      kCorrupt, "overflows the file offset range");
  add("l1-past-eof", Mutate(base, [&](Bytes* b) { Put64(b, kHdrL1Offset, 1000 * cs); }), kCorrupt,
      "active L1 table at offset 0x3e8000 (8 bytes) lies beyond the end of the file");
  add("size-above-int64", Mutate(base, [](Bytes* b) { Put64(b, kHdrSize, ~0ULL); }), kCorrupt,
      "virtual size 18446744073709551615 is too large");
  add("size-image-too-big", Mutate(base, [](Bytes* b) { Put64(b, kHdrSize, 1ULL << 62); }), kCorrupt,
      "image is too big: virtual size 4611686018427387904");

  // Refcount table.
  add("reftable-clusters-0", Mutate(base, [](Bytes* b) { Put32(b, kHdrRefTableClusters, 0); }), kCorrupt,
      "image has no reference count table");
  add("reftable-clusters-huge", Mutate(base, [](Bytes* b) { Put32(b, kHdrRefTableClusters, 0xffffffff); }), kCorrupt,
      "reference count table is too large (4294967295 clusters)");
  add("reftable-clusters-over-8mib",
      Mutate(base, [&](Bytes* b) { Put32(b, kHdrRefTableClusters, static_cast<uint32_t>(8 * kMiB / cs + 1)); }),
      kCorrupt, "reference count table is too large (2049 clusters)");
  add("reftable-unaligned", Mutate(base, [](Bytes* b) { Put64(b, kHdrRefTableOffset, 0x1234567890abcdefULL); }),
      kCorrupt, "reference count table offset 0x1234567890abcdef is not cluster aligned");
  add("reftable-overflow",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kHdrRefTableOffset, 0xffffffffffff0000ULL);
               Put32(b, kHdrRefTableClusters, 0x7f);
             }),
      kCorrupt, "reference count table at offset 0xffffffffffff0000 with 520192 bytes overflows");
  add("reftable-past-eof", Mutate(base, [&](Bytes* b) { Put64(b, kHdrRefTableOffset, 1000 * cs); }), kCorrupt,
      "reference count table at offset 0x3e8000 (4096 bytes) lies beyond the end of the file");

  // Snapshot table.
  add("snapshots-65537", Mutate(base, [](Bytes* b) { Put32(b, kHdrNbSnapshots, 65537); }), kCorrupt,
      "too many snapshots (65537)");
  add("snapshots-max-u32", Mutate(base, [](Bytes* b) { Put32(b, kHdrNbSnapshots, 0xffffffff); }), kCorrupt,
      "too many snapshots (4294967295)");
  add("snapshots-65536-past-eof",
      Mutate(base,
             [&](Bytes* b) {
               Put32(b, kHdrNbSnapshots, 65536);
               Put64(b, kHdrSnapshotsOffset, 5 * cs);
             }),
      kCorrupt, "snapshot table at offset 0x5000 (2621440 bytes) lies beyond the end of the file");
  add("snapshot-table-past-eof",
      Mutate(base,
             [&](Bytes* b) {
               Put32(b, kHdrNbSnapshots, 1);
               Put64(b, kHdrSnapshotsOffset, 1000 * cs);
             }),
      kCorrupt, "snapshot table at offset 0x3e8000 (40 bytes) lies beyond the end of the file");
  add("snapshot-table-unaligned",
      Mutate(base,
             [&](Bytes* b) {
               Put32(b, kHdrNbSnapshots, 1);
               Put64(b, kHdrSnapshotsOffset, 5 * cs + 8);
             }),
      kCorrupt, "snapshot table offset 0x5008 is not cluster aligned");
  add("snapshot-table-unaligned-none", Mutate(base, [&](Bytes* b) { Put64(b, kHdrSnapshotsOffset, 5 * cs + 8); }),
      kCorrupt, "snapshot table offset 0x5008 is not cluster aligned");
  add("snapshot-table-overflow",
      Mutate(base,
             [](Bytes* b) {
               Put32(b, kHdrNbSnapshots, 0xffff);
               Put64(b, kHdrSnapshotsOffset, 0xffffffffffff0000ULL);
             }),
      kCorrupt, "snapshot table at offset 0xffffffffffff0000 with 2621400 bytes overflows");
  const uint64_t se = snap.snapshot_table;
  add("snapshot-extra-1025", Mutate(snap.file, [&](Bytes* b) { Put32(b, se + 36, 1025); }), kCorrupt,
      "snapshot 0 has too much extra data (1025 bytes)");
  add("snapshot-extra-v3-too-small", Mutate(snap.file, [&](Bytes* b) { Put32(b, se + 36, 8); }), kCorrupt,
      "snapshot 0 lacks the extra data version 3 requires");
  add("snapshot-entry-past-eof",
      Mutate(snap.file,
             [&](Bytes* b) {
               Put16(b, se + 14, 0xffff);
               Put16(b, se + 12, 0xffff);
             }),
      kCorrupt, "snapshot table entry at offset 0x7028");
  add("snapshot-l1-too-large", Mutate(snap.file, [&](Bytes* b) { Put32(b, se + 8, 0x10000000); }), kCorrupt,
      "snapshot 'snap1' L1 table is too large (268435456 entries)");
  add("snapshot-l1-unaligned", Mutate(snap.file, [&](Bytes* b) { Put64(b, se, snap.snapshot_l1 + 512); }), kCorrupt,
      "snapshot 'snap1' L1 table offset 0x8200 is not cluster aligned");
  add("snapshot-name-with-newline",
      Mutate(snap.file,
             [&](Bytes* b) {
               PutBytes(b, se + 57, "sn\nap");
               Put64(b, se, snap.snapshot_l1 + 512);
             }),
      kCorrupt, "L1 table offset 0x8200 is not cluster aligned");
  {
    Case& k = add("snapshot-l1-past-eof", Mutate(snap.file, [&](Bytes* b) { Put64(b, se, 1000 * cs); }), kCorrupt,
                  "L1 table of snapshot 'snap1' at offset 0x3e8000 (8 bytes) lies beyond the end of the file");
    k.snapshot = "snap1";
  }
  {
    Case& k = add("snapshot-l1-too-small", Mutate(snap.file, [&](Bytes* b) { Put32(b, se + 8, 0); }), kCorrupt,
                  "L1 table of snapshot 'snap1' is too small");
    k.snapshot = "snap1";
  }
  {
    Case& k = add("snapshot-disk-size-huge", Mutate(snap.file, [&](Bytes* b) { Put64(b, se + 48, ~0ULL); }), kCorrupt,
                  "snapshot 'snap1' has an invalid disk size");
    k.snapshot = "1";
  }
  add("v2-snapshot-extra-1025",
      Mutate(BuildQcow2([&] {
               Qcow2Spec s = v2spec;
               s.snapshot = true;
               return s;
             }())
                 .file,
             [&](Bytes* b) { Put32(b, se + 36, 1025); }),
      kCorrupt, "too much extra data");

  // Tables reached while reading.
  add("l2-unaligned", Mutate(base, [&](Bytes* b) { Put64(b, v3.l1_offset, (v3.l2_offset + 512) | kCopied); }), kCorrupt,
      "L2 table offset 0x4200 is not cluster aligned (L1 index 0)")
      .stage = Stage::kRead;
  add("l2-past-eof", Mutate(base, [&](Bytes* b) { Put64(b, v3.l1_offset, (1000 * cs) | kCopied); }), kCorrupt,
      "L2 table at offset 0x3e8000")
      .stage = Stage::kRead;
  add("l2-max-offset", Mutate(base, [&](Bytes* b) { Put64(b, v3.l1_offset, 0x00fffffffffff000ULL | kCopied); }),
      kCorrupt, "L2 table at offset 0xfffffffffff000")
      .stage = Stage::kRead;
  // Bit 0 of an L2 entry is the zero flag only from version 3 on (QEMU's qcow2_get_host_offset).
  add("v2-zero-flag", Mutate(v2.file, [&](Bytes* b) { Put64(b, v2.l2_offset + 2 * 8, 1); }), kCorrupt,
      "zero cluster entry in a version 2 (compat=0.10) image for guest offset 0x2000 (L2 table at offset 0x4000, entry "
      "at 0x4010)")
      .stage = Stage::kRead;
  add("v2-zero-flag-allocated",
      Mutate(v2.file, [&](Bytes* b) { Put64(b, v2.l2_offset, v2.data_offset | kCopied | 1); }), kCorrupt,
      "zero cluster entry in a version 2 (compat=0.10) image for guest offset 0 (L2 table at offset 0x4000")
      .stage = Stage::kRead;
  add("data-unaligned", Mutate(base, [&](Bytes* b) { Put64(b, v3.l2_offset, (v3.data_offset + 512) | kCopied); }),
      kCorrupt, "data cluster offset 0x5200 for guest offset 0 is not cluster aligned")
      .stage = Stage::kRead;
  add("compressed-garbage",
      Mutate(base,
             [&](Bytes* b) {
               std::fill(b->begin() + v3.compressed_offset, b->begin() + v3.compressed_offset + 512, 0xff);
             }),
      kCorrupt, "compressed cluster at host offset 0x6000: invalid deflate data")
      .stage = Stage::kRead;
  add("compressed-offset-huge",
      Mutate(base, [&](Bytes* b) { Put64(b, v3.l2_offset + 8, kCompressedFlag | (1ULL << 57)); }), kCorrupt,
      "compressed cluster offset 0x200000000000000 for guest offset 0x1000 is out of range")
      .stage = Stage::kRead;
  add("compressed-cut-short",
      // A stored block whose length and its complement disagree.
      Mutate(base, [&](Bytes* b) { Put64(b, v3.compressed_offset, 0); }), kCorrupt,
      "compressed cluster at host offset 0x6000")
      .stage = Stage::kRead;
  add("extended-l2-alloc-and-zero", Mutate(ext.file, [&](Bytes* b) { Put64(b, ext.l2_offset + 8, (1ULL << 32) | 1); }),
      kCorrupt, "invalid subcluster bitmap 0x100000001 for guest offset 0")
      .stage = Stage::kRead;
  add("extended-l2-alloc-without-offset",
      Mutate(ext.file, [&](Bytes* b) { Put64(b, ext.l2_offset + 3 * 16 + 8, 0x10); }), kCorrupt,
      "invalid subcluster bitmap 0x10 for guest offset 0xc000")
      .stage = Stage::kRead;

  // External data file: host offsets must equal guest offsets; no compression.
  const auto data_file_image = [&](auto edit) {
    Bytes b = with(Qcow2Spec{}, [](Qcow2Spec* s) {
      s->raw_extensions = ExtBytes(0x44415441, Bytes{'d', 'i', 's', 'k', '.', 'd', 'a', 't', 'a'});
    });
    Put64(&b, kHdrIncompat, 1ULL << 2);
    edit(&b);
    return b;
  };
  add("data-file-offset-mismatch", data_file_image([](Bytes*) {}), kCorrupt,
      "external data file offset 0x5000 for guest offset 0 differs from the guest offset")
      .stage = Stage::kRead;
  c.back().extra_files = {{"disk.data", DataPattern(64 * kKiB, 5)}};
  add("data-file-compressed", data_file_image([&](Bytes* b) { Put64(b, v3.l2_offset, kCopied); }), kCorrupt,
      "compressed cluster at guest offset 0x1000 in an image with an external data file")
      .stage = Stage::kRead;
  c.back().extra_files = {{"disk.data", DataPattern(64 * kKiB, 5)}};
  add("data-file-missing", data_file_image([](Bytes*) {}), Status::Code::kNotFound,
      "could not open external data file 'disk.data'");

  // Backing chain loop: the image names itself as its backing file; found by
  // identity before any table is loaded (tests/chain_bound_test.cc has the
  // other shapes).
  add("backing-loop",
      with(Qcow2Spec{},
           [](Qcow2Spec* s) {
             s->backing = "backing-loop.qcow2";
             s->backing_format = "qcow2";
           }),
      kCorrupt, "backing file '/img/backing-loop.qcow2' creates an infinite loop");
  add("backing-loop-probed", with(Qcow2Spec{}, [](Qcow2Spec* s) { s->backing = "backing-loop-probed.qcow2"; }),
      kCorrupt, "backing file '/img/backing-loop-probed.qcow2' creates an infinite loop");
  return c;
}

// ---------------------------------------------------------------------------
// qcow v1 rules
// ---------------------------------------------------------------------------
std::vector<Case> Qcow1Cases() {
  const Status::Code kCorrupt = Status::Code::kCorrupt;
  const Status::Code kNotSupported = Status::Code::kNotSupported;
  const Qcow1Built q = BuildQcow1();
  const Bytes& base = q.file;
  const uint64_t cs = q.cs;
  std::vector<Case> c;
  auto add = [&](std::string name, Bytes bytes, Status::Code code, std::string expect) -> Case& {
    c.push_back(Case{name + ".qcow", std::move(bytes), "qcow", code, std::move(expect)});
    return c.back();
  };
  add("v1-empty", {}, kCorrupt, "file is too short to hold a qcow header").probe = false;
  add("v1-30-bytes", Prefix(base, 30), kCorrupt, "file is too short to hold a qcow header");
  add("v1-header-only", Prefix(base, 48), kCorrupt,
      "L1 table at offset 0x1000 (8 bytes) lies beyond the end of the file");
  add("v1-bad-magic", Mutate(base, [](Bytes* b) { Put32(b, 0, 0x514649fa); }), kCorrupt, "not a qcow image (bad magic)")
      .probe = false;
  add("v1-version-2", Mutate(base, [](Bytes* b) { Put32(b, 4, 2); }), kNotSupported, "unsupported qcow version 2")
      .probe_expect = "unsupported cluster size 2^0";  // probes as qcow2
  add("v1-cluster-bits-8", Mutate(base, [](Bytes* b) { Put8(b, kQ1ClusterBits, 8); }), kCorrupt,
      "cluster size 2^8 is out of range");
  add("v1-cluster-bits-17", Mutate(base, [](Bytes* b) { Put8(b, kQ1ClusterBits, 17); }), kCorrupt,
      "cluster size 2^17 is out of range");
  add("v1-l2-bits-5", Mutate(base, [](Bytes* b) { Put8(b, kQ1L2Bits, 5); }), kCorrupt,
      "L2 table size 2^8 bytes is out of range");
  add("v1-l2-bits-14", Mutate(base, [](Bytes* b) { Put8(b, kQ1L2Bits, 14); }), kCorrupt,
      "L2 table size 2^17 bytes is out of range");
  add("v1-size-0", Mutate(base, [](Bytes* b) { Put64(b, kQ1Size, 0); }), kCorrupt, "virtual size 0 is too small");
  add("v1-size-1", Mutate(base, [](Bytes* b) { Put64(b, kQ1Size, 1); }), kCorrupt, "virtual size 1 is too small");
  add("v1-size-max-u64", Mutate(base, [](Bytes* b) { Put64(b, kQ1Size, ~0ULL); }), kCorrupt,
      "virtual size 18446744073709551615 is too large");
  add("v1-size-2^63", Mutate(base, [](Bytes* b) { Put64(b, kQ1Size, 1ULL << 63); }), kCorrupt, "is too large");
  add("v1-size-2^62", Mutate(base, [](Bytes* b) { Put64(b, kQ1Size, 1ULL << 62); }), kCorrupt,
      "image is too large: L1 table of 2199023255552 entries");
  add("v1-crypt-aes", Mutate(base, [](Bytes* b) { Put32(b, kQ1Crypt, 1); }), Status::Code::kInvalidArgument,
      "Parameter 'encrypt.key-secret' is required for cipher");
  add("v1-crypt-2", Mutate(base, [](Bytes* b) { Put32(b, kQ1Crypt, 2); }), kCorrupt, "unknown encryption method 2");
  add("v1-backing-name-1024",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kQ1BackingOffset, 48);
               Put32(b, kQ1BackingSize, 1024);
             }),
      kCorrupt, "backing file name is too long (1024 bytes)");
  add("v1-backing-name-past-eof",
      Mutate(base,
             [&](Bytes* b) {
               Put64(b, kQ1BackingOffset, 1000 * cs);
               Put32(b, kQ1BackingSize, 10);
             }),
      kCorrupt, "backing file name at offset 0x3e8000 (10 bytes) lies beyond the end of the file");
  add("v1-backing-offset-huge",
      Mutate(base,
             [](Bytes* b) {
               Put64(b, kQ1BackingOffset, 0xfffffffffffffff8ULL);
               Put32(b, kQ1BackingSize, 10);
             }),
      kCorrupt, "backing file name at offset 0xfffffffffffffff8 (10 bytes) lies beyond the end of the file");
  add("v1-l1-past-eof", Mutate(base, [&](Bytes* b) { Put64(b, kQ1L1Offset, 1000 * cs); }), kCorrupt,
      "L1 table at offset 0x3e8000 (8 bytes) lies beyond the end of the file");
  add("v1-l1-overflow", Mutate(base, [](Bytes* b) { Put64(b, kQ1L1Offset, 0xfffffffffffffffcULL); }), kCorrupt,
      "L1 table at offset 0xfffffffffffffffc (8 bytes) lies beyond the end of the file");
  add("v1-l2-past-eof", Mutate(base, [&](Bytes* b) { Put64(b, q.l1_offset, 1000 * cs); }), kCorrupt,
      "L2 table at offset 0x3e8000")
      .stage = Stage::kRead;
  add("v1-l2-offset-huge", Mutate(base, [&](Bytes* b) { Put64(b, q.l1_offset, 0xfffffffffffff000ULL); }), kCorrupt,
      "L2 table offset 0xfffffffffffff000 is out of range")
      .stage = Stage::kRead;
  add("v1-data-offset-huge", Mutate(base, [&](Bytes* b) { Put64(b, q.l2_offset, 0x7ffffffffffff000ULL); }), kCorrupt,
      "data cluster offset 0x7ffffffffffff000 for guest offset 0 is out of range")
      .stage = Stage::kRead;
  add("v1-data-unaligned", Mutate(base, [&](Bytes* b) { Put64(b, q.l2_offset, q.data_offset + 9); }), kCorrupt,
      "data cluster offset 0x3009 for guest offset 0 is not sector aligned")
      .stage = Stage::kRead;
  add("v1-compressed-garbage",
      Mutate(
          base,
          [&](Bytes* b) { std::fill(b->begin() + q.compressed_offset, b->begin() + q.compressed_offset + 16, 0xff); }),
      kCorrupt, "compressed cluster at host offset 0x4000: invalid deflate data")
      .stage = Stage::kRead;
  add("v1-compressed-size-0",
      Mutate(base, [&](Bytes* b) { Put64(b, q.l2_offset + 8, (1ULL << 63) | q.compressed_offset); }), kCorrupt,
      "compressed cluster at host offset 0x4000")
      .stage = Stage::kRead;
  add("v1-backing-loop", BuildQcow1("v1-backing-loop.qcow").file, kCorrupt,
      "backing file '/img/v1-backing-loop.qcow' creates an infinite loop");
  return c;
}

TEST_CASE("malformed qcow2 images are refused", "[malformed]") { RunCases(Qcow2Cases()); }

TEST_CASE("malformed qcow v1 images are refused", "[malformed]") { RunCases(Qcow1Cases()); }

// The block-device calls dmcowd's qcow2 plugin makes (DescribeCluster for
// every chunk it is asked about, FillClusters when a write moves a chunk)
// meet the same hostile tables as reads: each must refuse with the read's
// message, name the file, and never hand out or copy what a bad entry says.
TEST_CASE("hostile tables reached through the block-device calls are refused", "[malformed][device]") {
  const std::vector<std::string> table_cases = {"l2-unaligned",
                                                "l2-past-eof",
                                                "l2-max-offset",
                                                "data-unaligned",
                                                "compressed-offset-huge",
                                                "v2-zero-flag",
                                                "v2-zero-flag-allocated",
                                                "extended-l2-alloc-and-zero",
                                                "extended-l2-alloc-without-offset",
                                                "v1-l2-past-eof",
                                                "v1-l2-offset-huge",
                                                "v1-data-offset-huge",
                                                "v1-data-unaligned"};
  std::vector<Case> cases = Qcow2Cases();
  for (Case& c : Qcow1Cases()) cases.push_back(std::move(c));
  size_t seen = 0;
  for (const Case& c : cases) {
    const std::string stem = c.name.substr(0, c.name.rfind('.'));
    if (std::find(table_cases.begin(), table_cases.end(), stem) == table_cases.end()) continue;
    seen++;
    SECTION(c.name) {
      for (const bool writable : {false, true}) {
        MemEnv env;
        const std::string path = "/img/" + c.name;
        env.PutFile(path, c.bytes);
        OpenOptions options;
        options.env = &env;
        options.writable = writable;
        std::unique_ptr<Image> image;
        Status s = OpenImage(path, options, &image);
        INFO(c.name << (writable ? " writable" : " read-only") << ": " << s.ToString());
        REQUIRE(s.ok());
        const uint64_t cs = image->info().cluster_size;
        const uint64_t clusters = (image->virtual_size() + cs - 1) / cs;
        Status first_error;
        uint64_t bad = 0;
        for (uint64_t i = 0; i < clusters && first_error.ok(); i++) {
          DeviceImage::ClusterPlace p;
          first_error = Device(image)->DescribeCluster(i, &p);
          bad = i;
        }
        INFO("DescribeCluster: " << first_error.ToString());
        REQUIRE_FALSE(first_error.ok());
        CHECK(first_error.IsCorrupt());
        CHECK(Contains(first_error.message(), path));
        CHECK(Contains(first_error.message(), c.expect));
        CHECK(first_error.message().find('\n') == std::string::npos);
        if (!writable) continue;
        // A write to that chunk: the new cluster cannot be filled from it.
        uint64_t host = 0;
        REQUIRE(Device(image)->ReserveClusters(1, &host).ok());
        Status fill = Device(image)->FillClusters(bad, 1, host);
        INFO("FillClusters: " << fill.ToString());
        CHECK(fill.IsCorrupt());
        CHECK(Contains(fill.message(), path));
        CHECK(Device(image)->UnreserveClusters(1, host).ok());
      }
    }
  }
  CHECK(seen == table_cases.size());
}

// Rules that QEMU enforces and the engine once let through (found by
// mutation fuzzing): each refused case is refused by qemu-img too, and the
// files next to them that QEMU accepts are read as QEMU reads them.
TEST_CASE("rules QEMU enforces: qemu-img refuses the same files, and reads the neighbours alike", "[malformed][qemu]") {
  const std::vector<std::string> refused = {"v2-zero-flag",
                                            "v2-zero-flag-allocated",
                                            "data-file-raw-without-data-file",
                                            "bitmap-table-entry-reserved",
                                            "bitmap-table-entry-reserved-high",
                                            "bitmap-table-entry-unaligned",
                                            "bitmap-table-entry-all-ones-with-offset"};
  std::vector<Case> cases = Qcow2Cases();
  const bool qemu = HaveQemuImg();
  if (!qemu) NoteSkipped("qemu-img not found: the cases are not cross-checked with QEMU");
  TempDir dir;
  for (const std::string& stem : refused) {
    const Case* found = nullptr;
    for (const Case& c : cases) {
      if (c.name == stem + ".qcow2") found = &c;
    }
    REQUIRE(found);
    if (!qemu) continue;
    const std::string file = dir / found->name;
    WriteWholeFile(file, found->bytes);
    std::string out;
    INFO("qemu-img convert of " << found->name);
    CHECK(Run("qemu-img convert -f qcow2 -O raw '" + file + "' '" + file + ".raw'", &out) != 0);
  }

  // Accepted: how QEMU reads each, and the engine alike.
  struct Accepted {
    std::string name;
    Bytes file;
    Bytes guest;
    std::string format = "qcow2";
  };
  std::vector<Accepted> accepted;
  Qcow2Spec bmspec;
  bmspec.bitmap = true;
  const Qcow2Built bm = BuildQcow2(bmspec);
  // A table entry with the all-ones flag and no offset is valid.
  accepted.push_back(
      {"bitmap-table-entry-all-ones", Mutate(bm.file, [&](Bytes* b) { Put64(b, bm.bitmap_table, 1); }), bm.guest});
  // QEMU does not load the table of a bitmap in use (load_bitmap skips it).
  accepted.push_back({"bitmap-in-use-table-reserved",
                      Mutate(bm.file,
                             [&](Bytes* b) {
                               Put32(b, bm.bitmap_dir + 12, 3);
                               Put64(b, bm.bitmap_table, 2);
                             }),
                      bm.guest});
  // A table past the end of the file reads as zeros: valid entries.
  accepted.push_back(
      {"bitmap-table-past-eof", Mutate(bm.file, [&](Bytes* b) { Put64(b, bm.bitmap_dir, 1000 * bm.cs); }), bm.guest});
  // A virtual size that is not a multiple of 512 is rounded down (QEMU's
  // qcow2_do_open and qcow_open: total_sectors = size / 512).
  const Qcow2Built v3 = BuildQcow2(Qcow2Spec{});
  for (uint64_t size : {kMiB - 1, kMiB - 511, uint64_t{511}, uint64_t{1000}}) {
    Bytes guest(v3.guest.begin(), v3.guest.begin() + (size & ~uint64_t{511}));
    accepted.push_back(
        {"size-" + std::to_string(size), Mutate(v3.file, [&](Bytes* b) { Put64(b, kHdrSize, size); }), guest});
  }
  const Qcow1Built q1 = BuildQcow1();
  for (uint64_t size : {kMiB - 1, uint64_t{4096 + 700}, uint64_t{2}}) {
    Bytes guest(q1.guest.begin(), q1.guest.begin() + (size & ~uint64_t{511}));
    accepted.push_back({"v1-size-" + std::to_string(size), Mutate(q1.file, [&](Bytes* b) { Put64(b, kQ1Size, size); }),
                        guest, "qcow"});
  }
  for (const Accepted& a : accepted) {
    SECTION(a.name) {
      MemEnv env;
      const std::string path = "/img/" + a.name;
      env.PutFile(path, a.file);
      for (const std::string& format : {a.format, std::string()}) {
        Outcome o = OpenAndReadAll(&env, path, format, "", true);
        INFO(a.name << " format '" << format << "': " << o.status.ToString());
        REQUIRE(o.status.ok());
        CHECK(FirstDifference(o.content, a.guest) == "none");
      }
      if (qemu) {
        const std::string file = dir / a.name;
        WriteWholeFile(file, a.file);
        MustRun("qemu-img convert -f " + a.format + " -O raw '" + file + "' '" + file + ".raw'");
        CHECK(FirstDifference(ReadWholeFile(file + ".raw"), a.guest) == "none");
      }
    }
  }
}

// A version 2 zero cluster is corrupt for the write engine too: nothing is
// written over it or copied from it, and it never reads as zeros.
TEST_CASE("a zero cluster in a version 2 image is refused by writes", "[malformed]") {
  Qcow2Spec v2spec;
  v2spec.version = 2;
  const Qcow2Built v2 = BuildQcow2(v2spec);
  const uint64_t cs = v2.cs;
  for (const bool allocated : {false, true}) {
    SECTION(allocated ? "allocated" : "plain") {
      MemEnv env;
      const std::string path = "/img/v2-zero.qcow2";
      Bytes file = v2.file;
      const uint64_t cluster = allocated ? 0 : 2;
      Put64(&file, v2.l2_offset + cluster * 8, allocated ? (v2.data_offset | kCopied | 1) : 1);
      env.PutFile(path, file);
      OpenOptions options;
      options.env = &env;
      options.writable = true;
      std::unique_ptr<Image> image;
      REQUIRE(OpenImage(path, options, &image).ok());
      const Bytes data = DataPattern(cs, 3);
      struct Op {
        const char* what;
        std::function<Status()> run;
      };
      const std::vector<Op> ops = {
          {"whole-cluster write", [&] { return image->Write(cluster * cs, data.data(), cs); }},
          {"partial write", [&] { return image->Write(cluster * cs + 100, data.data(), 100); }},
          {"zero write", [&] { return image->WriteZeroes(cluster * cs, cs); }},
          {"discard", [&] { return image->Discard(cluster * cs, cs); }},
          {"read",
           [&] {
             Bytes buf(cs);
             return image->Read(cluster * cs, buf.data(), cs);
           }},
      };
      for (const Op& op : ops) {
        Status s = op.run();
        INFO(op.what << ": " << s.ToString());
        CHECK(s.IsCorrupt());
        CHECK(Contains(s.message(), path));
        CHECK(Contains(s.message(), "zero cluster entry in a version 2"));
      }
      // The first refusal stopped writing through this open (rule 9 of
      // qcow/src/qcow2/qcow2_write.cc): the flush says so, and nothing reached the file.
      const Status flushed = image->Flush();
      INFO("flush: " << flushed.ToString());
      CHECK(flushed.IsCorrupt());
      CHECK(Contains(flushed.message(), "no more writes through this open"));
      image.reset();
      Bytes after;
      REQUIRE(env.GetFile(path, &after));
      CHECK(FirstDifference(Bytes(after.begin(), after.begin() + file.size()), file) == "none");
    }
  }
}

TEST_CASE("messages stay on one line whatever the image holds", "[malformed]") {
  // A feature name and a backing file name with control characters.
  Qcow2Spec spec;
  spec.extra_incompat_names = {{6, "evil\nname\r\x1b[31m"}};
  Bytes file = BuildQcow2(spec).file;
  Put64(&file, kHdrIncompat, 1ULL << 6);
  MemEnv env;
  env.PutFile("/img/ctl.qcow2", file);
  Outcome o = OpenAndReadAll(&env, "/img/ctl.qcow2", "");
  INFO(o.status.message());
  REQUIRE(o.status.IsNotSupported());
  CHECK(o.status.message().find_first_of("\n\r\x1b") == std::string::npos);
  CHECK(Contains(o.status.message(), "evil"));

  Qcow2Spec missing;
  missing.backing = "no\nsuch\tfile";
  env.PutFile("/img/missing-backing.qcow2", BuildQcow2(missing).file);
  o = OpenAndReadAll(&env, "/img/missing-backing.qcow2", "");
  INFO(o.status.message());
  REQUIRE(o.status.IsNotFound());
  CHECK(o.status.message().find_first_of("\n\r\t") == std::string::npos);
  CHECK(Contains(o.status.message(), "/img/missing-backing.qcow2"));
}

TEST_CASE("MemEnv behaves like a file system", "[malformed]") {
  std::unique_ptr<Env> base = NewMemEnv();
  auto* env = static_cast<MemEnv*>(base.get());
  std::unique_ptr<File> f;
  CHECK(env->OpenFile("/x", OpenMode::kReadOnly, &f).IsNotFound());
  CHECK(env->OpenFile("/x", OpenMode::kReadWrite, &f).IsNotFound());
  REQUIRE(env->OpenFile("/x", OpenMode::kCreateTruncate, &f).ok());
  CHECK(env->FileExists("/x"));
  REQUIRE(f->Write(10, "abc", 3).ok());
  uint64_t size = 0;
  REQUIRE(f->Size(&size).ok());
  CHECK(size == 13);
  char buf[32];
  size_t got = 0;
  REQUIRE(f->Read(8, sizeof(buf), buf, &got).ok());
  CHECK(got == 5);
  CHECK(std::memcmp(buf, "\0\0abc", 5) == 0);
  REQUIRE(f->Read(100, 4, buf, &got).ok());
  CHECK(got == 0);
  REQUIRE(f->Read(~0ULL - 2, 4, buf, &got).ok());
  CHECK(got == 0);
  CHECK(!f->Write(~0ULL - 2, "abc", 3).ok());
  REQUIRE(f->Truncate(4).ok());
  Bytes content;
  REQUIRE(env->GetFile("/x", &content));
  CHECK(content == Bytes(4, 0));
  REQUIRE(f->Sync().ok());
  std::unique_ptr<File> ro;
  REQUIRE(env->OpenFile("/x", OpenMode::kReadOnly, &ro).ok());
  CHECK(!ro->Write(0, "a", 1).ok());
  CHECK(!ro->Truncate(0).ok());
  env->PutFile("/x", std::string("hello"));
  REQUIRE(ro->Read(0, sizeof(buf), buf, &got).ok());
  CHECK(std::string(buf, got) == "hello");
  CHECK(ro->name() == "/x");
  REQUIRE(env->DeleteFile("/x"));
  CHECK(!env->FileExists("/x"));
  REQUIRE(ro->Read(0, sizeof(buf), buf, &got).ok());  // an unlinked file stays readable
  CHECK(got == 5);
  REQUIRE(env->OpenFile("/y", OpenMode::kCreateTruncate, &f).ok());
  CHECK(env->ListFiles() == std::vector<std::string>{"/y"});
}

// ---------------------------------------------------------------------------
// dmcow-img info on malformed files: exit status 1, one line on stderr
// naming the file.
// ---------------------------------------------------------------------------
TEST_CASE("dmcow-img info refuses malformed files with a one-line message", "[malformed][cli]") {
  const std::string bin = DMCOW_IMG_PATH;
  if (::access(bin.c_str(), X_OK) != 0) {
    DMCOW_SKIP("dmcow-img not built: " + bin);
  }
  TempDir dir;
  std::vector<Case> cases;
  for (const Case& c : Qcow2Cases()) {
    if (c.stage == Stage::kOpen && c.snapshot.empty() && c.probe && !Contains(c.name, "backing-loop"))
      cases.push_back(c);
  }
  for (const Case& c : Qcow1Cases()) {
    if (c.stage == Stage::kOpen && c.probe && !Contains(c.name, "backing-loop")) cases.push_back(c);
  }
  const std::vector<std::string> wanted = {
      "l1-size-huge.qcow2",    "reftable-unaligned.qcow2", "crypt-luks.qcow2",   "unknown-incompat-named.qcow2",
      "snapshots-65537.qcow2", "v1-cluster-bits-17.qcow",  "v1-l1-past-eof.qcow"};
  for (const std::string& name : wanted) {
    const Case* found = nullptr;
    for (const Case& c : cases) {
      if (c.name == name) found = &c;
    }
    REQUIRE(found);
    SECTION(name) {
      const std::string file = dir / name;
      WriteWholeFile(file, found->bytes);
      const std::string err = file + ".stderr";
      int rc = Run("{ '" + bin + "' info '" + file + "' >/dev/null 2>'" + err + "'; }");
      const Bytes raw = ReadWholeFile(err);
      const std::string text(raw.begin(), raw.end());
      INFO("stderr: " << text);
      CHECK(rc == 1);
      REQUIRE(!text.empty());
      CHECK(text.back() == '\n');
      CHECK(text.find('\n') == text.size() - 1);
      CHECK(Contains(text, file));
      CHECK(Contains(text, found->expect));
    }
  }
}

// Hidden (run with "[dump]"): writes every malformed case, and the valid
// images they derive from, to $DMCOW_MALFORMED_DUMP_DIR, e.g. to compare
// with QEMU or to seed the fuzzer.
TEST_CASE("dump the malformed cases to a directory", "[.][dump]") {
  const char* dir = std::getenv("DMCOW_MALFORMED_DUMP_DIR");
  REQUIRE(dir);
  for (const std::vector<Case>& cases : {Qcow2Cases(), Qcow1Cases()}) {
    for (const Case& c : cases) WriteWholeFile(std::string(dir) + "/" + c.name, c.bytes);
  }
  Qcow2Spec v2;
  v2.version = 2;
  Qcow2Spec ext;
  ext.cluster_bits = 14;
  ext.extended_l2 = true;
  Qcow2Spec snap;
  snap.snapshot = true;
  WriteWholeFile(std::string(dir) + "/valid-v3.qcow2", BuildQcow2(Qcow2Spec{}).file);
  WriteWholeFile(std::string(dir) + "/valid-v2.qcow2", BuildQcow2(v2).file);
  WriteWholeFile(std::string(dir) + "/valid-extl2.qcow2", BuildQcow2(ext).file);
  WriteWholeFile(std::string(dir) + "/valid-snapshot.qcow2", BuildQcow2(snap).file);
  WriteWholeFile(std::string(dir) + "/valid-v1.qcow", BuildQcow1().file);
}
