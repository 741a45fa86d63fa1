// dmcow-img measure against qemu-img measure 7.2: the same command line
// through both tools must give the same exit code, stdout (human and JSON)
// and stderr (tool names aside), on every fixture image, on images made
// here (chains, compressed, preallocated, bitmaps, snapshots) and with
// --size alone, for every output option that changes the figures. Then,
// independently of qemu-img's figures: "required size" is an upper bound
// on what a convert with the same options writes, with both tools.
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

// Output options that change the figures (or the lines printed).
const std::vector<std::string> kOutputOptions = {
    "",  // -O raw
    "-O qcow2",
    "-O qcow2 --output=json",
    "-O qcow2 -o cluster_size=512",
    "-O qcow2 -o cluster_size=2M,refcount_bits=1",
    "-O qcow2 -o compat=0.10",
    "-O qcow2 -o extended_l2=on,refcount_bits=64",
    "-O qcow2 -o preallocation=falloc",
    "-O qcow2 -o backing_file=b.qcow2,backing_fmt=qcow2",
};

// Runs `measure ARGS` through both tools in `cwd` (default: `dir`), their
// streams passing through `dir`; every stream must agree.
void MeasureBoth(const TempDir& dir, const std::string& args, const std::string& cwd = "") {
  INFO("measure " << args);
  const std::string in = cwd.empty() ? dir.path() : cwd;
  SplitResult theirs = Exec(in, dir.path(), "timeout 10 qemu-img measure " + args);
  SplitResult ours = Exec(in, dir.path(), "timeout 10 " + Ours() + " measure " + args);
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  CHECK(ours.out == theirs.out);
  CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
}

uint64_t FileBytes(const std::string& path) {
  struct stat st {};
  REQUIRE(stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_size);
}

// The number after `key` in measure's human output.
uint64_t Figure(const std::string& out, const std::string& key) {
  const size_t at = out.find(key + ": ");
  REQUIRE(at != std::string::npos);
  return std::stoull(out.substr(at + key.size() + 2));
}

// Images made here, beyond the fixtures: shell steps in the work directory
// making "img" (and whatever it needs).
struct Made {
  const char* name;
  const char* make;
};
const Made kMade[] = {
    {"data, zeros and holes",
     "qemu-img create -q -f qcow2 img 1G && qemu-io -c 'write 0 1M' -c 'write 100M 4k' -c 'write -z 200M 1M' "
     "-c 'write 1000M 70k' img"},
    {"bitmaps, one in use",
     "qemu-img create -q -f qcow2 img 1G && qemu-io -c 'write 0 1M' img && qemu-img bitmap --add img b0 && "
     "qemu-img bitmap --add -g 512 img a_longer_bitmap_name && qemu-img bitmap --add --disable -g 2M img b2"},
    {"v2 with a v3 output", "qemu-img create -q -f qcow2 -o compat=0.10 img 100M && qemu-io -c 'write 5M 3M' img"},
    {"a chain of three",
     "qemu-img create -q -f qcow2 base 64M && qemu-io -c 'write 0 8M' base && "
     "qemu-img create -q -f qcow2 -b base -F qcow2 mid 64M && qemu-io -c 'write -z 0 4M' -c 'write 30M 1M' mid && "
     "qemu-img create -q -f qcow2 -b mid -F qcow2 img 128M && qemu-io -c 'write 100M 512' img"},
    {"compressed",
     "qemu-img create -q -f raw r 8M && qemu-io -f raw -c 'write -P 7 1M 3M' r && "
     "qemu-img convert -c -O qcow2 r img"},
    {"preallocated metadata",
     "qemu-img create -q -f qcow2 -o preallocation=metadata img 64M && "
     "qemu-io -c 'write 10M 1M' img"},
    {"raw with holes", "truncate -s 100M img && qemu-io -f raw -c 'write 5M 3k' -c 'write 50M 1M' img"},
    {"raw, not a multiple of 512", "head -c 1000 /dev/urandom > img"},
};

}  // namespace

TEST_CASE("measure agrees with qemu-img on every fixture image", "[measure][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string images = SourceDir() + "/fixtures/images";
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(images)) {
    if (entry.is_regular_file()) paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  REQUIRE(paths.size() > 40);
  for (const std::filesystem::path* sampled : Sampled(paths)) {
    const std::filesystem::path& path = *sampled;
    // Read-only and shared: the fixtures themselves are measured, from their
    // directory (qemu opens a relative external data file name from there).
    for (const std::string& options : {std::string(""), std::string("-O qcow2 --output=json"),
                                       std::string("-O qcow2 -o cluster_size=4k,compat=0.10")}) {
      MeasureBoth(dir, options + " -U '" + path.filename().string() + "'", path.parent_path());
    }
  }
}

TEST_CASE("measure agrees with qemu-img on chains, bitmaps, compressed and preallocated images", "[measure][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Made& made : kMade) {
    INFO(made.name);
    MustRun("cd '" + dir.path() + "' && rm -f img base mid r && (" + made.make + ") >/dev/null");
    for (const std::string& options : kOutputOptions) MeasureBoth(dir, options + " img");
  }
  // An internal snapshot (-l by name, by id, as snapshot.name=).
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 img 64M && qemu-io -c 'write 0 16M' img >/dev/null && "
          "qemu-img snapshot -c s1 img && qemu-io -c 'write -z 0 16M' img >/dev/null");
  for (const char* l : {"s1", "1", "snapshot.name=s1", "snapshot.id=1,snapshot.name=s1"}) {
    MeasureBoth(dir, "-O qcow2 -l " + std::string(l) + " img");
  }
  MeasureBoth(dir, "-O qcow2 img");
  MeasureBoth(dir, "-O qcow2 --image-opts driver=qcow2,file.filename=img");
  MeasureBoth(dir, "-O qcow2 -f raw img");
}

TEST_CASE("measure --size agrees with qemu-img for every output option", "[measure][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* size : {"0", "1", "512", "1000", "65537", "1G", "3T", "1P", "9223372036854775807"}) {
    for (const std::string& options : kOutputOptions) MeasureBoth(dir, options + " --size " + size);
  }
  MeasureBoth(dir, "-O qcow2 -o cluster_size=512,refcount_bits=64 --size 15T");
  MeasureBoth(dir, "-O qcow2 -o cluster_size=512 --size 16T");  // past the L1 limit
  MeasureBoth(dir, "-O qcow2 -o preallocation=metadata,lazy_refcounts=on,compression_type=zstd --size 5G");
  MeasureBoth(dir, "-O qcow2 -o data_file=d,data_file_raw=on --size 5G");
  MeasureBoth(dir, "-O qcow2 -o encrypt.format=aes --size 5G");  // not LUKS: counted as plain
  MeasureBoth(dir, "-O qcow2 -o size=2G --size 1G");             // --size wins
  MeasureBoth(dir, "--output=json --size 1G");
  MeasureBoth(dir, "--output human -O qcow2 --size 1G");
}

TEST_CASE("measure refuses bad command lines and options as qemu-img does", "[measure][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 img 64M && head -c 4096 /dev/zero > notqcow");
  for (const char* args : {
           "",
           "--size 1G img",
           "-f qcow2",
           "-l s1",
           "--image-opts",
           "img img",
           "--size -1",
           "--size 1x",
           "--size 8E",
           "--size ''",
           "--output=xml img",
           "-O foo img",
           "-O vmdk --size 1G",
           "-O qcow --size 1G",
           "-O qcow2 -o foo=1 --size 1",
           "-O qcow2 -o help --size 1",
           "-O qcow2 -o cluster_size=1000 --size 1",
           "-O qcow2 -o cluster_size=4M --size 1",
           "-O qcow2 -o cluster_size=abc --size 1",
           "-O qcow2 -o compat=v3 --size 1",
           "-O qcow2 -o compat=x,refcount_bits=3 --size 1",
           "-O qcow2 -o refcount_bits=3 --size 1",
           "-O qcow2 -o refcount_bits=128 --size 1",
           "-O qcow2 -o compat=0.10,refcount_bits=8 --size 1",
           "-O qcow2 -o extended_l2=on,cluster_size=4k --size 1",
           "-O qcow2 -o extended_l2=maybe --size 1",
           "-O qcow2 -o preallocation=bogus --size 1",
           "-O qcow2 -o ,, --size 1",
           "-O qcow2 -l nosuch img",
           "-O qcow2 -l snapshot.foo=1 img",
           "-O qcow2 missing.qcow2",
           "-O qcow2 -o cluster_size=99999999999999999999 --size 1",
           "-O qcow2 --image-opts -f qcow2 img",
           "-O qcow2 --image-opts driver=qcow2,file.filename=missing",
       }) {
    MeasureBoth(dir, args);
  }
  // An unknown option or a missing value: qemu-img measure prints its whole
  // help and exits 0 (its getopt string lacks the ':' of the other
  // commands); dmcow-img names the option and fails, as its other commands do.
  SplitResult bogus = Ours(dir, "measure --bogus img");
  CHECK(bogus.rc == 1);
  CHECK(bogus.err == "dmcow-img: unrecognized option '--bogus'\nTry 'dmcow-img --help' for more information\n");
  SplitResult no_size = Ours(dir, "measure --size");
  CHECK(no_size.rc == 1);
  CHECK(no_size.err ==
        "dmcow-img: missing argument for option '--size'\nTry 'dmcow-img --help' for more information\n");
  // Not a qcow2 image though -f says so: dmcow-img's own words for why.
  SplitResult not_qcow2 = Ours(dir, "measure -O qcow2 -f qcow2 notqcow");
  CHECK(not_qcow2.rc == 1);
  CHECK(not_qcow2.out.empty());
  CHECK(not_qcow2.err.find("not a qcow2 image") != std::string::npos);
}

TEST_CASE("required size bounds what convert writes, with either tool", "[measure][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Made& made : kMade) {
    MustRun("cd '" + dir.path() + "' && rm -f img base mid r && (" + made.make + ") >/dev/null");
    for (const char* options : {"", "-o cluster_size=512", "-o cluster_size=2M,refcount_bits=64", "-o compat=0.10"}) {
      INFO(made.name << ", convert -O qcow2 " << options);
      SplitResult m = Ours(dir, std::string("measure -O qcow2 ") + options + " img");
      REQUIRE(m.rc == 0);
      const uint64_t required = Figure(m.out, "required size");
      for (const std::string& tool : {std::string("qemu-img"), Ours()}) {
        MustRun("cd '" + dir.path() + "' && rm -f out && " + tool + " convert -O qcow2 " + options + " img out");
        INFO(tool << " wrote " << FileBytes(dir / "out") << " bytes, measure said " << required);
        CHECK(FileBytes(dir / "out") <= required);
      }
    }
  }
}
