// dmcow-img amend against qemu-img amend 7.2: the same command line on two
// copies of the same image, one per tool. Both agree on the exit code,
// stdout and stderr (tool names aside) and on what qemu-img info says after
// (actual-size aside: the new refcount structures lie elsewhere); qemu-img
// check finds ours clean; the guest reads the same through both, and every
// snapshot of ours reads as before. Then bad input, and a crash at every
// write and sync of each change.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using json = nlohmann::json;

namespace {

struct Shape {
  const char* name;
  const char* make_img;  // makes "img" (and what it needs) in the current directory
  // qemu-img 7.2 never returns from a refcount width change here (it loops,
  // one core busy): only ours runs those.
  bool qemu_width_change_hangs = false;
  // Persistent bitmaps: size= is refused (the bitmaps case below).
  bool has_bitmaps = false;
};

const Shape kShapes[] = {
    {"v3, zero clusters",
     "qemu-img create -q -f qcow2 img 16M && qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 1M' -c 'write -P 2 4M 64k'"
     " -c 'write -z 4M 64k' img"},
    {"v2", "qemu-img create -q -f qcow2 -o compat=0.10 img 16M && qemu-io -c 'write -P 1 0 1M' img"},
    {"512 B clusters",
     "qemu-img create -q -f qcow2 -o cluster_size=512 img 2M && qemu-io -c 'write -P 1 1k 300k' -c 'write -z 1M 4k' "
     "img"},
    {"2 MiB clusters",
     "qemu-img create -q -f qcow2 -o cluster_size=2M img 16M && qemu-io -c 'write -P 1 2M 4k' -c 'write -z 8M 2M' img",
     true},
    {"extended L2", "qemu-img create -q -f qcow2 -o extended_l2=on img 16M && qemu-io -c 'write -P 1 8k 4k' img"},
    {"compressed zlib",
     "qemu-img create -q -f qcow2 img 16M && qemu-io -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' img"},
    {"compressed zstd",
     "qemu-img create -q -f qcow2 -o compression_type=zstd img 16M && qemu-io -c 'write -c -P 1 0 64k' img"},
    {"zstd, nothing compressed",
     "qemu-img create -q -f qcow2 -o compression_type=zstd img 16M && qemu-io -c 'write -P 1 0 64k' img"},
    {"1-bit refcounts", "qemu-img create -q -f qcow2 -o refcount_bits=1 img 16M && qemu-io -c 'write -P 1 0 1M' img"},
    {"64-bit refcounts, 4 KiB clusters",
     "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4k img 2M && qemu-io -c 'write -P 1 10k 20k' img"},
    {"over a qcow2 backing file, zero clusters and a snapshot",
     "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 7 0 16M' base"
     " && qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -c 'write -P 1 1M 64k' -c 'write -z 2M 1M' img"
     " && qemu-img snapshot -c s img && qemu-io -c 'write -z 5M 128k' -c 'write -P 3 2M 64k' img"},
    {"over a raw backing file",
     "qemu-img create -q -f raw base.raw 16M && qemu-io -f raw -c 'write -P 7 0 2M' base.raw"
     " && qemu-img create -q -f qcow2 -b base.raw -F raw img && qemu-io -c 'write -z 1M 64k' img"},
    // QEMU 7.2's downgrade zeroes the cluster at 0 in place, which the
    // snapshot still reads as 1s (and flags it COPIED: check then fails).
    {"an allocated zero cluster shared with a snapshot",
     "qemu-img create -q -f qcow2 img 16M && qemu-io -c 'write -P 1 0 256k' img && qemu-img snapshot -c s img"
     " && qemu-io -c 'write -P 2 1M 64k' -c 'write -z 0 64k' img"},
    {"metadata preallocation",
     "qemu-img create -q -f qcow2 -o preallocation=metadata img 4M && qemu-io -c 'write -P 1 0 64k' img"},
    {"persistent bitmaps",
     "qemu-img create -q -f qcow2 img 16M && qemu-img bitmap --add img b1 && qemu-io -c 'write -P 1 0 1M' img"
     " && qemu-img bitmap --add -g 128k img b2 && qemu-img bitmap --disable img b2",
     false, true},
    {"lazy refcounts", "qemu-img create -q -f qcow2 -o lazy_refcounts=on img 16M && qemu-io -c 'write -P 1 0 1M' img"},
    {"external data file",
     "qemu-img create -q -f qcow2 -o data_file=img.data img 16M && qemu-io -c 'write -P 1 0 1M' img"},
};

const char* const kAmendments[] = {
    "-o compat=0.10",
    "-o compat=1.1",
    "-o compat=v3,refcount_bits=8",
    "-o refcount_bits=1",
    "-o refcount_bits=4",
    "-o refcount_bits=64",
    "-o refcount_bits=16,compat=0.10",
    "-o lazy_refcounts=on",
    "-o lazy_refcounts=off",
    "-o size=24M",
    "-o size=1M",
    "-p -o compat=0.10",
    "-p -o compat=1.1,lazy_refcounts=on",
    "-q -o compat=1.1,lazy_refcounts=on",
};

// qemu-img info --output=json of img in `dir`, without actual-size.
json InfoOf(const std::string& dir) {
  Result r = Exec(dir, "qemu-img info --output=json img");
  json info = json::parse(r.out, nullptr, false);
  if (info.is_object()) info.erase("actual-size");
  return info;
}

// The ids of the snapshots of `dir`/img.
std::vector<std::string> SnapshotIdsIn(const std::string& dir) {
  std::vector<std::string> ids;
  const json info = InfoOf(dir);
  if (info.contains("snapshots")) {
    for (const json& s : info["snapshots"]) ids.push_back(s["id"].get<std::string>());
  }
  return ids;
}

// Runs `args` through both tools on fresh copies of src/ (q/ theirs, o/
// ours) and compares as the file's header says. With `ours_only`, qemu-img
// does not run (it would hang): ours succeeds, clean, with src's content.
void AmendBoth(const TempDir& dir, const std::string& args, bool ours_only = false) {
  MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a --sparse=never src q && cp -a --sparse=never src o");
  INFO("amend " << args);
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " amend " + args + " img");
  if (!ours_only) {
    SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", "qemu-img amend " + args + " img");
    // Refusing a downgrade of zstd-compressed clusters, qemu-img has
    // expanded the zero clusters first (its progress line shows them);
    // ours refuses before writing anything.
    if (theirs.err.find("zstd compression type and existing compressed") != std::string::npos) theirs.out = ours.out;
    CheckSameAsQemu(theirs, ours);
  }
  CHECK((ours.rc == 0 || !ours_only));
  Result check = Exec(dir.path() + "/o", "qemu-img check img");
  INFO("qemu-img check of ours:\n" << check.out);
  CHECK(check.rc == 0);
  // (Each from its own directory: QEMU opens an external data file's
  // relative name from the current one. q is src's copy when ours_only.)
  MustRun("cd '" + dir.path() +
          "' && (cd q && qemu-img convert -O raw img ../q.raw) && (cd o && qemu-img convert -O "
          "raw img ../o.raw)");
  CHECK(Exec(dir.path(), "cmp -s q.raw o.raw").rc == 0);
  if (!ours_only) CHECK(InfoOf(dir.path() + "/o") == InfoOf(dir.path() + "/q"));
  // Each snapshot reads as in qemu-img's result (whose convert -l reads it
  // at the image's current size), except after a downgrade, where QEMU's
  // may have changed (the shape commented below): there, as before it.
  const std::string reference = args.find("compat=0.10") != std::string::npos || ours_only ? "src" : "q";
  for (const std::string& id : SnapshotIdsIn(dir.path() + "/src")) {
    INFO("snapshot " << id << " reads as in " << reference);
    MustRun("cd '" + dir.path() + "' && qemu-img convert -l snapshot.id=" + id + " -O raw " + reference +
            "/img ref.raw && qemu-img convert -l snapshot.id=" + id + " -O raw o/img o.raw");
    CHECK(Exec(dir.path(), "cmp -s ref.raw o.raw").rc == 0);
  }
}

void MakeSource(const TempDir& dir, const std::string& make_img) {
  MustRun("cd '" + dir.path() + "' && rm -rf src logs && mkdir src logs && (cd src && " + make_img + ") >/dev/null");
}

}  // namespace

TEST_CASE("amend: each option on each shape, as qemu-img", "[amend][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Shape* shape : Sampled(kShapes)) {
    DYNAMIC_SECTION(shape->name) {
      MakeSource(dir, shape->make_img);
      for (const char* args : kAmendments) {
        const bool width = std::string(args).find("refcount_bits") != std::string::npos;
        if (shape->has_bitmaps && std::string(args).find("size=") != std::string::npos) continue;
        AmendBoth(dir, args, width && shape->qemu_width_change_hangs);
      }
    }
  }
}

TEST_CASE("amend: bad input gets qemu-img's message; a refusal changes nothing", "[amend][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeSource(dir,
             "qemu-img create -q -f qcow2 img 16M && qemu-io -c 'write -P 1 0 1M' img && qemu-img snapshot -c s img && "
             "qemu-img create -q -f raw r.raw 1M && qemu-img create -q -f qcow v1 1M");
  const std::string before = Sha256OfFile(dir / "src/img");
  for (const char* args : {
           "img",  // no -o
           "-o '' img",
           "-o ,compat=1.1 img",
           "-o compat=1.1, img",
           "-o compat=1.1,, img",  // bad lists
           "-o compat=1.1",
           "-o compat=1.1 img img",  // file count
           "-o help",
           "-o help img",
           "-f qcow2 -o help",
           "-f raw -o help",
           "-f qcow -o help",
           "-f nosuch -o help",
           "-f qcow2 -o compat=1.1,help",
           "-p -o help img",
           "-o size=2M r.raw",
           "-f raw -o size=2M r.raw",
           "-o compat=1.1 v1",
           "-o help r.raw",
           "-o foo=bar img",
           "-o cluster_size=4k img",
           "-o cluster_size=4k,foo=bar img",
           "-o preallocation=full img",
           "-o compression_type=zstd img",
           "-o extended_l2=on img",
           "-o encryption=on img",
           "-o lazy_refcounts=maybe img",
           "-o refcount_bits=x img",
           "-o size=2Q img",
           "-o size=-1 img",
           "-o compat=1.2 img",
           "-o compat= img",
           "-o refcount_bits=3 img",
           "-o refcount_bits=0 img",
           "-o refcount_bits=128 img",
           "-o refcount_bits=1 img",  // the snapshot shares clusters: refcount 2
           "-o compat=0.10,refcount_bits=8 img",
           "-o lazy_refcounts=on,compat=0.10 img",
           "-o backing_file=x img",
           "-o backing_fmt=qcow2 img",
           "-o backing_file= img",
           "-o data_file=x img",
           "-o data_file_raw=on img",
           "-o encrypt.keyslot=1 img",
           "-o encrypt.new-secret=x img",
           "-o size=1000 img",
           "-o size=8M,compat=0.10 img",  // v3 with a snapshot at another size
           "-p -o compat=1.2 img",
           "-t bogus -o size=24M img",
           "-x -o size=24M img",
           "-U -o size=24M img",
           "--image-opts -f qcow2 -o size=24M img",
           "-o compat=1.1 nonexistent",
           "-o",
       }) {
    MustRun("cd '" + dir.path() + "' && rm -rf q o && cp -a --sparse=never src q && cp -a --sparse=never src o");
    INFO("amend " << args);
    SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", std::string("qemu-img amend ") + args);
    SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " amend " + args);
    CheckSameAsQemu(theirs, ours);
    if (ours.rc != 0 && std::string(args).find("size=8M") == std::string::npos) {
      CHECK(Sha256OfFile(dir / "o/img") == before);
    }
    CHECK(Exec(dir.path(), "qemu-img compare q/img o/img").rc == 0);
  }
  // A failure part way keeps what went before, as in QEMU: v2 becomes v3,
  // then the backing file check fails.
  MakeSource(dir, "qemu-img create -q -f qcow2 -o compat=0.10 img 16M");
  AmendBoth(dir, "-o compat=1.1,backing_file=foo");
  AmendBoth(dir, "--image-opts -o lazy_refcounts=on driver=qcow2,file.filename=img");
}

TEST_CASE("amend: persistent bitmaps stay valid, size= resizes them, a downgrade frees them", "[amend][qemu][bitmap]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeSource(dir, kShapes[14].make_img);
  for (const char* args : {"-o lazy_refcounts=on", "-o refcount_bits=8", "-o compat=1.1"}) {
    AmendBoth(dir, args);
    Result info = Exec(dir.path() + "/o", "qemu-img info img 2>&1");
    INFO(info.out);
    CHECK(info.out.find("name: b1") != std::string::npos);
    CHECK(info.out.find("inconsistent") == std::string::npos);
  }
  // Version 2 cannot hold them: QEMU keeps the extension (then warns that
  // they are inconsistent, and leaks their clusters); ours are gone, freed.
  AmendBoth(dir, "-o compat=0.10");
  Result check = Exec(dir.path() + "/o", "qemu-img check img 2>&1");
  CHECK(check.out.find("leaked") == std::string::npos);
  // size= resizes them with the image, as qemu-img (resize_test compares
  // their dirty ranges).
  MakeSource(dir, kShapes[14].make_img);
  AmendBoth(dir, "-o size=32M");
  Result info = Exec(dir.path() + "/o", "qemu-img info img 2>&1");
  INFO(info.out);
  CHECK(info.out.find("virtual size: 32 MiB") != std::string::npos);
  CHECK(info.out.find("name: b1") != std::string::npos);
  CHECK(info.out.find("inconsistent") == std::string::npos);
}

namespace {

ImageInfo InfoThrough(Env* env, const std::string& path) {
  OpenOptions o;
  o.env = env;
  std::unique_ptr<Image> image;
  Status s = OpenImage(path, o, &image);
  INFO(s.ToString());
  REQUIRE(s.ok());
  return image->info();
}

}  // namespace

// A crash at every write and sync of each change: the disk, with unsynced
// writes applied, dropped or torn, holds an image that qemu-img check finds
// clean but for leaks, that is as before or as after (its version, refcount
// width or lazy refcounts bit), whose guest content and snapshot are those
// of before, and which our writer can then overwrite without touching the
// snapshot.
TEST_CASE("amend: a crash at any point leaves the image as before or after, with its content", "[amend][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  struct Change {
    const char* name;
    const char* create_options;
    Status (*run)(Image* image);
    bool (*after)(const ImageInfo& info);
    bool (*before)(const ImageInfo& info);
  };
  const Change kChanges[] = {
      {"downgrade", "compat=1.1", [](Image* image) { return image->ChangeVersion(2); },
       [](const ImageInfo& i) { return i.version == 2; }, [](const ImageInfo& i) { return i.version == 3; }},
      {"upgrade", "compat=0.10", [](Image* image) { return image->ChangeVersion(3); },
       [](const ImageInfo& i) { return i.version == 3; }, [](const ImageInfo& i) { return i.version == 2; }},
      // (Narrower widths refuse here: 512-byte clusters hold parts of up to
      // 64 compressed clusters. The comparison above covers 1 and 4 bits.)
      {"refcount_bits=8", "compat=1.1", [](Image* image) { return image->ChangeRefcountBits(8); },
       [](const ImageInfo& i) { return i.refcount_bits == 8; },
       [](const ImageInfo& i) { return i.refcount_bits == 16; }},
      {"refcount_bits=64", "compat=1.1", [](Image* image) { return image->ChangeRefcountBits(64); },
       [](const ImageInfo& i) { return i.refcount_bits == 64; },
       [](const ImageInfo& i) { return i.refcount_bits == 16; }},
      {"lazy_refcounts=off", "compat=1.1,lazy_refcounts=on",
       [](Image* image) { return image->SetLazyRefcounts(false); },
       [](const ImageInfo& i) { return !i.lazy_refcounts; }, [](const ImageInfo& i) { return i.lazy_refcounts; }},
  };
  for (const char* cluster : {"512", "64k"}) {
    for (const Change& change : kChanges) {
      DYNAMIC_SECTION(change.name << ", cluster_size=" << cluster) {
        const bool v3 = std::string(change.create_options).find("compat=1.1") != std::string::npos;
        const std::string zero = v3 ? " -c 'write -z 600k 100k'" : " -c 'write -P 0 600k 100k'";
        MustRun("cd '" + dir.path() +
                "' && rm -f img base && (qemu-img create -q -f qcow2 base 1M && qemu-io -c "
                "'write -P 7 0 1M' base && qemu-img create -q -f qcow2 -b base -F qcow2 -o " +
                change.create_options + ",cluster_size=" + cluster + " img && qemu-io -c 'write -P 1 0 300k'" + zero +
                " img && qemu-img snapshot -c s1 img && qemu-io -c 'write -P 2 100k 200k'" + zero +
                " -c 'write -c -P 3 512k 64k' img) >/dev/null");
        const std::string img = dir / "img", base = dir / "base";
        const std::vector<uint8_t> img_bytes = ReadWholeFile(img), base_bytes = ReadWholeFile(base);
        auto put = [&](CrashEnv* env, const std::vector<uint8_t>& bytes) {
          env->PutFile(img, bytes);
          env->PutFile(base, base_bytes);
        };
        CrashEnv original(UINT64_MAX);
        put(&original, img_bytes);
        const std::vector<uint8_t> active = GuestContent(&original, img);
        const std::vector<uint8_t> snapshot = GuestContent(&original, img, "1");
        REQUIRE(change.before(InfoThrough(&original, img)));
        auto run = [&](CrashEnv* env) {
          std::unique_ptr<Image> image;
          OpenOptions options = CrashTestOptions(env);
          options.metadata_only = true;
          Status s = OpenImage(img, options, &image);
          if (s.ok()) s = change.run(image.get());
          if (s.ok()) s = image->Flush();
          INFO(s.ToString());
          if (!s.ok()) REQUIRE(env->crashed());
          return s.ok();
        };
        CrashEnv dry(UINT64_MAX);
        put(&dry, img_bytes);
        REQUIRE(run(&dry));
        REQUIRE(change.after(InfoThrough(&dry, img)));
        QemuCheckVerdicts verdicts(dir / "crashed");
        uint64_t states = 0;
        // CI: a sample of the points; scripts/crash-replay.sh: every one.
        const std::vector<uint64_t> points = CrashPointsToTry(0, dry.ops(), 16);
        for (uint64_t k : points) {
          CrashEnv env(k);
          put(&env, img_bytes);
          const bool done = run(&env);
          // The sanitizer pass checks a spread few of each point's states:
          // a downgrade with 512-byte clusters leaves hundreds pending.
          const std::vector<CrashEnv::State> all_states = env.CrashStates(img, k, 4);
          for (const CrashEnv::State* sampled : Sampled(all_states)) {
            const CrashEnv::State& state = *sampled;
            INFO(change.name << ", cluster_size=" << cluster << ": crash after " << k << " of " << dry.ops()
                             << " writes/syncs, " << state.label << "\n"
                             << env.DescribePending(img));
            CHECK(verdicts.Judge(state.bytes) == "");
            CrashEnv view(UINT64_MAX);
            put(&view, state.bytes);
            const ImageInfo info = InfoThrough(&view, img);
            CHECK((change.after(info) || (change.before(info) && !done)));
            const bool same = GuestContent(&view, img) == active && GuestContent(&view, img, "1") == snapshot;
            CHECK(same);
            std::unique_ptr<Image> writer;
            REQUIRE(OpenImage(img, CrashTestOptions(&view), &writer).ok());
            std::vector<uint8_t> fill(writer->virtual_size(), 0xee);
            REQUIRE(writer->Write(0, fill.data(), fill.size()).ok());
            REQUIRE(writer->Flush().ok());
            writer.reset();
            const bool kept = GuestContent(&view, img, "1") == snapshot;  // (a bool: Catch would print the bytes)
            CHECK(kept);
            states++;
          }
        }
        CHECK(states > points.size());
        WARN(change.name << ", cluster_size=" << cluster << ": " << points.size() << " of " << dry.ops()
                         << " crash points, " << states << " states, " << verdicts.checks()
                         << " distinct states checked by qemu-img");
      }
    }
  }
}
