// dmcow-img rebase against qemu-img rebase 7.2: the same command line on two
// copies of the same files (made by qemu-img/qemu-io), one per tool. Both
// must agree on the exit code, stdout (-p's progress included) and stderr
// (tool names aside). After a rebase qemu-img check finds ours clean, the
// guest content is what it was (qemu-img compare against the untouched
// copy), both results are identical, qemu-img info (JSON, disk usage aside)
// agrees, and so does qemu-img map: the same clusters were copied. Then a
// crash at every write and sync of a safe rebase, and of the header change.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/image.h"
#include "dmcow/rebase.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

// Files every shape has: "base" (the backing file), "img" over it, "new"
// (another backing file) and "new.raw" (its content, raw).
const char kBackings[] =
    "qemu-img create -q -f qcow2 base 4M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 2M 1M' base"
    " && qemu-img create -q -f qcow2 new 4M && qemu-io -c 'write -P 3 512k 1M' -c 'write -P 2 2M 512k' new"
    " && qemu-img convert -O raw new new.raw";

struct Shape {
  const char* name;
  const char* make_img;  // makes "img" over "base"
  // Our copies land where qemu-img's do (with 512 B clusters, its L2
  // tables are placed otherwise: the same clusters hold data, at other
  // offsets).
  bool same_offsets = true;
};

const Shape kShapes[] = {
    {"v3, 64 KiB clusters",
     "qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -c 'write -P 9 3M 64k' -c 'write -z 100k 8k' img"},
    {"v2", "qemu-img create -q -f qcow2 -o compat=0.10 -b base -F qcow2 img && qemu-io -c 'write -P 9 3M 64k' img"},
    {"512 B clusters",
     "qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 img && qemu-io -c 'write -P 9 1000k 3k' img",
     false},
    {"2 MiB clusters",
     "qemu-img create -q -f qcow2 -o cluster_size=2M -b base -F qcow2 img && qemu-io -c 'write -P 9 2M 4k' img"},
    {"extended L2",
     "qemu-img create -q -f qcow2 -o extended_l2=on -b base -F qcow2 img && qemu-io -c 'write -P 9 2052k 4k' img",
     false},
    {"compressed, 1-bit refcounts",
     "qemu-img create -q -f qcow2 -o refcount_bits=1 -b base -F qcow2 img && qemu-io -c 'write -c -P 9 3M 64k' img"},
    {"64-bit refcounts, 4 KiB clusters",
     "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4k -b base -F qcow2 img"
     " && qemu-io -c 'write -P 9 10k 20k' img",
     false},
    {"larger than its backing files",
     "qemu-img create -q -f qcow2 -b base -F qcow2 img 9M && qemu-io -c 'write -P 9 5M 64k' img"},
    {"internal snapshot",
     "qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -c 'write -P 9 3M 64k' img"
     " && qemu-img snapshot -c s1 img && qemu-io -c 'write -P 8 600k 64k' img"},
    {"raw backing file",
     "qemu-img convert -O raw base base.raw && qemu-img create -q -f qcow2 -b base.raw -F raw img"
     " && qemu-io -c 'write -P 9 3M 64k' img"},
    {"three layers",
     "qemu-img create -q -f qcow2 -b base -F qcow2 mid && qemu-io -c 'write -P 7 1536k 1M' mid"
     " && qemu-img create -q -f qcow2 -b mid -F qcow2 img && qemu-io -c 'write -P 9 3M 64k' img"},
};

// Runs `args` through both tools on fresh copies of the shape's files.
void RebaseBoth(const TempDir& dir, const Shape& shape, const std::string& args) {
  INFO(shape.name << ": rebase " << args);
  // Made once and copied: qemu-io's compressed clusters differ from run to run.
  MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + kBackings + " && " +
          shape.make_img + ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o");
  SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/q", "qemu-img rebase " + args);
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/o", Ours() + " rebase " + args);
  CheckSameAsQemu(theirs, ours);
  Result check = Exec(dir.path() + "/o", "qemu-img check img");
  INFO(check.out);
  CHECK(check.rc == 0);
  // The guest reads what it read (for -u, only where the backing files agree).
  if (args.find("-u") == std::string::npos) CHECK(Exec(dir.path(), "qemu-img compare src/img o/img").rc == 0);
  CHECK(Exec(dir.path(), "qemu-img compare q/img o/img").rc == 0);
  auto json = [&](const char* which, const char* command) {
    Result r = Exec(dir.path() + "/" + which, std::string("qemu-img ") + command + " --output=json img");
    nlohmann::json j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    if (j.is_object()) j.erase("actual-size");
    if (j.is_array() && !shape.same_offsets) {  // what each range is, wherever it lies
      nlohmann::json merged = nlohmann::json::array();
      for (auto extent : j) {
        extent.erase("offset");
        if (!merged.empty()) {
          nlohmann::json& last = merged.back();
          nlohmann::json a = last, b = extent;
          for (const char* key : {"start", "length"}) a.erase(key), b.erase(key);
          if (a == b) {
            last["length"] = last["length"].get<uint64_t>() + extent["length"].get<uint64_t>();
            continue;
          }
        }
        merged.push_back(extent);
      }
      j = merged;
    }
    return j;
  };
  CHECK(json("o", "info") == json("q", "info"));
  CHECK(json("o", "map") == json("q", "map"));
  // The snapshot: untouched.
  if (std::string(shape.name) == "internal snapshot") {
    MustRun("cd '" + dir.path() +
            "' && qemu-img convert -l s1 -O raw q/img q.raw && qemu-img convert -l s1 -O raw o/img"
            " o.raw");
    CHECK(Exec(dir.path(), "cmp q.raw o.raw").rc == 0);
  }
}

}  // namespace

TEST_CASE("rebase: safe, unsafe and removing the backing file, as qemu-img", "[rebase][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Shape* shape : Sampled(kShapes)) {
    DYNAMIC_SECTION(shape->name) {
      RebaseBoth(dir, *shape, "-b new -F qcow2 img");
      RebaseBoth(dir, *shape, "-b new.raw -F raw img");
      RebaseBoth(dir, *shape, "-b '' img");
      RebaseBoth(dir, *shape, "-u -b new -F qcow2 img");
      RebaseBoth(dir, *shape, "-u img");
      RebaseBoth(dir, *shape, "-q -p -b new -F qcow2 img");
    }
  }
}

TEST_CASE("rebase: progress, options and the new backing file's directory, as qemu-img", "[rebase][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const Shape& plain = kShapes[0];
  RebaseBoth(dir, plain, "-p -b new -F qcow2 img");
  RebaseBoth(dir, plain, "-p -u -b new -F qcow2 img");
  RebaseBoth(dir, plain, "-t none -T writeback -U -f qcow2 -b new -F qcow2 img");
  RebaseBoth(dir, plain, "--image-opts -b new -F qcow2 driver=qcow2,file.filename=img");
  RebaseBoth(dir, kShapes[10], "-b base -F qcow2 img");  // onto a file already in the chain
  // In a subdirectory: -b is relative to the image, as the name recorded.
  MustRun("cd '" + dir.path() + "' && rm -rf q o && mkdir -p q/sub o/sub && (cd q/sub && " + kBackings + " && " +
          plain.make_img + ") >/dev/null && cp -a q/sub o/");
  SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/q", "qemu-img rebase -b new -F qcow2 sub/img");
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/o", Ours() + " rebase -b new -F qcow2 sub/img");
  CHECK(theirs.rc == 0);
  CHECK(ours.rc == 0);
  CHECK(Exec(dir.path(), "qemu-img compare q/sub/img o/sub/img").rc == 0);
  CHECK(Exec(dir.path() + "/o", "qemu-img info sub/img").out.find("backing file: new (actual path: sub/new)") !=
        std::string::npos);
}

// Bad command lines and refusals: the same message and exit code, and the
// image left as it was wherever qemu-img leaves it so.
TEST_CASE("rebase: bad input gets qemu-img's message and changes nothing", "[rebase][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string long_name(400, 'x'), too_long(1100, 'y');
  // Every one leaves the files as they were, with qemu-img as with us.
  const std::vector<std::string> cases = {
      "-x -b new img",
      "-b",
      "-b new img img",
      "img",
      "-b new",
      "-t bogus -b new -F qcow2 img",
      "-T bogus -b new -F qcow2 img",
      "-F bogus -b new img",
      "-u -F bogus -b new img",
      "-F qcow2 -b new nofile",
      "-b nonexist -F qcow2 img",
      "-b nonexist img",
      "-u -b new img",
      "-u -b " + long_name + " -F qcow2 small",
      "-u -b " + too_long + " -F qcow2 img",
      "-u -b " + too_long + " img",
      "-u -b base -F qcow2 dataraw",
      "-u -b base -F qcow2 -f raw img",
      "-u -b base -F qcow2 plain.raw",
      "-u -b base -F qcow2 v1",
      "-f qcow2 --image-opts -b new -F qcow2 driver=qcow2,file.filename=img",
  };
  for (const std::string& args : cases) {
    DYNAMIC_SECTION(args.substr(0, 60)) {
      MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + kBackings + " && " +
              kShapes[0].make_img +
              " && qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 small"
              " && qemu-img create -q -f qcow2 -o data_file=d.raw,data_file_raw=on dataraw 4M"
              " && qemu-img create -q -f raw plain.raw 1M && qemu-img create -q -f qcow -b base -F qcow2 v1"
              ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o && mkdir -p logs");
      SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", "qemu-img rebase " + args);
      SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " rebase " + args);
      CHECK(theirs.rc == 1);
      CheckSameAsQemu(theirs, ours);
      CHECK(Exec(dir.path(), "diff -r src q").rc == 0);
      CHECK(Exec(dir.path(), "diff -r src o").rc == 0);
    }
  }
  // qemu-img copies, then refuses for want of -F; we refuse first.
  MustRun("cd '" + dir.path() + "' && rm -rf src o && mkdir src && (cd src && " + kBackings + " && " +
          kShapes[0].make_img + ") >/dev/null && cp -a --sparse=never src o");
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " rebase -b new img");
  CHECK(ours.rc == 1);
  CHECK(ours.err == "dmcow-img: Could not change the backing file to 'new': backing format must be specified\n");
  CHECK(Exec(dir.path(), "diff -r src o").rc == 0);
}

// -u changes only the name: persistent bitmaps stay valid, as qemu-img
// keeps them.
TEST_CASE("rebase -u keeps persistent bitmaps valid", "[rebase][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && (" + kBackings + " && " + kShapes[0].make_img +
          " && qemu-img bitmap --add img b0 && qemu-img bitmap --add -g 128k img b1) >/dev/null && cp img q");
  MustRun("cd '" + dir.path() + "' && " + Ours() +
          " rebase -u -b new -F qcow2 img && qemu-img rebase -u -b new -F qcow2 q");
  Result info = Exec(dir.path(), "qemu-img info --output=json img");
  Result theirs = Exec(dir.path(), "qemu-img info --output=json q");
  nlohmann::json a = nlohmann::json::parse(info.out), b = nlohmann::json::parse(theirs.out);
  CHECK(a["format-specific"]["data"]["bitmaps"] == b["format-specific"]["data"]["bitmaps"]);
  CHECK(a["format-specific"]["data"]["bitmaps"].size() == 2);
  CHECK(Exec(dir.path(), "qemu-img check img").rc == 0);
}

// A crash at every write and sync of a safe rebase (and so of its header
// change): the disk, with unsynced writes applied, dropped or torn, holds an
// image qemu-img check finds no corruption in, naming the old or the new
// backing file and reading, through it, exactly what it read before.
TEST_CASE("rebase: a crash at any point leaves the old or the new backing file and the same content",
          "[rebase][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* options : {"cluster_size=512", "cluster_size=64k", "compat=0.10,cluster_size=4k"}) {
    DYNAMIC_SECTION(options) {
      MustRun("cd '" + dir.path() + "' && rm -f base new img && (" + kBackings + " && qemu-img create -q -f qcow2 -o " +
              options + " -b base -F qcow2 img && qemu-io -c 'write -P 9 3M 64k' img) >/dev/null");
      const std::string img = dir / "img";
      const std::vector<uint8_t> img_bytes = ReadWholeFile(img);
      auto put_all = [&](CrashEnv* env) {
        env->PutFile(img, img_bytes);
        env->PutFile(dir / "base", ReadWholeFile(dir / "base"));
        env->PutFile(dir / "new", ReadWholeFile(dir / "new"));
      };
      auto content = [&](Env* env, const std::string& path, std::string* backing) {
        OpenOptions o;
        if (env != nullptr) o.env = env;
        std::unique_ptr<Image> image;
        Status s = OpenImage(path, o, &image);
        INFO(s.ToString());
        REQUIRE(s.ok());
        *backing = image->info().backing_filename;
        std::vector<uint8_t> bytes(image->virtual_size());
        REQUIRE(image->Read(0, bytes.data(), bytes.size()).ok());
        return bytes;
      };
      std::string name;
      const std::vector<uint8_t> before = content(nullptr, img, &name);
      REQUIRE(name == "base");
      auto run = [&](CrashEnv* env) {
        OpenOptions o = CrashTestOptions(env);
        std::unique_ptr<Image> image, new_backing;
        Status s = OpenImage(img, o, &image);
        OpenOptions ro;
        ro.env = env;
        if (s.ok()) s = OpenImage(dir / "new", ro, &new_backing);
        RebaseOptions rebase;
        rebase.backing = "new";
        rebase.backing_format = "qcow2";
        rebase.new_backing = new_backing.get();
        if (s.ok()) s = Rebase(image.get(), rebase);
        if (!s.ok()) REQUIRE(env->crashed());
        return s.ok();
      };
      CrashEnv dry(UINT64_MAX);
      put_all(&dry);
      REQUIRE(run(&dry));
      QemuCheckVerdicts verdicts(dir / "crashed");
      uint64_t states = 0;
      // CI: a sample of the points (the 512 B shape has hundreds); scripts/crash-replay.sh: every one.
      const std::vector<uint64_t> points = CrashPointsToTry(0, dry.ops(), 16);
      for (uint64_t k : points) {
        CrashEnv env(k);
        put_all(&env);
        const bool done = run(&env);
        for (const CrashEnv::State& state : env.CrashStates(img, k, 4)) {
          INFO(options << ": crash after " << k << " of " << dry.ops() << " writes/syncs, " << state.label << "\n"
                       << env.DescribePending(img));
          CHECK(verdicts.Judge(state.bytes) == "");
          CrashEnv view(UINT64_MAX);
          put_all(&view);
          view.PutFile(img, state.bytes);
          std::string backing;
          const bool same = content(&view, img, &backing) == before;
          CHECK(same);
          CHECK((backing == "new" || (backing == "base" && !done)));
          states++;
        }
      }
      CHECK(states > points.size());  // more than one disk state per crash point
    }
  }
}
