// dmcow-img commit against the real qemu-img commit 7.2.
//
// Each case builds the same chain twice with qemu-img and qemu-io (seeded
// pattern writes, zero writes, discards, compressed writes), runs
// `qemu-img commit` on one copy and `dmcow-img commit` on the other with the
// same options, and asserts:
//   - the same exit status and the same stdout;
//   - qemu-img compare finds every image of the two chains identical (the
//     base that was written, the top, and any layer in between);
//   - qemu-img check finds no error and no leak in every qcow2 image of ours;
//   - an emptied top allocates nothing (qemu-img map shows no cluster of its
//     own, check counts no allocated cluster), and internal snapshots of it
//     keep their content.
// Errors: the same exit status and stdout, one line on stderr for ours.
// Where we knowingly differ (qcow v1 overlays cannot be emptied yet), the
// case says so and checks our clear refusal instead.
// Skipped with a warning when qemu-img is not installed.
#include <algorithm>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;
using nlohmann::json;

namespace {

// Two copies of one chain: qemu-img works on q, dmcow-img on d.
class Sides {
 public:
  Sides() { MustRun("mkdir -p '" + q() + "' '" + d() + "' '" + logs() + "'"); }
  std::string q() const { return tmp_ / "qemu"; }
  std::string d() const { return tmp_ / "ours"; }
  std::string logs() const { return tmp_ / "logs"; }

  // Runs each command of `script` in both directories.
  void Build(const std::vector<std::string>& script) {
    for (const std::string& cmd : script) {
      MustRun("cd '" + q() + "' && " + cmd);
      MustRun("cd '" + d() + "' && " + cmd);
    }
  }

  SplitResult Exec(const std::string& dir, const std::string& command) {
    return dmcow_test::Exec(dir, logs(), command);
  }

  // qemu-img commit ARGS in q, dmcow-img commit ARGS in d (after `pre`, a
  // shell prefix such as "cd sub && "); same status and stdout.
  SplitResult Commit(const std::string& args, const std::string& pre = "") {
    SplitResult theirs = Exec(q(), pre + "qemu-img commit " + args);
    SplitResult ours = Exec(d(), pre + "'" + kDmcowImg + "' commit " + args);
    INFO("args: " << args << "\nqemu-img: rc " << theirs.rc << " out [" << theirs.out << "] err [" << theirs.err
                  << "]\ndmcow-img: rc " << ours.rc << " out [" << ours.out << "] err [" << ours.err << "]");
    CHECK(ours.rc == theirs.rc);
    CHECK(ours.out == theirs.out);
    if (ours.rc != 0) {  // as many lines as qemu-img's: one, or its usage hint / two-line message
      auto lines = [](const std::string& t) { return std::count(t.begin(), t.end(), '\n'); };
      CHECK(!ours.err.empty());
      CHECK(lines(ours.err) == lines(theirs.err));
    }
    return ours;
  }

  // qemu-img compare of the two copies of `image`.
  void ExpectSame(const std::string& image) {
    std::string out;
    int rc = Run("qemu-img compare '" + q() + "/" + image + "' '" + d() + "/" + image + "'", &out);
    INFO("image " << image << ": " << out);
    CHECK(rc == 0);
  }

  json CheckJson(const std::string& image) {
    std::string out;
    Run("qemu-img check --output=json '" + d() + "/" + image + "' 2>/dev/null", &out);
    json j = json::parse(out, nullptr, false);
    INFO("check " << image << ": " << out);
    REQUIRE(j.is_object());
    return j;
  }

  // qemu-img check of our copy: no error, no leak.
  void ExpectClean(const std::string& image) {
    json j = CheckJson(image);
    INFO("check " << image << ": " << j.dump());
    CHECK(j.value("check-errors", -1) == 0);
    CHECK(j.value("corruptions", 0) == 0);
    CHECK(j.value("leaks", 0) == 0);
  }

  // Our copy of `image` holds nothing of its own: every range reads from below.
  void ExpectEmptied(const std::string& image) {
    std::string out;
    REQUIRE(Run("qemu-img map --output=json '" + d() + "/" + image + "' 2>/dev/null", &out) == 0);
    json map = json::parse(out, nullptr, false);
    REQUIRE(map.is_array());
    for (const json& e : map) {
      INFO("map entry " << e.dump());
      CHECK(!(e.value("depth", -1) == 0 && e.value("present", false)));
    }
    json j = CheckJson(image);
    CHECK(j.value("allocated-clusters", 0) == 0);
  }

  // The content of internal snapshot `snap` of `image` is equal in both copies.
  void ExpectSameSnapshot(const std::string& image, const std::string& snap) {
    for (const std::string& dir : {q(), d()}) {
      MustRun("cd '" + dir + "' && qemu-img convert -l '" + snap + "' -O raw " + image + " snap-" + snap + ".raw");
    }
    std::string out;
    int rc = Run("cmp '" + q() + "/snap-" + snap + ".raw' '" + d() + "/snap-" + snap + ".raw'", &out);
    INFO("snapshot " << snap << " of " << image << ": " << out);
    CHECK(rc == 0);
  }

 private:
  TempDir tmp_;
};

bool Skip() {
  if (HaveQemuImg()) return false;
  NoteSkipped("qemu-img/qemu-io not installed");
  return true;
}

// A seeded scatter of pattern writes, zero writes and discards over a disk of
// `size` MiB, as qemu-io -c arguments; `seed` picks the pattern.
std::string Scatter(unsigned seed, int size_mib, bool zeros = true) {
  std::mt19937_64 rng(seed);
  std::string cmds;
  const uint64_t size = uint64_t(size_mib) << 20;
  for (int i = 0; i < 24; i++) {
    // Sector-aligned offsets and lengths, some cluster-sized, some not.
    uint64_t len = (1 + rng() % 256) * 512;
    if (rng() % 3 == 0) len = uint64_t(64) << 10;
    uint64_t off = (rng() % ((size - len) / 512)) * 512;
    int kind = static_cast<int>(rng() % 6);
    if (zeros && kind == 0) {
      cmds += " -c 'write -z " + std::to_string(off) + " " + std::to_string(len) + "'";
    } else if (zeros && kind == 1) {
      cmds += " -c 'discard " + std::to_string(off) + " " + std::to_string(len) + "'";
    } else {
      cmds += " -c 'write -P " + std::to_string(1 + rng() % 250) + " " + std::to_string(off) + " " +
              std::to_string(len) + "'";
    }
  }
  return cmds;
}

const std::string kQemuIo = "qemu-io";

}  // namespace

TEST_CASE("commit: raw base <- qcow2") {
  if (Skip()) return;
  Sides s;
  s.Build({"qemu-img create -q -f raw base.raw 8M", "qemu-io -f raw -c 'write -P 0x11 0 8M' base.raw",
           "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2",
           "qemu-io -c 'write -z 1M 128k' -c 'write -z 3000 5000'" + Scatter(1, 8) + " top.qcow2"});
  s.Commit("top.qcow2");
  s.ExpectSame("base.raw");
  s.ExpectSame("top.qcow2");
  s.ExpectClean("top.qcow2");
  s.ExpectEmptied("top.qcow2");
}

// Zero clusters committed into a preallocated raw base that holds data: the
// base reads zeros there, and its blocks there are given back as qemu-img
// gives them back (measured: qemu-img 7.2 leaves 8 of the 16 MiB).
TEST_CASE("commit: zero clusters into a preallocated raw base, allocated as qemu-img leaves it") {
  if (Skip()) return;
  TempDir dir;
  for (const char* side : {"ours", "theirs"}) {
    MustRun("cd '" + dir.path() + "' && mkdir " + side + " && cd " + side +
            " && qemu-img create -q -f raw -o preallocation=falloc base.raw 16M"
            " && qemu-io -f raw -c 'write -P 0x11 0 16M' base.raw >/dev/null"
            " && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2"
            " && qemu-io -c 'write -z 0 8M' top.qcow2 >/dev/null");
  }
  REQUIRE(Run("cd '" + dir.path() + "/ours' && " + Ours() + " commit -q top.qcow2") == 0);
  REQUIRE(Run("cd '" + dir.path() + "/theirs' && qemu-img commit -q top.qcow2") == 0);
  uint64_t allocated[2] = {0, 0};
  int i = 0;
  for (const char* side : {"ours", "theirs"}) {
    INFO(side);
    std::string out;
    CHECK(Run("cd '" + dir.path() + "/" + side + "' && sync base.raw && qemu-io -f raw -c 'read -P 0 0 8M' -c " +
                  "'read -P 0x11 8M 8M' base.raw",
              &out) == 0);
    CHECK(out.find("failed") == std::string::npos);
    REQUIRE(Run("du -k '" + dir.path() + "/" + side + "/base.raw' | cut -f1", &out) == 0);
    allocated[i++] = std::stoull(out);
  }
  CHECK(allocated[0] == allocated[1]);
  CHECK(allocated[0] >= 8 * 1024);  // the 0x11 half stays
}

TEST_CASE("commit: qcow2 base <- qcow2, v2 and v3, zero clusters, compressed base") {
  if (Skip()) return;
  for (const char* compat : {"0.10", "1.1"}) {
    DYNAMIC_SECTION("compat=" << compat) {
      Sides s;
      const std::string o = std::string("-o compat=") + compat;
      s.Build({"qemu-img create -q -f qcow2 " + o + " base.qcow2 16M",
               "qemu-io -c 'write -P 0x11 0 4M' -c 'write -c -P 0x12 4M 2M' -c 'write -c -P 0x13 8M 64k'"
               " -c 'write -z 10M 1M' base.qcow2",
               "qemu-img create -q -f qcow2 " + o + " -b base.qcow2 -F qcow2 top.qcow2",
               // Zero clusters over data, over compressed clusters, and data over zeros.
               "qemu-io -c 'write -z 1M 256k' -c 'write -z 4M 128k' -c 'write -P 0x21 10M 64k'"
               " -c 'write -z 8M 64k' -c 'discard 2M 64k'" +
                   Scatter(2, 16) + " top.qcow2"});
      s.Commit("top.qcow2");
      s.ExpectSame("base.qcow2");
      s.ExpectSame("top.qcow2");
      s.ExpectClean("base.qcow2");
      s.ExpectClean("top.qcow2");
      s.ExpectEmptied("top.qcow2");
    }
  }
}

TEST_CASE("commit: cluster sizes 512 B and 2 MiB, extended L2") {
  if (Skip()) return;
  struct Shape {
    const char* base_opts;
    const char* top_opts;
  };
  const Shape shapes[] = {
      {"cluster_size=512", "cluster_size=512"}, {"cluster_size=2M", "cluster_size=2M"},
      {"cluster_size=2M", "cluster_size=512"},  {"cluster_size=512", "cluster_size=2M"},
      {"extended_l2=on", "extended_l2=on"},     {"extended_l2=on,cluster_size=2M", "extended_l2=on,cluster_size=128k"},
  };
  int seed = 10;
  for (const Shape& sh : shapes) {
    seed++;
    DYNAMIC_SECTION("base " << sh.base_opts << ", top " << sh.top_opts) {
      Sides s;
      s.Build({std::string("qemu-img create -q -f qcow2 -o ") + sh.base_opts + " base.qcow2 12M",
               // Compressed clusters first: qemu-io compresses only into unallocated ones.
               // (a whole cluster of 2 MiB ones; fewer of the small ones, which qemu-io writes slowly).
               std::string("qemu-io -c 'write -c -P 0x31 6M ") +
                   (std::string(sh.base_opts).find("2M") != std::string::npos ? "2M'" : "256k'") +
                   Scatter(seed, 12, false) + " base.qcow2",
               std::string("qemu-img create -q -f qcow2 -o ") + sh.top_opts + " -b base.qcow2 -F qcow2 top.qcow2",
               kQemuIo + Scatter(seed + 100, 12) + " top.qcow2"});
      s.Commit("top.qcow2");
      s.ExpectSame("base.qcow2");
      s.ExpectSame("top.qcow2");
      s.ExpectClean("base.qcow2");
      s.ExpectClean("top.qcow2");
      s.ExpectEmptied("top.qcow2");
    }
  }
}

TEST_CASE("commit: depth-3 chain, -b to the bottom, and the default (immediate backing)") {
  if (Skip()) return;
  const std::vector<std::string> chain = {"qemu-img create -q -f qcow2 base.qcow2 8M",
                                          "qemu-io -c 'write -P 0x11 0 8M' base.qcow2",
                                          "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2",
                                          kQemuIo + Scatter(20, 8) + " mid.qcow2",
                                          "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
                                          kQemuIo + Scatter(21, 8) + " top.qcow2"};
  SECTION("-b base.qcow2 (implies -d)") {
    Sides s;
    s.Build(chain);
    s.Commit("-b base.qcow2 top.qcow2");
    for (const char* image : {"base.qcow2", "mid.qcow2", "top.qcow2"}) {
      s.ExpectSame(image);
      s.ExpectClean(image);
    }
  }
  SECTION("-b with an absolute name") {
    Sides s;
    s.Build(chain);
    s.Commit("-b \"$PWD/base.qcow2\" top.qcow2");  // $PWD: each side's own directory
    for (const char* image : {"base.qcow2", "mid.qcow2", "top.qcow2"}) s.ExpectSame(image);
  }
  SECTION("default: into mid") {
    Sides s;
    s.Build(chain);
    s.Commit("top.qcow2");
    for (const char* image : {"base.qcow2", "mid.qcow2", "top.qcow2"}) {
      s.ExpectSame(image);
      s.ExpectClean(image);
    }
    s.ExpectEmptied("top.qcow2");
  }
  SECTION("-b mid.qcow2, then -b named relative to the image, not to the working directory") {
    Sides s;
    s.Build(chain);
    s.Build({"mkdir cwd"});
    s.Commit("-b mid.qcow2 top.qcow2");
    s.Commit("-b base.qcow2 ../mid.qcow2", "cd cwd && ");
    s.Commit("-b cwd/../base.qcow2 top.qcow2");  // not a name of the chain, but the same file
    for (const char* image : {"base.qcow2", "mid.qcow2", "top.qcow2"}) {
      s.ExpectSame(image);
      s.ExpectClean(image);
    }
  }
}

TEST_CASE("commit: -d leaves the top as it was") {
  if (Skip()) return;
  Sides s;
  s.Build({"qemu-img create -q -f qcow2 base.qcow2 8M", "qemu-io -c 'write -P 0x11 0 8M' base.qcow2",
           "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2", kQemuIo + Scatter(30, 8) + " top.qcow2",
           "cp top.qcow2 top-before.qcow2"});
  s.Commit("-d top.qcow2");
  s.ExpectSame("base.qcow2");
  s.ExpectSame("top.qcow2");
  s.ExpectClean("base.qcow2");
  s.ExpectClean("top.qcow2");
  MustRun("cmp '" + s.d() + "/top.qcow2' '" + s.d() + "/top-before.qcow2'");
}

TEST_CASE("commit: a shorter base is grown") {
  if (Skip()) return;
  SECTION("qcow2 base, 512 B clusters (the L1 table grows)") {
    Sides s;
    s.Build({"qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 1M",
             "qemu-io -c 'write -P 0x11 0 1M' base.qcow2",
             "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 5M",
             "qemu-io -c 'write -P 0x22 3M 512' -c 'write -P 0x23 960k 128k' -c 'write -z 4M 64k' top.qcow2"});
    s.Commit("top.qcow2");
    s.ExpectSame("base.qcow2");
    s.ExpectSame("top.qcow2");
    s.ExpectClean("base.qcow2");
    s.ExpectClean("top.qcow2");
    s.ExpectEmptied("top.qcow2");
    MustRun("qemu-img info '" + s.d() + "/base.qcow2' | grep -q '(5242880 bytes)'");
  }
  SECTION("a shorter qcow2 base over a longer backing file: the grown range reads as zeros") {
    Sides s;
    s.Build({"qemu-img create -q -f qcow2 bottom.qcow2 4M", "qemu-io -c 'write -P 0x11 0 4M' bottom.qcow2",
             "qemu-img create -q -f qcow2 -b bottom.qcow2 -F qcow2 base.qcow2 1M",
             "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M",
             "qemu-io -c 'write -P 0x22 2M 512' top.qcow2"});
    s.Commit("top.qcow2");
    s.ExpectSame("base.qcow2");
    s.ExpectSame("top.qcow2");
    s.ExpectClean("base.qcow2");
    s.ExpectClean("top.qcow2");
  }
  SECTION("raw base of an odd size") {
    Sides s;
    s.Build({"qemu-img create -q -f raw base.raw 1000", "qemu-io -f raw -c 'write -P 0x11 0 512' base.raw",
             "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 3M",
             "qemu-io -c 'write -P 0x22 2M 512' -c 'write -P 0x23 256 1024' top.qcow2"});
    s.Commit("top.qcow2");
    s.ExpectSame("base.raw");
    s.ExpectSame("top.qcow2");
    s.ExpectClean("top.qcow2");
    MustRun("cmp '" + s.q() + "/base.raw' '" + s.d() + "/base.raw'");
  }
  SECTION("an intermediate layer shorter than the top: zeros past its end are committed") {
    Sides s;
    s.Build({"qemu-img create -q -f qcow2 base.qcow2 4M", "qemu-io -c 'write -P 0x11 0 4M' base.qcow2",
             "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 2M",
             "qemu-io -c 'write -P 0x33 1M 100k' mid.qcow2",
             "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M",
             "qemu-io -c 'write -P 0x22 0 512' -c 'write -z 1050k 10k' top.qcow2"});
    s.Commit("-b base.qcow2 top.qcow2");
    s.ExpectSame("base.qcow2");
    s.ExpectClean("base.qcow2");
  }
}

TEST_CASE("commit: an overlay with an internal snapshot") {
  if (Skip()) return;
  Sides s;
  s.Build({"qemu-img create -q -f qcow2 base.qcow2 8M", "qemu-io -c 'write -P 0x11 0 8M' base.qcow2",
           "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2", kQemuIo + Scatter(40, 8) + " top.qcow2",
           "qemu-img snapshot -c s1 top.qcow2", kQemuIo + Scatter(41, 8) + " top.qcow2"});
  s.Commit("top.qcow2");
  s.ExpectSame("base.qcow2");
  s.ExpectSame("top.qcow2");
  s.ExpectClean("base.qcow2");
  s.ExpectClean("top.qcow2");
  s.ExpectEmptied("top.qcow2");
  s.ExpectSameSnapshot("top.qcow2", "s1");
}

TEST_CASE("commit: -q, -p, -t, -f") {
  if (Skip()) return;
  const std::vector<std::string> chain = {"qemu-img create -q -f qcow2 base.qcow2 4M",
                                          "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
                                          kQemuIo + Scatter(50, 4) + " top.qcow2"};
  for (const char* args : {"-q top.qcow2", "-t none -f qcow2 top.qcow2", "-t unsafe -r 1M -d top.qcow2"}) {
    DYNAMIC_SECTION(args) {
      Sides s;
      s.Build(chain);
      s.Commit(args);
      s.ExpectSame("base.qcow2");
      s.ExpectSame("top.qcow2");
      s.ExpectClean("base.qcow2");
    }
  }
  SECTION("-p: the progress line, then the message") {
    Sides s;
    s.Build(chain);
    // qemu-img prints 0% once per poll of its job: the count varies, so only
    // the shape is compared.
    SplitResult theirs = s.Exec(s.q(), "qemu-img commit -p top.qcow2");
    SplitResult ours = s.Exec(s.d(), std::string("'") + kDmcowImg + "' commit -p top.qcow2");
    const std::string start = "    (0.00/100%)\r";
    const std::string end = "    (100.00/100%)\r\nImage committed.\n";
    for (const SplitResult* o : {&theirs, &ours}) {
      INFO("output [" << o->out << "]");
      CHECK(o->rc == 0);
      CHECK(o->out.rfind(start, 0) == 0);
      CHECK(o->out.size() >= end.size());
      CHECK(o->out.compare(o->out.size() - end.size(), end.size(), end) == 0);
    }
    s.ExpectSame("base.qcow2");
  }
}

TEST_CASE("commit: errors") {
  if (Skip()) return;
  Sides s;
  s.Build({"qemu-img create -q -f qcow2 alone.qcow2 1M", "qemu-img create -q -f qcow2 base.qcow2 1M",
           "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2", "qemu-img create -q -f qcow2 other.qcow2 1M",
           "qemu-io -c 'write -P 0x22 0 64k' top.qcow2"});
  for (const char* args :
       {"alone.qcow2", "-p alone.qcow2", "-b other.qcow2 top.qcow2", "-b top.qcow2 top.qcow2",
        "-b nonexistent top.qcow2", "-p -b nope top.qcow2", "nonexistent.qcow2", "-p nonexistent.qcow2",
        "-f raw top.qcow2", "-t bogus top.qcow2", "-r abc top.qcow2", "", "top.qcow2 alone.qcow2"}) {
    DYNAMIC_SECTION("commit " << args) {
      SplitResult o = s.Commit(args);
      CHECK(o.rc == 1);
    }
  }
  // Nothing was written by the failures.
  s.ExpectSame("top.qcow2");
  s.ExpectSame("base.qcow2");
}

TEST_CASE("commit: qcow (v1) layers") {
  if (Skip()) return;
  const std::vector<std::string> chain = {"qemu-img create -q -f qcow2 base.qcow2 4M",
                                          "qemu-io -c 'write -P 0x11 0 4M' base.qcow2",
                                          "qemu-img create -q -f qcow -b base.qcow2 -F qcow2 top.qcow",
                                          // qemu-io syncs each qcow cluster: a short write
                                          "qemu-io -c 'write -P 0x22 500k 64k' top.qcow"};
  SECTION("-d: the overlay is only read, as qemu-img") {
    Sides s;
    s.Build(chain);
    s.Commit("-d top.qcow");
    s.ExpectSame("base.qcow2");
    s.ExpectSame("top.qcow");
    s.ExpectClean("base.qcow2");
  }
  SECTION("a qcow overlay is committed and emptied, as by qemu-img") {
    Sides s;
    s.Build(chain);
    s.Commit("top.qcow");
    s.ExpectSame("base.qcow2");
    s.ExpectSame("top.qcow");
    s.ExpectClean("base.qcow2");
    // Emptied as QEMU empties it: L1 zeroed, file cut after it.
    CHECK(ReadWholeFile(s.d() + "/top.qcow") == ReadWholeFile(s.q() + "/top.qcow"));
  }
  SECTION("committing into a qcow base") {
    Sides s;
    s.Build({"qemu-img create -q -f qcow base.qcow 4M", "qemu-io -c 'write -P 0x11 0 4M' base.qcow",
             "qemu-img create -q -f qcow2 -b base.qcow -F qcow top.qcow2",
             "qemu-io -c 'write -P 0x22 0 64k' top.qcow2"});
    s.Commit("top.qcow2");
    s.ExpectSame("base.qcow");
    s.ExpectSame("top.qcow2");
    s.ExpectClean("top.qcow2");
  }
}

// A lazy-refcounts base that a killed QEMU left dirty (its refcounts were
// never written back). qemu-img commit 7.2 opens the base read-only and
// reopens it read-write for the commit without repairing it, so its new
// clusters are allocated over ones still in use: afterwards qemu-img check
// finds clusters referenced twice. dmcow-img commit repairs the base first
// (as a writable open of a dirty image does) and leaves it clean, holding
// what the chain held.
TEST_CASE("commit: into a dirty lazy-refcounts base left by a killed QEMU") {
  if (Skip()) return;
  Sides s;
  s.Build({"qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4096 base.qcow2 1M",
           "ulimit -c 0; qemu-io -c 'write -P 0x11 0 64k' -c 'sigraise 9' base.qcow2 >/dev/null 2>&1; true",
           "qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top.qcow2",
           "qemu-io -c 'write -P 0x22 128k 64k' -c 'write -P 0x23 32k 8k' top.qcow2",
           "qemu-img convert -O raw top.qcow2 chain.raw"});
  // qemu-img check's counts (its findings on stderr dropped).
  auto check = [](const std::string& path) {
    std::string out;
    Run("{ qemu-img check --output=json '" + path + "' 2>/dev/null; }", &out);
    INFO("qemu-img check " << path << ": " << out);
    json j = json::parse(out, nullptr, false);
    REQUIRE(j.is_object());
    return j;
  };
  // The crash really left the base dirty, with refcounts that lag the tables.
  REQUIRE(check(s.d() + "/base.qcow2").value("corruptions", 0) > 0);

  s.Commit("top.qcow2");
  // Ours: a clean base holding the chain's content.
  s.ExpectClean("base.qcow2");
  std::string out;
  CHECK(Run("qemu-img compare '" + s.d() + "/chain.raw' '" + s.d() + "/base.qcow2'", &out) == 0);
  // QEMU's: corrupt (clusters referenced twice).
  CHECK(check(s.q() + "/base.qcow2").value("corruptions", 0) > 0);
}
