// Partition tables as attach reads them (partition_table.h): tables that
// util-linux's sfdisk made read as sfdisk lists them, kpartx's names and
// numbers, and damaged or hostile tables mapped partly or not at all, with
// the reason, never read out of bounds.
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <sstream>

#include "partition_table.h"
#include "test_util.h"

using namespace dmcow_test;
using dmcowd::PartitionTable;

namespace {

constexpr uint64_t kDiskBytes = 64 << 20;

// A 64 MiB file partitioned by sfdisk from `script`.
std::string Partitioned(const TempDir& dir, const std::string& script) {
  const std::string path = dir.path() + "/disk.img";
  MustRun("rm -f '" + path + "' && truncate -s " + std::to_string(kDiskBytes) + " '" + path + "'");
  MustRun("printf '" + script + "' | sfdisk -q '" + path + "'");
  return path;
}

PartitionTable Read(const std::vector<uint8_t>& disk) {
  PartitionTable table;
  auto read_at = [&](uint64_t off, void* buf, size_t len) {
    if (off > disk.size() || len > disk.size() - off) return false;
    std::memcpy(buf, disk.data() + off, len);
    return true;
  };
  REQUIRE(dmcowd::ReadPartitionTable(read_at, disk.size() / 512, &table).ok());
  return table;
}

// "number start sectors" per partition, as ours and as sfdisk's dump list them.
std::string Ours(const PartitionTable& t) {
  std::string s;
  for (const auto& p : t.partitions) {
    s += std::to_string(p.number) + " " + std::to_string(p.start_sector) + " " + std::to_string(p.sectors) + "\n";
  }
  return s;
}

std::string Sfdisks(const std::string& path) {
  std::string dump;
  REQUIRE(Run("sfdisk -d '" + path + "'", &dump) == 0);
  std::istringstream in(dump);
  std::string line, s;
  while (std::getline(in, line)) {
    if (line.rfind(path, 0) != 0) continue;
    unsigned long long start = 0, size = 0;
    const std::string rest = line.substr(path.size());
    REQUIRE(std::sscanf(rest.c_str(), "%*d : start= %llu, size= %llu", &start, &size) == 2);
    std::string number = rest.substr(0, rest.find(' '));
    // kpartx maps the first 1 KiB of an extended partition, as the kernel does.
    if (line.find("type=5") != std::string::npos) size = 2;
    s += number + " " + std::to_string(start) + " " + std::to_string(size) + "\n";
  }
  return s;
}

void PutLe32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutLe64(std::vector<uint8_t>& b, size_t at, uint64_t v) {
  PutLe32(b, at, static_cast<uint32_t>(v));
  PutLe32(b, at + 4, static_cast<uint32_t>(v >> 32));
}
void FixHeaderCrc(std::vector<uint8_t>& b, size_t header) {
  PutLe32(b, header + 16, 0);
  PutLe32(b, header + 16, static_cast<uint32_t>(crc32(0, b.data() + header, 92)));
}
bool Warned(const PartitionTable& t, const std::string& what) {
  for (const auto& w : t.warnings) {
    if (w.find(what) != std::string::npos) return true;
  }
  return false;
}

const char* const kGpt = "label: gpt\\nsize=16MiB\\nsize=20MiB\\n";
const char* const kDos =
    "label: dos\\ndisk.img1 : size=4MiB, type=83\\ndisk.img2 : size=20MiB, type=5\\n"
    "disk.img5 : size=4MiB, type=83\\ndisk.img6 : size=4MiB, type=83\\ndisk.img7 : size=2MiB, type=83\\n";

}  // namespace

TEST_CASE("partition tables sfdisk made read as sfdisk lists them") {
  TempDir dir;
  SECTION("GPT") {
    const std::string path = Partitioned(dir, kGpt);
    const PartitionTable t = Read(ReadWholeFile(path));
    CHECK(t.kind == "gpt");
    CHECK(t.warnings.empty());
    CHECK(Ours(t) == Sfdisks(path));
    CHECK(t.partitions.size() == 2);
  }
  SECTION("MBR: primary, extended, logical") {
    const std::string path = Partitioned(dir, kDos);
    const PartitionTable t = Read(ReadWholeFile(path));
    CHECK(t.kind == "dos");
    CHECK(t.warnings.empty());
    CHECK(Ours(t) == Sfdisks(path));
    REQUIRE(t.partitions.size() == 5);  // 1, 2 (1 KiB), 5, 6, 7
    CHECK(t.partitions[1].extended);
  }
  SECTION("GPT with an unused entry between two: numbers are entry positions") {
    const std::string path =
        Partitioned(dir, "label: gpt\\ndisk.img1 : size=4MiB\\ndisk.img3 : start=20480, size=4MiB\\n");
    const PartitionTable t = Read(ReadWholeFile(path));
    CHECK(Ours(t) == Sfdisks(path));
    REQUIRE(t.partitions.size() == 2);
    CHECK(t.partitions[1].number == 3);
  }
}

TEST_CASE("no partition table: nothing to map") {
  std::vector<uint8_t> disk(1 << 20);
  CHECK(Read(disk).kind.empty());
  // A boot sector (55 AA) whose "entries" have boot flags other than 0/0x80: a file system's, not a table.
  disk[510] = 0x55;
  disk[511] = 0xaa;
  disk[0x1be] = 0xeb;
  disk[0x1be + 4] = 0x83;
  CHECK(Read(disk).kind.empty());
  CHECK(Read(disk).partitions.empty());
  // Too small for any table, and a device that cannot be read.
  CHECK(Read(std::vector<uint8_t>(512)).kind.empty());
  PartitionTable t;
  auto fails = [](uint64_t, void*, size_t) { return false; };
  const dmcow::Status s = dmcowd::ReadPartitionTable(fails, 2048, &t);
  CHECK(!s.ok());
  CHECK(s.ToString().find("sector 0") != std::string::npos);
}

TEST_CASE("kpartx's names and UUIDs") {
  CHECK(dmcowd::PartitionName("disk", 1) == "disk1");
  CHECK(dmcowd::PartitionName("vm0", 5) == "vm0p5");
  CHECK(dmcowd::PartitionName("a-b.c", 12) == "a-b.c12");
  CHECK(dmcowd::PartitionUuid("DMCOW-QCOW-vm0", 2) == "part2-DMCOW-QCOW-vm0");
}

TEST_CASE("damaged and hostile tables: the rest is mapped, the reason given") {
  TempDir dir;
  SECTION("a partition past the end of the device is not mapped") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kDos));
    PutLe32(disk, 0x1be + 12, 0xfffffff0);  // partition 1's size
    const PartitionTable t = Read(disk);
    CHECK(Warned(t, "partition 1 (sectors 2048+4294967280) does not lie within the device"));
    CHECK(t.partitions.size() == 4);
    CHECK(t.partitions[0].number == 2);
  }
  SECTION("a loop of extended boot records ends") {
    const std::string path = Partitioned(dir, kDos);
    std::vector<uint8_t> disk = ReadWholeFile(path);
    // partition 6's EBR links back to itself.
    const uint64_t ext = 10240, ebr6 = 22528 - 2048;
    REQUIRE(disk[ebr6 * 512 + 0x1be + 16 + 4] == 0x05);
    PutLe32(disk, ebr6 * 512 + 0x1be + 16 + 8, static_cast<uint32_t>(ebr6 - ext));
    const PartitionTable t = Read(disk);
    CHECK(Warned(t, "loops"));
    CHECK(t.partitions.size() == 4);  // 1, 2, 5, 6
  }
  SECTION("a damaged primary GPT header: the backup's table") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kGpt));
    const PartitionTable good = Read(disk);
    disk[512 + 40] ^= 1;  // first usable LBA, under the header CRC
    const PartitionTable t = Read(disk);
    CHECK(t.kind == "gpt");
    CHECK(Warned(t, "primary GPT header invalid (header CRC mismatch)"));
    CHECK(Ours(t) == Ours(good));
  }
  SECTION("both GPT headers damaged: nothing mapped") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kGpt));
    disk[512 + 40] ^= 1;
    disk[disk.size() - 512 + 40] ^= 1;
    const PartitionTable t = Read(disk);
    CHECK(t.partitions.empty());
    CHECK(Warned(t, "no valid GPT header"));
  }
  SECTION("a GPT entry array larger than the bound is not read") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kGpt));
    for (size_t header : {size_t{512}, disk.size() - 512}) {
      PutLe32(disk, header + 80, 0x10000000);  // entries
      FixHeaderCrc(disk, header);
    }
    const PartitionTable t = Read(disk);
    CHECK(t.partitions.empty());
    CHECK(Warned(t, "268435456 entries of 128 bytes"));
  }
  SECTION("a GPT entry array past the end of the device") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kGpt));
    for (size_t header : {size_t{512}, disk.size() - 512}) {
      PutLe64(disk, header + 72, disk.size() / 512 - 1);
      FixHeaderCrc(disk, header);
    }
    CHECK(Warned(Read(disk), "past the end of the device"));
  }
  SECTION("GPT entries that end before they start, or span every sector") {
    std::vector<uint8_t> disk = ReadWholeFile(Partitioned(dir, kGpt));
    const size_t entries = 2 * 512;
    PutLe64(disk, entries + 40, 100);                 // partition 1 ends at 100, starts at 2048
    PutLe64(disk, entries + 128 + 32, 0);             // partition 2: 0 ..
    PutLe64(disk, entries + 128 + 40, ~uint64_t{0});  // .. 2^64 - 1
    PutLe32(disk, 512 + 88, static_cast<uint32_t>(crc32(0, disk.data() + entries, 128 * 128)));
    FixHeaderCrc(disk, 512);
    const PartitionTable t = Read(disk);
    CHECK(t.partitions.empty());
    CHECK(Warned(t, "partition 1: ends (sector 100) before it starts (2048)"));
    CHECK(Warned(t, "partition 2 (sectors 0+18446744073709551615) does not lie within the device"));
  }
}
