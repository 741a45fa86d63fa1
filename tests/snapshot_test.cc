// dmcow-img snapshot against qemu-img snapshot 7.2: the same sequence of
// commands (create, list, apply, delete, with guest writes by qemu-io
// between them) on two copies of the same image, one per tool. After each
// command both agree on the exit code, stdout (the date column aside) and
// stderr (tool names aside), and qemu-img check finds ours clean; at the end
// the active content and every snapshot's content are identical. Then bad
// input, and a crash at every write and sync of each operation.
#include <catch2/catch.hpp>
#include <regex>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

struct Shape {
  const char* name;
  const char* make_img;  // makes "img" in the current directory
  bool resizable;        // qemu-img resize works with snapshots (version 3)
};

const Shape kShapes[] = {
    {"v3, 64 KiB clusters",
     "qemu-img create -q -f qcow2 img 4M && qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 64k' img", true},
    {"v2", "qemu-img create -q -f qcow2 -o compat=0.10 img 4M && qemu-io -c 'write -P 1 0 1M' img", false},
    {"512 B clusters", "qemu-img create -q -f qcow2 -o cluster_size=512 img 1M && qemu-io -c 'write -P 1 1k 300k' img",
     true},
    {"2 MiB clusters", "qemu-img create -q -f qcow2 -o cluster_size=2M img 8M && qemu-io -c 'write -P 1 2M 4k' img",
     true},
    {"extended L2", "qemu-img create -q -f qcow2 -o extended_l2=on img 4M && qemu-io -c 'write -P 1 8k 4k' img", true},
    {"compressed zlib",
     "qemu-img create -q -f qcow2 img 4M && qemu-io -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' img", true},
    {"compressed zstd",
     "qemu-img create -q -f qcow2 -o compression_type=zstd img 4M && qemu-io -c 'write -c -P 1 0 64k' img", true},
    {"64-bit refcounts, 4 KiB clusters",
     "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4k img 2M && qemu-io -c 'write -P 1 10k 20k' img",
     true},
    {"over a qcow2 backing file",
     "qemu-img create -q -f qcow2 base 4M && qemu-io -c 'write -P 7 0 2M' base"
     " && qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -c 'write -P 1 1M 64k' img",
     true},
    {"over a raw backing file",
     "qemu-img create -q -f raw base.raw 4M && qemu-io -f raw -c 'write -P 7 0 2M' base.raw"
     " && qemu-img create -q -f qcow2 -b base.raw -F raw img && qemu-io -c 'write -P 1 1M 64k' img",
     true},
    {"snapshots made by qemu-img",
     "qemu-img create -q -f qcow2 img 4M && qemu-io -c 'write -P 1 0 1M' img && qemu-img snapshot -c old1 img"
     " && qemu-io -c 'write -P 2 512k 1M' img && qemu-img snapshot -c old2 img",
     true},
    {"metadata preallocation",
     "qemu-img create -q -f qcow2 -o preallocation=metadata img 4M && qemu-io -c 'write -P 1 0 64k' img", true},
    {"empty, 0 bytes", "qemu-img create -q -f qcow2 img 0", false},
};

// Dates differ between the two runs: "2026-12-05 17:10:42" becomes "DATE".
std::string MaskDates(const std::string& text) {
  static const std::regex kDate("[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}");
  return std::regex_replace(text, kDate, "DATE");
}

// The ids of the snapshots of q/img and o/img, and each one's content, equal.
void CheckSnapshotsIdentical(const TempDir& dir) {
  Result list = Exec(dir.path() + "/q", "qemu-img snapshot -l img");
  Result ours = Exec(dir.path() + "/o", "qemu-img snapshot -l img");
  CHECK(MaskDates(ours.out) == MaskDates(list.out));
  std::smatch m;
  std::string rest = list.out;
  static const std::regex kId("\n([0-9]+) ");
  while (std::regex_search(rest, m, kId)) {
    const std::string id = m[1];
    INFO("snapshot " << id);
    MustRun("cd '" + dir.path() + "' && qemu-img convert -l snapshot.id=" + id +
            " -O raw q/img q.raw && qemu-img convert -l snapshot.id=" + id + " -O raw o/img o.raw");
    CHECK(Exec(dir.path(), "cmp q.raw o.raw").rc == 0);
    rest = m.suffix();
  }
}

// Runs one step on both copies: "snapshot ARGS" through each tool, or
// another command ("qemu-io ...", "qemu-img resize ...") run as it is on both.
void StepBoth(const TempDir& dir, const std::string& step) {
  INFO("step: " << step);
  const bool ours_differ = step.rfind("snapshot ", 0) == 0;
  SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", (ours_differ ? "qemu-img " : "") + step);
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", (ours_differ ? Ours() + " " : "") + step);
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  if (ours_differ) {  // (qemu-io prints its timings)
    CHECK(MaskDates(ours.out) == MaskDates(theirs.out));
    CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
  }
  Result check = Exec(dir.path() + "/o", "qemu-img check img");
  INFO(check.out);
  CHECK(check.rc == 0);
  CHECK(Exec(dir.path(), "qemu-img compare q/img o/img").rc == 0);
}

void SequenceBoth(const TempDir& dir, const Shape& shape) {
  MustRun("cd '" + dir.path() + "' && rm -rf src q o logs && mkdir src logs && (cd src && " + shape.make_img +
          ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o");
  std::vector<std::string> steps = {
      "snapshot -c first img",
      "snapshot -l img",
      "qemu-io -c 'write -P 5 0 64k' -c 'write -P 6 100k 8k' img",
      "snapshot -c second img",
      "snapshot -l img",
      "qemu-io -c 'write -P 8 0 4k' -c 'discard 100k 8k' img",
      "snapshot -a first img",
      "qemu-io -c 'write -P 9 32k 64k' img",
      "snapshot -d second img",
      "snapshot -c first img",  // names need not be unique
      "snapshot -d 1 img",      // not by id: "snapshot not found"
      "snapshot -d first img",  // the first of the two
      "snapshot -a first img",  // the one left with that name
      "snapshot -q -c third img",
      "snapshot -l img",
  };
  if (shape.resizable) {
    // A snapshot of another size: applying it restores its size.
    steps.insert(steps.end(),
                 {"qemu-img resize -q img +1M", "qemu-io -c 'write -P 4 4096k 4k' img", "snapshot -c bigger img",
                  "snapshot -a third img", "snapshot -a bigger img", "snapshot -d third img"});
  }
  for (const std::string& step : steps) StepBoth(dir, step);
  CheckSnapshotsIdentical(dir);
}

}  // namespace

TEST_CASE("snapshot: create, list, apply and delete, as qemu-img", "[snapshot][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Shape* shape : Sampled(kShapes)) {
    DYNAMIC_SECTION(shape->name) { SequenceBoth(dir, *shape); }
  }
}

TEST_CASE("snapshot: options, --image-opts and other formats, as qemu-img", "[snapshot][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && rm -rf src q o logs && mkdir src logs && (cd src && " + kShapes[0].make_img +
          " && qemu-img create -q -f raw plain.raw 1M && qemu-img create -q -f qcow v1 1M"
          ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o");
  const std::string long_name(300, 'n');  // qemu-img keeps 255 bytes of it
  for (const std::string& step :
       {std::string("snapshot img"), std::string("snapshot -l plain.raw"), std::string("snapshot -l v1"),
        std::string("snapshot -U -l img"), std::string("snapshot --image-opts -c x driver=qcow2,file.filename=img"),
        std::string("snapshot --image-opts -l driver=qcow2,file.filename=img"),
        std::string("snapshot --object secret,id=s0,data=pw -a x img"), std::string("snapshot -d x img"),
        "snapshot -c " + long_name + " img", std::string("snapshot -c 'with space' img"),
        "snapshot -a " + long_name.substr(0, 255) + " img", std::string("snapshot -l img"),
        std::string("snapshot -d 'with space' img")}) {
    StepBoth(dir, step);
  }
}

// Bad command lines and refusals: the same message and exit code, and the
// files left as they were (where qemu-img changes them, ours still are).
TEST_CASE("snapshot: bad input gets qemu-img's message and changes nothing", "[snapshot][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::vector<std::string> cases = {
      "-x img",
      "-l",
      "-c",
      "-l -c a img",
      "-a x -d y img",
      "-l img img",
      "-a nope img",
      "-d nope img",
      "-U -c a img",
      "-U img",
      "-c a plain.raw",
      "-a a plain.raw",
      "-d a plain.raw",
      "-c a v1",
      "-a a v1",
      "-c a nofile",
      "-l nofile",
      "-c a datafile",
      "-c a one-bit",  // refcount_bits=1: nothing can be shared (qemu-img leaks a cluster; we write nothing)
      "--object secret,id=0bad,data=x -l img",
      "--object secret -c a img",
      "-f qcow2 -l img",
  };
  for (const std::string& args : cases) {
    DYNAMIC_SECTION(args) {
      MustRun("cd '" + dir.path() + "' && rm -rf src q o logs && mkdir src logs && (cd src && " + kShapes[0].make_img +
              " && qemu-img snapshot -c s1 img && qemu-img create -q -f raw plain.raw 1M"
              " && qemu-img create -q -f qcow v1 1M && qemu-img create -q -f qcow2 -o data_file=d.raw datafile 1M"
              " && qemu-img create -q -f qcow2 -o refcount_bits=1 one-bit 1M && qemu-io -c 'write 0 64k' one-bit"
              ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o");
      SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", "qemu-img snapshot " + args);
      SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " snapshot " + args);
      CHECK(theirs.rc == 1);
      CheckSameAsQemu(theirs, ours);
      CHECK(Exec(dir.path(), "diff -r src o").rc == 0);
    }
  }
}

// Narrow refcounts: where one more reference would overflow a refcount,
// nothing is written (qemu-img fails half way and leaks; its message for -c
// is the same, -22).
TEST_CASE("snapshot: -c and -d keep persistent bitmaps valid, -a refuses them, as qemu-img",
          "[snapshot][qemu][bitmap]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && rm -rf src q o logs && mkdir src logs && (cd src && qemu-img create -q -f qcow2 "
          "img 4M && qemu-img bitmap --add img b1 && qemu-io -c 'write -P 1 0 1M' img) >/dev/null && cp -a "
          "--sparse=never src q && cp -a --sparse=never src o");
  for (const char* step : {"snapshot -c first img", "snapshot -c second img", "snapshot -a second img",
                           "snapshot -a nosuch img", "snapshot -d first img"}) {
    StepBoth(dir, step);
    Result theirs = Exec(dir.path() + "/q", "qemu-img info img 2>&1");
    Result ours = Exec(dir.path() + "/o", "qemu-img info img 2>&1");
    INFO(step << "\nqemu-img's image:\n" << theirs.out << "\nours:\n" << ours.out);
    CHECK(ours.out.find("name: b1") != std::string::npos);
    CHECK(ours.out.find("inconsistent") == std::string::npos);
    static const std::regex kDiskSize("disk size: [^\n]*\n");  // the layouts may differ
    CHECK(std::regex_replace(MaskDates(ours.out), kDiskSize, "") ==
          std::regex_replace(MaskDates(theirs.out), kDiskSize, ""));
  }
}

TEST_CASE("snapshot: a refcount at its maximum refuses before writing", "[snapshot][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 -o refcount_bits=2 img 1M && qemu-io -c 'write -P 1 0 128k' img"
          " >/dev/null && qemu-img snapshot -c first img && qemu-img snapshot -c second img && cp img before");
  SplitResult r = Ours(dir, "snapshot -a first img");  // every cluster is at 3 already
  CHECK(r.rc == 1);
  CHECK(r.err.rfind("dmcow-img: Could not apply snapshot 'first': ", 0) == 0);
  CHECK(r.err.find("at its maximum (3)") != std::string::npos);
  CHECK(Exec(dir.path(), "cmp img before").rc == 0);
  r = Ours(dir, "snapshot -c third img");
  CHECK(r.rc == 1);
  CHECK(r.err == "dmcow-img: Could not create snapshot 'third': -22 (Invalid argument)\n");
  CHECK(Exec(dir.path(), "cmp img before").rc == 0);
  CHECK(Exec(dir.path(), "qemu-img check img").rc == 0);
}

// Hostile snapshot tables: a snapshot whose L1 table names an L2 table past
// the end of the file, or misaligned, is refused by -d and -a before
// anything is written; the active state's own tree likewise for -c.
TEST_CASE("snapshot: hostile tables are refused before anything changes", "[snapshot][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (uint64_t bad : {uint64_t{0x7fff0000000}, uint64_t{0x10200}}) {
    for (const char* args : {"-d s1 img", "-a s1 img", "-c s2 active"}) {
      DYNAMIC_SECTION(args << ", L2 table at " << bad) {
        MustRun("cd '" + dir.path() + "' && rm -f img active && qemu-img create -q -f qcow2 img 1M" +
                " && qemu-io -c 'write -P 1 0 64k' img >/dev/null && qemu-img snapshot -c s1 img && cp img active");
        std::unique_ptr<Image> image;
        REQUIRE(OpenImage(dir / "img", OpenOptions(), &image).ok());
        const uint64_t snapshot_l1 = image->info().snapshots.at(0).l1_table_offset;
        image.reset();
        // The snapshot's L1 entry 0 in img; the active L1 entry 0 in active
        // (its header's l1_table_offset, bytes 40-47).
        std::vector<uint8_t> bytes = ReadWholeFile(dir / "img");
        std::vector<uint8_t> active = ReadWholeFile(dir / "active");
        uint64_t active_l1 = 0;
        for (int i = 0; i < 8; i++) active_l1 = active_l1 << 8 | active[40 + i];
        for (int i = 0; i < 8; i++) {
          bytes[snapshot_l1 + i] = static_cast<uint8_t>(bad >> (56 - 8 * i));
          active[active_l1 + i] = static_cast<uint8_t>((bad | (uint64_t{1} << 63)) >> (56 - 8 * i));
        }
        WriteWholeFile(dir / "img", bytes);
        WriteWholeFile(dir / "active", active);
        MustRun("cd '" + dir.path() + "' && cp img img.before && cp active active.before");
        SplitResult r = Ours(dir, std::string("snapshot ") + args);
        INFO(r.err);
        CHECK(r.rc == 1);
        CHECK((r.err.find("past the end of the file") != std::string::npos ||
               r.err.find("not cluster aligned") != std::string::npos));
        CHECK(Exec(dir.path(), "cmp img img.before && cmp active active.before").rc == 0);
      }
    }
  }
}

namespace {

// The guest content of `path` (active state, or the snapshot with id
// `snapshot`), through `env`.
std::vector<std::string> SnapshotIds(Env* env, const std::string& path) {
  OpenOptions o;
  o.env = env;
  std::unique_ptr<Image> image;
  REQUIRE(OpenImage(path, o, &image).ok());
  std::vector<std::string> ids;
  for (const SnapshotInfo& s : image->info().snapshots) ids.push_back(s.id);
  return ids;
}

}  // namespace

// A crash at every write and sync of each operation: the disk, with unsynced
// writes applied, dropped or torn, holds an image whose snapshots are those
// before or those after, each with its content; whose active state reads as
// before or after; in which qemu-img check finds nothing but leaks and COPIED
// flags (qcow2_snapshot.cc says why those are safe); and which, after our
// writer overwrites the whole active state, still holds every snapshot's
// content: no cluster a snapshot keeps was written in place.
TEST_CASE("snapshot: a crash at any point leaves the snapshots and content before or after",
          "[snapshot][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  struct Operation {
    const char* name;
    Status (*run)(Image* image);
    std::vector<std::string> ids_after;
  };
  const Operation kOperations[] = {
      {"create",
       [](Image* image) {
         SnapshotInfo sn;
         sn.name = "new";
         return image->CreateSnapshot(&sn);
       },
       {"1", "2", "3"}},
      {"delete", [](Image* image) { return image->DeleteSnapshot("1"); }, {"2"}},
      {"apply", [](Image* image) { return image->ApplySnapshot("1"); }, {"1", "2"}},
  };
  for (const char* options : {"cluster_size=512", "cluster_size=64k", "compat=0.10,cluster_size=4k"}) {
    for (const Operation& op : kOperations) {
      DYNAMIC_SECTION(options << ", " << op.name) {
        MustRun("cd '" + dir.path() + "' && rm -f img && (qemu-img create -q -f qcow2 -o " + options +
                " img 1M && qemu-io -c 'write -P 1 0 300k' img && qemu-img snapshot -c s1 img"
                " && qemu-io -c 'write -P 2 100k 200k' -c 'write -c -P 3 512k 64k' img"
                " && qemu-img snapshot -c s2 img && qemu-io -c 'write -P 4 0 8k' -c 'write -P 5 700k 100k' img)"
                " >/dev/null");
        const std::string img = dir / "img";
        const std::vector<uint8_t> img_bytes = ReadWholeFile(img);
        CrashEnv original(UINT64_MAX);
        original.PutFile(img, img_bytes);
        const std::vector<std::string> ids_before = SnapshotIds(&original, img);
        REQUIRE(ids_before == std::vector<std::string>{"1", "2"});
        const std::vector<uint8_t> active_before = GuestContent(&original, img);
        const std::vector<uint8_t> snapshot1 = GuestContent(&original, img, "1");
        const std::vector<uint8_t> snapshot2 = GuestContent(&original, img, "2");
        const std::vector<uint8_t>& active_after = std::string(op.name) == "apply" ? snapshot1 : active_before;
        auto run = [&](CrashEnv* env) {
          std::unique_ptr<Image> image;
          Status s = OpenImage(img, CrashTestOptions(env), &image);
          if (s.ok()) s = op.run(image.get());
          if (s.ok()) s = image->Flush();
          if (!s.ok()) REQUIRE(env->crashed());
          return s.ok();
        };
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(img, img_bytes);
        REQUIRE(run(&dry));
        REQUIRE(SnapshotIds(&dry, img) == op.ids_after);
        QemuCheckVerdicts verdicts(dir / "crashed", /*allow_copied_flags=*/true);
        uint64_t states = 0;
        // CI: a sample of the points; scripts/crash-replay.sh: every one.
        const std::vector<uint64_t> points = CrashPointsToTry(0, dry.ops(), 16);
        for (uint64_t k : points) {
          CrashEnv env(k);
          env.PutFile(img, img_bytes);
          const bool done = run(&env);
          for (const CrashEnv::State& state : env.CrashStates(img, k, 4)) {
            INFO(options << ", " << op.name << ": crash after " << k << " of " << dry.ops() << " writes/syncs, "
                         << state.label << "\n"
                         << env.DescribePending(img));
            CHECK(verdicts.Judge(state.bytes) == "");
            CrashEnv view(UINT64_MAX);
            view.PutFile(img, state.bytes);
            const std::vector<std::string> ids = SnapshotIds(&view, img);
            CHECK((ids == op.ids_after || (ids == ids_before && !done)));
            const std::vector<uint8_t> active = GuestContent(&view, img);
            const bool before_or_after = active == active_after || (active == active_before && !done);
            CHECK(before_or_after);
            // Every snapshot there keeps its content, also once the active
            // state is overwritten through our writer.
            for (int pass = 0; pass < 2; pass++) {
              for (const std::string& id : ids) {
                INFO("snapshot " << id << (pass == 0 ? "" : ", after the active state was overwritten"));
                const std::vector<uint8_t>& expected = id == "1" ? snapshot1 : id == "2" ? snapshot2 : active_before;
                const bool kept = GuestContent(&view, img, id) == expected;  // (a bool: Catch would print the bytes)
                CHECK(kept);
              }
              if (pass == 1) break;
              std::unique_ptr<Image> writer;
              REQUIRE(OpenImage(img, CrashTestOptions(&view), &writer).ok());
              std::vector<uint8_t> fill(writer->virtual_size(), 0xee);
              REQUIRE(writer->Write(0, fill.data(), fill.size()).ok());
              REQUIRE(writer->Flush().ok());
            }
            states++;
          }
        }
        CHECK(states > points.size());
        WARN(options << ", " << op.name << ": " << points.size() << " of " << dry.ops() << " crash points, " << states
                     << " states, " << verdicts.checks() << " distinct states checked by qemu-img");
      }
    }
  }
}
