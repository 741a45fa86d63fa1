// Filling reserved clusters for the block-device calls (DeviceImage::FillClusters)
// when the guest content reads zeros: the clusters are zeroed by
// File::WriteZeroes, a fallocate where the file system has one, never
// left holding what the host bytes held before. Also File::WriteZeroes itself
// on a POSIX file and through the default (written zeros) path.
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>

#include "dmcow/env.h"
#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

constexpr uint64_t kCluster = 65536;

bool AllBytes(const std::vector<uint8_t>& v, uint64_t from, uint64_t len, uint8_t value) {
  return std::all_of(v.begin() + from, v.begin() + from + len, [value](uint8_t b) { return b == value; });
}

bool IsHole(File* f, uint64_t offset, uint64_t len) {
  bool is_data = true;
  uint64_t got = 0;
  Status s = f->GetAllocation(offset, len, &is_data, &got);
  return s.ok() && !is_data && got == len;
}

// Whether File::WriteZeroes leaves holes (unwritten or punched ranges) on the
// file system holding `dir`: ext4, xfs, btrfs, tmpfs do; others get written
// zeros, which are correct but not what the fast path is for.
bool ZeroesWithoutWriting(const std::string& dir) {
  const std::string path = dir + "/probe";
  WriteWholeFile(path, std::vector<uint8_t>(2 * kCluster, 0xab));
  std::unique_ptr<File> f;
  REQUIRE(Env::Default()->OpenFile(path, OpenMode::kReadWrite, &f).ok());
  REQUIRE(f->WriteZeroes(0, kCluster).ok());
  return IsHole(f.get(), 0, kCluster);
}

// Appends `bytes` of 0xee to the file: the host clusters the next
// reservation hands out then hold stale data, as freed clusters do.
void AppendGarbage(const std::string& path, uint64_t bytes) {
  std::vector<uint8_t> f = ReadWholeFile(path);
  f.resize(f.size() + bytes, 0xee);
  WriteWholeFile(path, f);
}

}  // namespace

TEST_CASE("File::WriteZeroes: zeros in range, neighbours kept, no data written, file grown", "[env]") {
  TempDir dir;
  const std::string path = dir / "f";
  WriteWholeFile(path, std::vector<uint8_t>(4 * kCluster, 0xab));
  std::unique_ptr<File> f;
  REQUIRE(Env::Default()->OpenFile(path, OpenMode::kReadWrite, &f).ok());
  REQUIRE(f->WriteZeroes(kCluster, kCluster).ok());
  REQUIRE(f->WriteZeroes(3 * kCluster + 100, 2 * kCluster).ok());  // runs past the end
  uint64_t size = 0;
  REQUIRE(f->Size(&size).ok());
  CHECK(size == 5 * kCluster + 100);
  if (ZeroesWithoutWriting(dir.path())) {
    CHECK(IsHole(f.get(), kCluster, kCluster));
  } else {
    WARN("this file system cannot zero without writing: zeros written");
  }
  f.reset();
  std::vector<uint8_t> got = ReadWholeFile(path);
  CHECK(AllBytes(got, 0, kCluster, 0xab));
  CHECK(AllBytes(got, kCluster, kCluster, 0));
  CHECK(AllBytes(got, 2 * kCluster, kCluster + 100, 0xab));
  CHECK(AllBytes(got, 3 * kCluster + 100, 2 * kCluster, 0));

  // The default implementation (written zeros) behind an in-memory file.
  std::unique_ptr<Env> mem = NewMemEnv();
  std::unique_ptr<File> m;
  REQUIRE(mem->OpenFile("m", OpenMode::kCreateTruncate, &m).ok());
  std::vector<uint8_t> ones(3 * kCluster + 7, 1);
  REQUIRE(m->Write(0, ones.data(), ones.size()).ok());
  REQUIRE(m->WriteZeroes(5, 2 * kCluster + 1).ok());
  REQUIRE(m->WriteZeroes(3 * kCluster, 200 * 1024).ok());
  REQUIRE(m->Size(&size).ok());
  CHECK(size == 3 * kCluster + 200 * 1024);
  std::vector<uint8_t> back(size);
  size_t n = 0;
  REQUIRE(m->Read(0, back.size(), back.data(), &n).ok());
  REQUIRE(n == back.size());
  CHECK(AllBytes(back, 0, 5, 1));
  CHECK(AllBytes(back, 5, 2 * kCluster + 1, 0));
  CHECK(AllBytes(back, 2 * kCluster + 6, kCluster - 6, 1));
  CHECK(AllBytes(back, 3 * kCluster, 200 * 1024, 0));
}

TEST_CASE("FillClusters: clusters reading zeros are zeroed without a copy, the rest copied", "[qemu][device]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string base = dir / "base.raw", img = dir / "img.qcow2", top = dir / "top.qcow2";
  // img: guest cluster 1 a zero cluster, 2 data (0x5a), the rest unallocated, no backing.
  MustRun("qemu-img create -q -f qcow2 '" + img + "' 1M");
  MustRun("qemu-io -c 'write -z 64k 64k' -c 'write -P 0x5a 128k 64k' '" + img + "' >/dev/null");
  // top: over a raw backing holding 0x33 everywhere.
  MustRun("qemu-img create -q -f raw '" + base + "' 1M && qemu-io -f raw -c 'write -P 0x33 0 1M' '" + base + "'");
  MustRun("qemu-img create -q -f qcow2 -F raw -b '" + base + "' '" + top + "' 1M");

  SECTION("no backing: unallocated and zero clusters are zeroed without writing, data clusters are copied") {
    AppendGarbage(img, 8 * kCluster);
    std::unique_ptr<Image> image = MustOpenWritable(img);
    uint64_t host = 0;
    REQUIRE(Device(image)->ReserveClusters(3, &host).ok());
    // Guest clusters 0 (unallocated), 1 (zero), 2 (data) into fresh host clusters.
    REQUIRE(Device(image)->FillClusters(0, 3, host).ok());
    std::unique_ptr<File> f;
    REQUIRE(Env::Default()->OpenFile(img, OpenMode::kReadOnly, &f).ok());
    const bool holes = IsHole(f.get(), host, 2 * kCluster);
    f.reset();
    std::vector<uint8_t> raw = ReadWholeFile(img);
    REQUIRE(raw.size() >= host + 3 * kCluster);
    CHECK(AllBytes(raw, host, 2 * kCluster, 0));  // not the stale 0xee
    CHECK(AllBytes(raw, host + 2 * kCluster, kCluster, 0x5a));
    if (ZeroesWithoutWriting(dir.path())) CHECK(holes);  // zeroed by fallocate, not written
    // Linked, the image is what QEMU expects: same content, clean.
    REQUIRE(Device(image)->LinkClusters(0, 3, host).ok());
    REQUIRE(image->Flush().ok());
    image.reset();
    MustRun("qemu-img check -q '" + img + "'");
    MustRun("qemu-io -c 'read -P 0 0 128k' -c 'read -P 0x5a 128k 64k' -c 'read -P 0 192k 832k' '" + img +
            "' >/dev/null");
  }

  SECTION("over a backing file: unallocated clusters are copied from it") {
    AppendGarbage(top, 4 * kCluster);
    std::unique_ptr<Image> image = MustOpenWritable(top);
    uint64_t host = 0;
    REQUIRE(Device(image)->ReserveClusters(1, &host).ok());
    REQUIRE(Device(image)->FillClusters(3, 1, host).ok());
    std::vector<uint8_t> raw = ReadWholeFile(top);
    CHECK(AllBytes(raw, host, kCluster, 0x33));
    REQUIRE(Device(image)->LinkClusters(3, 1, host).ok());
    REQUIRE(image->Flush().ok());
    image.reset();
    MustRun("qemu-img check -q '" + top + "'");
    MustRun("qemu-img compare -q '" + top + "' '" + base + "'");
  }
}

TEST_CASE("DescribeCluster: data clusters past the end of the file are not mapped in place", "[qemu][device]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string img = dir / "cut.qcow2";
  MustRun("qemu-img create -q -f qcow2 '" + img + "' 1M");
  MustRun("qemu-io -c 'write -P 0x77 0 64k' -c 'write -P 0x78 64k 64k' '" + img + "' >/dev/null");
  DeviceImage::ClusterPlace second;
  {
    std::unique_ptr<Image> image = MustOpenWritable(img);
    DeviceImage::ClusterPlace p;
    REQUIRE(Device(image)->DescribeCluster(0, &p).ok());
    REQUIRE(p.state == ClusterState::kData);
    CHECK(p.exclusive);
    REQUIRE(Device(image)->DescribeCluster(1, &second).ok());
  }
  // The file cut in the middle of guest cluster 1's data (a torn copy): it
  // reads as zeros past the end, as in QEMU, which no linear mapping onto the
  // file can give, so the daemon must assemble it.
  REQUIRE(truncate(img.c_str(), static_cast<off_t>(second.host_offset + kCluster / 2)) == 0);
  for (const bool writable : {false, true}) {
    OpenOptions options;
    options.writable = writable;
    std::unique_ptr<Image> image;
    REQUIRE(OpenImage(img, options, &image).ok());
    DeviceImage::ClusterPlace p;
    REQUIRE(Device(image)->DescribeCluster(1, &p).ok());
    CHECK(p.state == ClusterState::kData);
    CHECK(p.partial);
    CHECK_FALSE(p.exclusive);
    REQUIRE(Device(image)->DescribeCluster(0, &p).ok());
    CHECK_FALSE(p.partial);
    std::vector<uint8_t> buf(kCluster);
    REQUIRE(image->Read(kCluster, buf.data(), buf.size()).ok());
    CHECK(AllBytes(buf, 0, kCluster / 2, 0x78));
    CHECK(AllBytes(buf, kCluster / 2, kCluster / 2, 0));
  }
}
