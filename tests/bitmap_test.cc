// dmcow-img bitmap against qemu-img bitmap 7.2: the same command lines on
// two copies of the same image, one per tool. Both agree on the exit code,
// stdout and stderr (tool and node names aside), on what qemu-img info says
// after (actual-size aside: the bitmaps lie elsewhere) and on every
// bitmap's dirty ranges as QEMU reads them (qemu-nbd); qemu-img check finds
// ours clean and the guest content is untouched. Then bad input, bitmaps
// left in use, and a crash at every write and sync of a change (and of a
// resize, which resizes every bitmap).
#include <catch2/catch.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using json = nlohmann::json;

namespace {

// Bitmaps with bits: b0 (default granularity, disabled after two writes)
// and fine (512 bytes, enabled); "other" (same size) holds ob (1 MiB).
std::string WithBitmaps(const std::string& size) {
  return " && qemu-img bitmap --add img b0 && qemu-img bitmap --add -g 512 img fine"
         " && qemu-io -c 'write -P 1 0 1k' -c 'write -P 2 300k 5k' img"
         " && qemu-img bitmap --disable img b0 && qemu-io -c 'write -P 3 1M 64k' img"
         " && qemu-img create -q -f qcow2 other " +
         size + " && qemu-img bitmap --add -g 1M other ob && qemu-io -c 'write 8k 1k' other";
}

struct Shape {
  const char* name;
  std::string make_img;  // makes img and other in the current directory
};

const Shape kShapes[] = {
    {"v3, 64 KiB clusters", "qemu-img create -q -f qcow2 img 16M" + WithBitmaps("16M")},
    {"512 B clusters", "qemu-img create -q -f qcow2 -o cluster_size=512 img 2M" + WithBitmaps("2M")},
    {"2 MiB clusters", "qemu-img create -q -f qcow2 -o cluster_size=2M img 16M" + WithBitmaps("16M")},
    {"extended L2", "qemu-img create -q -f qcow2 -o extended_l2=on img 16M" + WithBitmaps("16M")},
    {"1-bit refcounts", "qemu-img create -q -f qcow2 -o refcount_bits=1 img 16M" + WithBitmaps("16M")},
    {"64-bit refcounts, 4 KiB clusters",
     "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4k img 2M" + WithBitmaps("2M")},
    {"over a backing file, with a snapshot",
     "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 7 0 16M' base"
     " && qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-img snapshot -c s img" +
         WithBitmaps("16M")},
    {"compressed zstd, lazy refcounts",
     "qemu-img create -q -f qcow2 -o compression_type=zstd,lazy_refcounts=on img 16M"
     " && qemu-io -c 'write -c -P 1 0 64k' img" +
         WithBitmaps("16M")},
    {"external data file", "qemu-img create -q -f qcow2 -o data_file=img.data img 16M" + WithBitmaps("16M")},
    {"a size not a multiple of 64 KiB", "qemu-img create -q -f qcow2 img 3000832" + WithBitmaps("3000832")},
};

// The steps, in order, on the same two copies. A step whose bitmaps are
// compared ends with '*' (each comparison is a qemu-nbd per bitmap).
const char* const kSteps[] = {
    "--add img a1",
    "--add -g 64k img a2",
    "--add img a1",  // exists
    "--merge b0 img a1",
    "--merge fine img a2",  // 512 B bits into 64 KiB ones
    "--merge a2 img fine",  // and back
    "--merge ob -b other -F qcow2 img b0 *",
    "--disable img a1",
    "--enable img b0",
    "--clear img fine",
    "--add --merge b0 --disable img a3",
    "--remove img a2",
    "--enable --merge nosuch img a1 *",  // the enable is kept
    "--add -g 2G --merge b0 img huge",
    "--add -g 512 --merge huge img tiny *",
    "--remove --add -g 4k img b0",
    "--remove img fine",
    "--remove img a1",
    "--remove img a3",
    "--remove img huge",
    "--remove img tiny",
    "--remove img b0 *",  // the last: the extension goes
    "--add --add img again",
    "--merge again --clear --merge again img again *",
};

// Node names: qemu-img names the image '#block123', dmcow-img by its file.
std::string WithoutNodeNames(const std::string& text) {
  std::string s = std::regex_replace(text, std::regex("persistent in '[^']*'"), "persistent in 'NODE'");
  return std::regex_replace(s, std::regex("persistent bitmaps to [^:]*:"), "persistent bitmaps to NODE:");
}

void CheckSameOutput(SplitResult theirs, SplitResult ours) {
  theirs.err = WithoutNodeNames(theirs.err);
  ours.err = WithoutNodeNames(ours.err);
  CheckSameAsQemu(theirs, ours);
}

json InfoOf(const std::string& dir, const std::string& image = "img") {
  Result r = Exec(dir, "qemu-img info --output=json " + image);
  json info = json::parse(r.out, nullptr, false);
  if (info.is_object()) info.erase("actual-size");
  return info;
}

void MakeSource(const TempDir& dir, const std::string& make_img) {
  MustRun("cd '" + dir.path() + "' && rm -rf src q o logs && mkdir src logs && (cd src && " + make_img +
          ") >/dev/null && cp -a src q && cp -a src o");
}

SplitResult Run(const TempDir& dir, const std::string& tool_dir, const std::string& tool, const std::string& args) {
  return Exec(dir.path() + "/" + tool_dir, dir.path() + "/logs", tool + " bitmap " + args);
}

}  // namespace

TEST_CASE("bitmap: each action on each shape, as qemu-img", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Shape* shape : Sampled(kShapes)) {
    DYNAMIC_SECTION(shape->name) {
      MakeSource(dir, shape->make_img);
      for (std::string step : kSteps) {
        const bool compare_bits = step.back() == '*';
        if (compare_bits) step.resize(step.size() - 2);
        INFO("bitmap " << step);
        CheckSameOutput(Run(dir, "q", "qemu-img", step), Run(dir, "o", Ours(), step));
        CHECK(InfoOf(dir / "o") == InfoOf(dir / "q"));
        Result check = Exec(dir / "o", "qemu-img check img");
        INFO("qemu-img check of ours:\n" << check.out);
        CHECK(check.rc == 0);
        if (compare_bits) CHECK(QemuConsistentBitmaps(dir / "o") == QemuConsistentBitmaps(dir / "q"));
      }
      // (From its own directory: QEMU opens a relative data file name from there.)
      MustRun(
          "cd '" + dir.path() +
          "' && (cd src && qemu-img convert -O raw img ../s.raw) && (cd o && qemu-img convert -O raw img ../o.raw)");
      CHECK(Exec(dir.path(), "cmp -s s.raw o.raw").rc == 0);
    }
  }
}

TEST_CASE("bitmap: bad input gets qemu-img's message; a refusal changes nothing", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeSource(dir, "qemu-img create -q -f qcow2 img 16M" + WithBitmaps("16M") +
                      " && qemu-img create -q -f qcow2 -o compat=0.10 v2 16M && qemu-img create -q -f raw r 16M"
                      " && qemu-img create -q -f qcow q1 16M && qemu-img create -q -f qcow2 d 32M"
                      " && qemu-img bitmap --add d db && qemu-img create -q -f qcow2 big 4T");
  const std::string long_name(1024, 'x'), longest_name(1023, 'y');
  for (const std::string& args : std::vector<std::string>{
           "img",
           "--add img",
           "--add img b1 extra",
           "--add img b0",  // exists
           "-g 4096 --remove img b0",
           "--add -g 1000 img n",
           "--add -g 256 img n",
           "--add -g 4G img n",
           "--add -g x img n",
           "--add -g -1 img n",
           "--add -g 4T img n",
           "--add -g 512 big n",  // 1 GiB of bits: too many
           "--add img ''",
           "--add img " + long_name,
           "--remove img nosuch",
           "--clear img nosuch",
           "--enable img nosuch",
           "--disable img nosuch",
           "--merge x img b0",
           "--merge b0 -b r img fine",
           "--merge db -b d img fine",  // sizes differ
           "--merge ob -b other -F raw img fine",
           "--merge ob -b img img fine",  // the same file twice: locked
           "--merge ob -b nonexistent img fine",
           "-F qcow2 --add img n",
           "-b other --add img n",
           "--add v2 n",
           "--add r n",
           "-f raw --add r n",
           "--add q1 n",
           "--add -f raw img n",
           "--remove -f raw img b0",
           "--add nonexistent n",
           "--bogus img n",
           "-x img n",
           "-U --add img n",
           "--add -g",
           "--merge",
           "--image-opts -f qcow2 --add img n",
           "--image-opts --add driver=qcow2,file.filename=nonexistent n",
           "--object bogus --add img n",
           "--add -f nosuch img n",
       }) {
    MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a src q && cp -a src o");
    INFO("bitmap " << args);
    const SplitResult theirs = Run(dir, "q", "qemu-img", args);
    const SplitResult ours = Run(dir, "o", Ours(), args);
    CheckSameOutput(theirs, ours);
    CHECK(ours.rc == 1);
    CHECK(Exec(dir.path(), "diff -r src o").rc == 0);
  }
  // Accepted edge cases.
  for (const std::string& args : std::vector<std::string>{
           "--add img " + longest_name, "--add -g 2G img g", "--add -g 1k img g", "--add -g 0 img b0",
           "--image-opts --add driver=qcow2,file.filename=img n", "--object secret,id=s,data=x -f qcow2 --add -- img n",
           "--add -g 1k big n"}) {  // 512 MiB of bits: the most allowed
    MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a src q && cp -a src o");
    INFO("bitmap " << args);
    CheckSameOutput(Run(dir, "q", "qemu-img", args), Run(dir, "o", Ours(), args));
    CHECK(InfoOf(dir / "o") == InfoOf(dir / "q"));
    CHECK(InfoOf(dir / "o", "big") == InfoOf(dir / "q", "big"));
    CHECK(Exec(dir / "o", "qemu-img check img").rc == 0);
    CHECK(Exec(dir / "o", "qemu-img check big").rc == 0);
  }
}

TEST_CASE("bitmap: bitmaps left in use can only be removed", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // qemu-io marks every bitmap in use while it has the image open; abort()
  // leaves them so, as a crashed QEMU would.
  MakeSource(dir, "qemu-img create -q -f qcow2 img 16M" + WithBitmaps("16M") +
                      " && (ulimit -c 0; qemu-io -c 'write 0 64k' -c abort img; true) 2>/dev/null"
                      " && qemu-img bitmap --add img later && qemu-io -c 'write 2M 64k' img");
  const json before = InfoOf(dir / "src");
  REQUIRE(before.dump().find("in-use") != std::string::npos);
  for (const char* args :
       {"--clear img b0", "--enable img b0", "--disable img fine", "--merge later img b0", "--merge b0 img later",
        "--add img b0", "--merge ob -b other img b0", "--merge b0 -b img other ob *", "--remove img b0",
        "--remove --remove img fine", "--remove img fine *", "--clear img later *"}) {
    std::string step = args;
    const bool compare_bits = step.back() == '*';
    if (compare_bits) step.resize(step.size() - 2);
    INFO("bitmap " << step);
    CheckSameOutput(Run(dir, "q", "qemu-img", step), Run(dir, "o", Ours(), step));
    CHECK(InfoOf(dir / "o") == InfoOf(dir / "q"));
    CHECK(Exec(dir / "o", "qemu-img check img").rc == 0);
    if (compare_bits) CHECK(QemuConsistentBitmaps(dir / "o") == QemuConsistentBitmaps(dir / "q"));
  }
}

TEST_CASE("bitmap: a 0-byte image holds no bitmap", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeSource(dir, "qemu-img create -q -f qcow2 img 0");
  // qemu-img accepts the add and exits 0, then fails to store the bitmap
  // when it closes the image ("Lost persistent bitmaps"): nothing is kept.
  // Ours refuses (exit 1); both leave the image without bitmaps.
  const SplitResult theirs = Run(dir, "q", "qemu-img", "--add img b");
  const SplitResult ours = Run(dir, "o", Ours(), "--add img b");
  CHECK(theirs.err.find("Lost persistent bitmaps") != std::string::npos);
  CHECK(ours.rc == 1);
  CHECK(ours.err.find("0-byte") != std::string::npos);
  CHECK(InfoOf(dir / "o") == InfoOf(dir / "q"));
  CHECK(Exec(dir.path(), "diff -r src o").rc == 0);
}

// A bitmap table is untrusted: freeing it frees each cluster once and never
// one that something else still uses (rules F1-F3 of qcow2_bitmap_free.cc).
// Its table names its own bits, twice, then guest data (twice), the L2
// table, another bitmap's bits, the L1 table and a refcount block. QEMU
// frees them all; ours leaks what it must not free.
TEST_CASE("bitmap: removing a bitmap whose table names other clusters frees only its own", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // 2 GiB at 512-byte granularity: 8 table entries.
  MakeSource(dir,
             "qemu-img create -q -f qcow2 img 2G && qemu-io -c 'write -P 255 0 128k' img"
             " && qemu-img bitmap --add -g 512 img bad && qemu-img bitmap --add img keep"
             " && qemu-io -c 'write -P 6 1M 64k' img");
  std::vector<uint8_t> f = ReadWholeFile(dir / "src/img");
  uint64_t directory = 0;
  for (uint64_t at = BE32(f, 100); BE32(f, at) != 0; at += 8 + ((BE32(f, at + 4) + 7) & ~7u)) {
    if (BE32(f, at) == 0x23852875) directory = BE64(f, at + 8 + 16);
  }
  REQUIRE(directory != 0);
  std::map<std::string, uint64_t> tables;  // name -> table offset
  for (uint64_t at = directory, n = 0; n < 2; n++) {
    const uint32_t name_size = BE32(f, at + 16) & 0xffff, extra = BE32(f, at + 20);
    tables[std::string(f.begin() + at + 24 + extra, f.begin() + at + 24 + extra + name_size)] = BE64(f, at);
    at += (24 + extra + name_size + 7) & ~uint64_t{7};
  }
  const uint64_t offset_mask = 0x00fffffffffffe00;
  const uint64_t l1 = BE64(f, 40), l2 = BE64(f, l1) & offset_mask, data = BE64(f, l2) & offset_mask;
  const uint64_t refcount_block = BE64(f, BE64(f, 48));
  const uint64_t own = BE64(f, tables.at("bad")), keep_bits = BE64(f, tables.at("keep"));
  REQUIRE((own != 0 && data != 0 && keep_bits != 0));
  // Each cluster once, and then twice.
  const std::vector<uint64_t> tables_to_try[] = {{own, data, l2, keep_bits, l1, refcount_block, 0, 0},
                                                 {own, own, data, data, l2, keep_bits, l1, refcount_block}};
  const BitmapRanges keep_before = QemuConsistentBitmaps(dir / "src");
  REQUIRE(keep_before.count("keep") == 1);

  for (const char* how : {"bitmap --remove img bad", "amend -o compat=0.10 img"}) {
    for (int t = 0; t < 2; t++) DYNAMIC_SECTION(how << (t == 0 ? ", each named once" : ", each named twice")) {
        for (int i = 0; i < 8; i++) PutBE64(f, tables.at("bad") + i * 8, tables_to_try[t][i]);
        WriteWholeFile(dir / "src/img", f);
        MustRun("cd '" + dir.path() + "' && rm -rf o && cp -a src o");
        const Result ours = Exec(dir / "o", Ours() + " " + how + " 2>&1");
        INFO(ours.out);
        REQUIRE(ours.rc == 0);
        // Leaks only (exit 0, or 3 for leaked clusters), no error.
        const Result check = Exec(dir / "o", "qemu-img check img");
        INFO(check.out);
        CHECK((check.rc == 0 || check.rc == 3));
        CHECK(check.out.find("ERROR") == std::string::npos);
        // New clusters land on none of those still in use.
        CHECK(Exec(dir / "o", "qemu-io -c 'write -P 7 4M 512k' img").rc == 0);
        // qemu-io exits 1 when a pattern differs.
        CHECK(Exec(dir / "o", "qemu-io -c 'read -P 255 0 128k' -c 'read -P 6 1M 64k' -c 'read -P 7 4M 512k' img").rc ==
              0);
        CHECK(Exec(dir / "o", "qemu-img check img | grep -q ERROR").rc != 0);
        if (std::string(how).rfind("bitmap", 0) == 0) {
          const BitmapRanges keep_after = QemuConsistentBitmaps(dir / "o");
          CHECK(keep_after.count("bad") == 0);
          // The later write is noted too: compare the first range only.
          REQUIRE(keep_after.count("keep") == 1);
          CHECK(keep_after.at("keep").front() == keep_before.at("keep").front());
        }
      }
  }
}

TEST_CASE("bitmap: a crash at any point of a change or a resize leaves the bitmaps as before or after",
          "[bitmap][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  struct Change {
    const char* name;
    std::vector<BitmapAction> actions;
    const char* bitmap;
    uint64_t new_size = 0;  // not 0: a resize (Grow, Shrink), which resizes every bitmap
  };
  auto action = [](BitmapAction::Kind kind, uint64_t granularity = 0, const char* source = "") {
    BitmapAction a;
    a.kind = kind;
    a.granularity = granularity;
    a.source_name = source;
    return a;
  };
  using K = BitmapAction::Kind;
  const Change kChanges[] = {
      {"add and merge two", {action(K::kAdd, 4096), action(K::kMerge, 0, "b0"), action(K::kMerge, 0, "fine")}, "n"},
      {"clear", {action(K::kClear)}, "fine"},
      {"disable", {action(K::kDisable)}, "fine"},
      {"remove", {action(K::kRemove)}, "b0"},
      {"grow the image", {}, "", 40 << 20},
      {"shrink the image", {}, "", 1 << 20},
  };
  for (const char* cluster : {"512", "64k"}) {
    for (const Change& change : kChanges) {
      DYNAMIC_SECTION(change.name << ", cluster_size=" << cluster) {
        MakeSource(
            dir, std::string("qemu-img create -q -f qcow2 -o cluster_size=") + cluster + " img 4M" + WithBitmaps("4M"));
        const std::string img = dir / "src/img";
        const std::vector<uint8_t> img_bytes = ReadWholeFile(img);
        auto state_of = [&](const std::vector<uint8_t>& bytes) {
          WriteWholeFile(dir / "state.qcow2", bytes);
          json info = InfoOf(dir.path(), "state.qcow2");
          const json bitmaps = info["format-specific"]["data"].value("bitmaps", json::array());
          return info["virtual-size"].dump() + bitmaps.dump() +
                 json(QemuConsistentBitmaps(dir.path(), "state.qcow2")).dump();
        };
        auto run = [&](CrashEnv* env) {
          std::unique_ptr<Image> image;
          OpenOptions options = CrashTestOptions(env);
          options.metadata_only = true;
          Status s = OpenImage(img, options, &image);
          if (s.ok() && change.new_size > image->virtual_size()) s = image->Grow(change.new_size);
          if (s.ok() && change.new_size != 0 && change.new_size < image->virtual_size()) {
            s = image->Shrink(change.new_size);
          }
          if (s.ok() && change.new_size == 0) s = image->ChangeBitmap(change.bitmap, change.actions, nullptr);
          INFO(s.ToString());
          if (!s.ok()) REQUIRE(env->crashed());
          return s.ok();
        };
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(img, img_bytes);
        REQUIRE(run(&dry));
        // (Everything is synced when ChangeBitmap returns: one state, the durable one.)
        const std::string before = state_of(img_bytes), after = state_of(dry.CrashStates(img, 0, 0).front().bytes);
        REQUIRE(before != after);
        const std::vector<uint8_t> content = GuestContent(&dry, img);
        CrashEnv untouched(UINT64_MAX);
        untouched.PutFile(img, img_bytes);
        const std::vector<uint8_t> content_before = GuestContent(&untouched, img);
        QemuCheckVerdicts verdicts(dir / "crashed");
        std::map<size_t, std::string> seen;  // the hash of a state's bytes: its bitmaps
        uint64_t states = 0;
        // CI: a sample of the points; scripts/crash-replay.sh: every one.
        const std::vector<uint64_t> points = CrashPointsToTry(0, dry.ops(), 16);
        for (uint64_t k : points) {
          CrashEnv env(k);
          env.PutFile(img, img_bytes);
          const bool done = run(&env);
          const std::vector<CrashEnv::State> all_states = env.CrashStates(img, k, 4);
          for (const CrashEnv::State* sampled : Sampled(all_states)) {
            const CrashEnv::State& state = *sampled;
            INFO(change.name << ", cluster_size=" << cluster << ": crash after " << k << " of " << dry.ops()
                             << " writes/syncs, " << state.label << "\n"
                             << env.DescribePending(img));
            CHECK(verdicts.Judge(state.bytes) == "");
            const size_t key = std::hash<std::string>()(std::string(state.bytes.begin(), state.bytes.end()));
            if (!seen.count(key)) seen[key] = state_of(state.bytes);
            CHECK((seen[key] == after || (seen[key] == before && !done)));
            CrashEnv view(UINT64_MAX);
            view.PutFile(img, state.bytes);
            // A resize changes the guest's size at the switch, nothing else.
            const std::vector<uint8_t> seen_content = GuestContent(&view, img);
            const bool same = seen_content == content || (seen_content == content_before && !done);
            CHECK(same);
            states++;
          }
        }
        CHECK(states > points.size());
        WARN(change.name << ", cluster_size=" << cluster << ": " << points.size() << " of " << dry.ops()
                         << " crash points, " << states << " states, " << seen.size()
                         << " distinct states read by QEMU");
      }
    }
  }
}

TEST_CASE("convert --bitmaps copies the bitmaps as qemu-img", "[bitmap][convert][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // src: b0 (disabled) and fine with bits, plus one left in use (qemu-io
  // abort) in broken; other is raw; v2 a version 2 image.
  MakeSource(dir, "qemu-img create -q -f qcow2 img 16M" + WithBitmaps("16M") +
                      " && cp img broken && (ulimit -c 0; qemu-io -c 'write 0 64k' -c abort broken; true) 2>/dev/null"
                      " && qemu-img bitmap --add broken later && qemu-img create -q -f raw raw 16M"
                      " && qemu-img create -q -f qcow2 -o compat=0.10 v2 16M && qemu-img create -q -f qcow2 fresh 16M"
                      " && qemu-img create -q -f qcow2 has 16M && qemu-img bitmap --add has fine");
  for (const char* args : {
           "--bitmaps -O qcow2 img out",
           "--bitmaps -O qcow2 -o cluster_size=512 img out",
           "--bitmaps -O qcow2 -o cluster_size=2M,extended_l2=on img out",
           "--bitmaps -c -O qcow2 img out",
           "--bitmaps -O qcow2 -B raw -F raw img out",
           "--bitmaps -n -O qcow2 img fresh",
           "--bitmaps --skip-broken-bitmaps -O qcow2 broken out",
           "--bitmaps -O qcow2 broken out",  // in use: refused before the target is made
           "--skip-broken-bitmaps -O qcow2 img out",
           "--bitmaps -O raw img out",  // the target is made, then refused
           "--bitmaps -O qcow2 -o compat=0.10 img out",
           "--bitmaps -O qcow2 raw out",
           "--bitmaps -O qcow2 v2 out",
           "--bitmaps -O qcow2 img img out",
       }) {
    MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a src q && cp -a src o");
    INFO("convert " << args);
    const std::string out = std::string(args).substr(std::string(args).rfind(' ') + 1);
    CheckSameAsQemu(Exec(dir / "q", dir / "logs", std::string("qemu-img convert ") + args),
                    Exec(dir / "o", dir / "logs", Ours() + " convert " + args));
    CHECK(Exec(dir.path(), "ls q > q.ls && ls o > o.ls && cmp -s q.ls o.ls").rc == 0);
    if (Exec(dir / "o", "test -f " + out).rc != 0) continue;
    CHECK(InfoOf(dir / "o", out) == InfoOf(dir / "q", out));
    const Result check = Exec(dir / "o", "qemu-img check " + out);
    if (InfoOf(dir / "o", out)["format"] == "qcow2") {
      INFO("qemu-img check of ours:\n" << check.out);
      CHECK(check.rc == 0);
      CHECK(QemuConsistentBitmaps(dir / "o", out) == QemuConsistentBitmaps(dir / "q", out));
    }
    CHECK(Exec(dir.path(), "qemu-img compare q/" + out + " o/" + out).rc == 0);
  }
  // Into a target with a bitmap of the same name: copied, then "already
  // exists", as qemu-img; the target's own bitmap learnt what the copy
  // wrote, in both (bitmap_writers_test has more of convert -n).
  MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a src q && cp -a src o");
  const std::string args = "convert --bitmaps -n -O qcow2 img has";
  CheckSameAsQemu(Exec(dir / "q", dir / "logs", "qemu-img " + args),
                  Exec(dir / "o", dir / "logs", Ours() + " " + args));
  CHECK(Exec(dir.path(), "qemu-img compare q/has o/has").rc == 0);
  CHECK(InfoOf(dir / "o", "has") == InfoOf(dir / "q", "has"));
  CHECK(QemuConsistentBitmaps(dir / "o", "has") == QemuConsistentBitmaps(dir / "q", "has"));
}
