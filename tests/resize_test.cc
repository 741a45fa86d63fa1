// dmcow-img resize against qemu-img resize 7.2: the same command line on two
// copies of the same image (made by qemu-img/qemu-io), one per tool. Both
// must agree on the exit code, stdout and stderr (tool names aside); after
// a resize qemu-img check finds ours clean, qemu-img compare finds both
// results identical, and qemu-img info (JSON, disk usage aside) agrees.
// For the plain shapes and the sizes where QEMU's layout is ours, cmp too.
// Persistent bitmaps are resized with the image: every consistent bitmap
// has the same dirty ranges in both results, as QEMU reads them (qemu-nbd).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

bool FileExists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

struct Shape {
  const char* name;
  const char* make;  // shell steps in the work directory making "img"
  const char* format;
  bool byte_identical;  // our resized file equals qemu-img's (see the first test)
};

const Shape kShapes[] = {
    {"v3, 64 KiB clusters",
     "qemu-img create -q -f qcow2 img 64M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 1M' -c 'write -z 50M 1M'"
     " img",
     "qcow2", true},
    {"v2",
     "qemu-img create -q -f qcow2 -o compat=0.10 img 64M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 1M' img",
     "qcow2", true},
    {"512 B clusters, compressed",
     "qemu-img create -q -f qcow2 -o cluster_size=512 img 3M && qemu-io -c 'write -P 6 0 60k' -c 'write -P 7 90k 40k'"
     " -c 'write -P 8 1M 100k' -c 'write -c -P 9 2M 64k' img",
     "qcow2", true},
    {"2 MiB clusters", "qemu-img create -q -f qcow2 -o cluster_size=2M img 64M && qemu-io -c 'write -P 1 1M 5M' img",
     "qcow2", true},
    {"extended L2",
     "qemu-img create -q -f qcow2 -o extended_l2=on img 64M && qemu-io -c 'write -P 1 4k 8k' -c 'write -P 2 40M 1M'"
     " img",
     "qcow2", true},
    {"1-bit refcounts", "qemu-img create -q -f qcow2 -o refcount_bits=1 img 64M && qemu-io -c 'write -P 1 30M 4M' img",
     "qcow2", true},
    {"64-bit refcounts, 4 KiB clusters",
     "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4k img 64M && qemu-io -c 'write -P 1 30M 4M' img",
     "qcow2", true},
    {"internal snapshot",
     "qemu-img create -q -f qcow2 img 64M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 1M' img"
     " && qemu-img snapshot -c s1 img && qemu-io -c 'write -P 3 40M 64k' img",
     "qcow2", false},
    {"over a longer backing file",
     "qemu-img create -q -f qcow2 base 128M && qemu-io -c 'write -P 5 0 128M' base"
     " && qemu-img create -q -f qcow2 -b base -F qcow2 img 64M && qemu-io -c 'write -P 1 1M 1M' img",
     "qcow2", false},
    {"external data file",
     "qemu-img create -q -f qcow2 -o data_file=img.data img 64M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 1M'"
     " img",
     "qcow2", false},
    // b0 (64 KiB granularity, disabled after two writes), fine (4 KiB,
    // enabled), with bits near the start, in the middle and at the end.
    {"persistent bitmaps",
     "qemu-img create -q -f qcow2 img 64M && qemu-img bitmap --add img b0 && qemu-img bitmap --add -g 4k img fine"
     " && qemu-io -c 'write -P 1 0 1k' -c 'write -P 2 300k 5k' img && qemu-img bitmap --disable img b0"
     " && qemu-io -c 'write -P 3 40M 64k' -c 'write -P 4 63M 1M' img",
     "qcow2", false},
    {"persistent bitmaps, 512 B clusters, over a backing file with a snapshot",
     "qemu-img create -q -f qcow2 base 96M && qemu-io -c 'write -P 5 0 96M' base"
     " && qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 img 64M && qemu-img snapshot -c s img"
     " && qemu-img bitmap --add -g 4k img b4k && qemu-io -c 'write -P 1 1M 3k' -c 'write -P 2 60M 512' img",
     "qcow2", false},
    // (cmp would read terabytes of holes; the file sizes are compared.)
    {"raw", "qemu-img create -q -f raw img 64M && qemu-io -f raw -c 'write -P 1 0 1M' -c 'write -P 2 40M 1M' img",
     "raw", false},
};

// Runs `args` (with "IMG" for the image) through both tools on fresh copies.
// With `same_holes` false, the content is compared, not where each reads
// as a hole (compare -s): see "resize preallocates".
void ResizeBoth(const TempDir& dir, const Shape& shape, const std::string& args, bool byte_identical = false,
                bool same_holes = true) {
  INFO(shape.name << ": resize " << args);
  // Made once and copied: qemu-io's compressed clusters differ from run to run.
  MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + shape.make +
          ") >/dev/null && cp -a src q && cp -a src o");
  const std::string q_args = ReplaceAll(args, "IMG", "img");
  SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/q", "qemu-img resize " + q_args);
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/o", Ours() + " resize " + q_args);
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  CHECK(ours.out == theirs.out);
  CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
  if (theirs.rc != 0 || ours.rc != 0) {
    // Nothing changed: ours is the file it was.
    if (!FileExists(dir / "q/img")) return;
    CHECK(Exec(dir.path(), "cmp src/img o/img").rc == 0);
    CHECK(Exec(dir.path(), std::string("qemu-img compare -f ") + shape.format + " -F " + shape.format + " q/img o/img")
              .rc == 0);
    return;
  }
  // From inside each directory: QEMU resolves a relative data file name
  // against the working directory.
  const std::string in_o = dir.path() + "/o", in_q = dir.path() + "/q";
  if (std::string(shape.format) == "qcow2") {
    Result check = Exec(in_o, "qemu-img check img");
    INFO(check.out);
    CHECK(check.rc == 0);
  }
  const std::string f = std::string(" -f ") + shape.format + " -F " + shape.format + " ";
  if (std::string(shape.make).find("data_file") == std::string::npos) {
    CHECK(Exec(dir.path(), std::string("qemu-img compare ") + (same_holes ? "-s" : "") + f + "q/img o/img").rc == 0);
  } else {
    for (const std::string& d : {in_o, in_q}) {
      MustRun("cd '" + d + "' && qemu-img convert -f " + shape.format + " -O raw img ../" + d.back() + ".raw");
    }
    CHECK(Exec(dir.path(), "qemu-img compare -f raw -F raw q.raw o.raw").rc == 0);
  }
  auto info = [&](const char* which) {
    Result r = Exec(dir.path() + "/" + which, std::string("qemu-img info --output=json -f ") + shape.format + " img");
    nlohmann::json j = nlohmann::json::parse(r.out);
    j.erase("actual-size");
    return j;
  };
  CHECK(info("o") == info("q"));
  if (std::string(shape.format) == "qcow2") CHECK(QemuConsistentBitmaps(in_o) == QemuConsistentBitmaps(in_q));
  if (byte_identical) CHECK(Exec(dir.path(), "cmp q/img o/img").rc == 0);
}

}  // namespace

TEST_CASE("resize grows and shrinks as qemu-img does", "[resize][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Shape* shape : Sampled(kShapes)) {
    DYNAMIC_SECTION(shape->name) {
      const std::string f = std::string("-f ") + shape->format + " ";
      // Byte for byte as qemu-img: a moderate grow and the shrinks that keep
      // a partly used L2 table. Elsewhere the layout differs, the content
      // does not: a large grow places the new L1 table and refcount blocks in
      // another order, and qemu-img's shrink allocates an L2 table for an
      // empty range it discards (its file stays megabytes larger).
      for (const char* args : {"IMG 100M", "IMG +0", "--shrink IMG 32M", "--shrink IMG 40M"}) {
        ResizeBoth(dir, *shape, f + args, shape->byte_identical);
      }
      for (const char* args : {"IMG +1G", "IMG 4T", "--shrink IMG 2M", "--shrink IMG -- -63M", "-q --shrink IMG 1M"}) {
        ResizeBoth(dir, *shape, f + args);
      }
    }
  }
}

// What qemu-img map says of an image, offsets aside: runs of the same
// zero/data/depth flags.
std::string MapFlags(const std::string& dir) {
  const nlohmann::json map = nlohmann::json::parse(Exec(dir, "qemu-img map --output=json img").out);
  std::string out;
  uint64_t start = 0, end = 0;
  std::string flags;
  for (const nlohmann::json& e : map) {
    const std::string f = e["zero"].dump() + e["data"].dump() + e["depth"].dump();
    if (f != flags && end > start) out += std::to_string(start) + "+" + std::to_string(end - start) + ":" + flags + " ";
    if (f != flags) start = e["start"];
    flags = f;
    end = e["start"].get<uint64_t>() + e["length"].get<uint64_t>();
  }
  return out + std::to_string(start) + "+" + std::to_string(end - start) + ":" + flags;
}

uint64_t DiskUsageKiB(const std::string& path) { return std::stoull(Exec(".", "du -k '" + path + "' | cut -f1").out); }

TEST_CASE("resize preallocates as qemu-img does", "[resize][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const size_t n = sizeof(kShapes) / sizeof(kShapes[0]);
  const Shape& raw = kShapes[n - 1];
  for (const char* mode : {"falloc", "full"}) {
    ResizeBoth(dir, raw, std::string("-f raw --preallocation=") + mode + " IMG 96M");
    const uint64_t du_q = DiskUsageKiB(dir / "q/img"), du_o = DiskUsageKiB(dir / "o/img");
    INFO(mode << ": du qemu-img " << du_q << " dmcow-img " << du_o);
    CHECK(du_o * 10 >= du_q * 9);
    CHECK(du_o >= 32 * 1024);  // the new 32 MiB are allocated
  }
  // qcow2: the new clusters allocated, as holes (metadata), reserved
  // (falloc) or written (full); the same content, map flags and disk use.
  const Shape* qcow2_shapes[] = {&kShapes[0], &kShapes[1], &kShapes[2], &kShapes[3],
                                 &kShapes[4], &kShapes[8], &kShapes[9], &kShapes[n - 3]};
  for (const Shape* const* sampled : Sampled(qcow2_shapes)) {
    const Shape* shape = *sampled;
    for (const std::string mode : {"metadata", "falloc", "full"}) {
      // Which preallocated clusters read as holes (map's "zero", compare
      // -s) depends on file-system blocks of 4 KiB, where the layouts
      // differ: with 512-byte clusters (a block holds several, beside the
      // tables), and with bitmaps (resized here before the preallocation
      // reuses the clusters the old tables held; qemu-img stores them
      // after). There the content is compared, not the holes.
      const bool same_holes = !(mode == "metadata" && shape == &kShapes[2]) && shape != &kShapes[n - 3];
      ResizeBoth(dir, *shape, "--preallocation=" + mode + " IMG +20M", false, same_holes);
      INFO(shape->name << ", preallocation=" << mode);
      if (same_holes) CHECK(MapFlags(dir / "o") == MapFlags(dir / "q"));
      // (The map flags show the new clusters' blocks allocated or holes as
      // qemu-img's are.) Disk use: never more than qemu-img's, which also
      // reserves space for refcount blocks it may need.
      const uint64_t du_q = DiskUsageKiB(dir / "q/img"), du_o = DiskUsageKiB(dir / "o/img");
      INFO("du after qemu-img " << du_q << " KiB, dmcow-img " << du_o << " KiB");
      CHECK(du_o <= du_q + du_q / 10 + 256);
    }
  }
  ResizeBoth(dir, raw, "-f raw --preallocation=metadata IMG +1M");  // qemu-img refuses metadata for raw
}

// Bad command lines and sizes: the same message and exit code, nothing changed.
TEST_CASE("resize refuses what qemu-img refuses, with its words", "[resize][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const Shape& plain = kShapes[0];
  for (const char* args :
       {"IMG 32M", "IMG 0", "IMG -- -100G", "IMG -- -64M", "IMG abc", "IMG 100000000000000000000", "IMG 1000",
        "--shrink IMG 1000", "--preallocation=bogus IMG +1M", "--preallocation=falloc --shrink IMG 32M", "IMG",
        "IMG +1M extra", "--bogus IMG +1M", "-f raw -f qcow2 IMG +1M", "IMG 9223372036854775808"}) {
    ResizeBoth(dir, plain, args);
  }
  // A version 2 image with snapshots, and qcow v1, cannot be resized.
  ResizeBoth(dir,
             {"v2 with a snapshot", "qemu-img create -q -f qcow2 -o compat=0.10 img 16M && qemu-img snapshot -c s img",
              "qcow2", false},
             "IMG +16M");
  ResizeBoth(dir, {"qcow v1", "qemu-img create -q -f qcow img 16M", "qcow", false}, "IMG +16M");
  ResizeBoth(dir, {"missing", "true", "qcow2", false}, "IMG +16M");
}

// Bitmaps that cannot be resized: one left in use (qemu-img's refusal, its
// words), and one too large at the new size, where qemu-img resizes the
// image, exits 0 and leaves the bitmap in use ("Lost persistent bitmaps"):
// ours refuses before writing anything, the bitmap kept.
TEST_CASE("resize with bitmaps it cannot resize: refused, nothing changed", "[resize][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  ResizeBoth(dir,
             {"a bitmap left in use",
              "qemu-img create -q -f qcow2 img 16M && qemu-img bitmap --add img b0 && qemu-img bitmap --add img b1"
              " && (ulimit -c 0; qemu-io -c 'write 0 64k' -c abort img; true) 2>/dev/null",
              "qcow2", false},
             "IMG +16M");
  const Shape fine = {"a 512-byte granularity bitmap",
                      "qemu-img create -q -f qcow2 img 16M && qemu-img bitmap --add -g 512 img fine"
                      " && qemu-io -c 'write 0 64k' img",
                      "qcow2", false};
  ResizeBoth(dir, fine, "IMG 2T");  // 512 MiB of bits: the largest bitmap QEMU stores
  MustRun("cd '" + dir.path() + "' && rm -rf o && cp -a src o");
  SplitResult ours = Exec(dir / "o", dir / "o", Ours() + " resize img 4T");
  CHECK(ours.rc == 1);
  CHECK(ours.err ==
        "dmcow-img: Can't resize: bitmap 'fine' would take too much space at the new size. Use larger "
        "granularity\n");
  CHECK(Exec(dir.path(), "cmp src/img o/img").rc == 0);
}

// amend size= goes through the same resize: the bitmaps follow.
TEST_CASE("amend size= resizes persistent bitmaps as qemu-img", "[resize][amend][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const Shape& bitmaps = kShapes[sizeof(kShapes) / sizeof(kShapes[0]) - 3];
  for (const char* size : {"100M", "48M"}) {
    MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + bitmaps.make +
            ") >/dev/null && cp -a src q && cp -a src o");
    const std::string args = std::string(" amend -o size=") + size + " img";
    CheckSameAsQemu(Exec(dir / "q", dir / "q", "qemu-img" + args), Exec(dir / "o", dir / "o", Ours() + args));
    CHECK(Exec(dir / "o", "qemu-img check img").rc == 0);
    CHECK(Exec(dir.path(), "qemu-img compare q/img o/img").rc == 0);
    CHECK(QemuConsistentBitmaps(dir / "o") == QemuConsistentBitmaps(dir / "q"));
    CHECK(QemuConsistentBitmaps(dir / "o").size() == 2);
  }
}
