// nbdkit-dmcow-plugin against the real NBD clients: qemu-img and qemu-io
// (QEMU's NBD client) and nbdinfo (libnbd). Reads of every fixture image
// equal qemu-img's reads of the file and block status agrees with its map;
// writes over NBD (one connection and two at once) leave an image qemu-img
// checks clean and compares equal to a raw copy given the same writes; a
// SIGKILL mid-write loses nothing flushed and corrupts nothing; bad
// parameters and images that must not be served are refused, before
// serving, with a message and nothing changed.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;
using json = nlohmann::json;

namespace {

// nbdkit serving `params` with the plugin of this build on a fresh Unix
// socket, running `run` (sh, with $uri set) and exiting after it. Under the
// sanitizer build the plugin needs ASan's runtime first in the process.
std::string Serve(const std::string& params, std::string run) {
  std::string env;
#ifdef DMCOW_NBDKIT_PRELOAD
  // nbdkit only: the clients it runs (QEMU) would hang with ASan in them.
  env = "LD_PRELOAD=" DMCOW_NBDKIT_PRELOAD " ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 ";
  run = "unset LD_PRELOAD ASAN_OPTIONS; " + run;
#endif
  std::string quoted;
  for (char c : run) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return env + "timeout 120 nbdkit -U - " DMCOW_NBDKIT_PLUGIN " " + params + " --run '" + quoted + "'";
}

struct Run3 {
  int rc;
  std::string out;  // stdout and stderr
};

Run3 InDir(const std::string& dir, const std::string& command) {
  std::string out;
  const int rc = Run("cd '" + dir + "' && " + command, &out);
  return {rc, out};
}

// A map as (start, length, data, zero) runs, adjacent equal runs merged:
// what NBD block status can say (no depth, no offset).
using Runs = std::vector<std::array<uint64_t, 4>>;

void Append(Runs* runs, uint64_t start, uint64_t length, bool data, bool zero) {
  if (!runs->empty() && runs->back()[2] == data && runs->back()[3] == zero &&
      runs->back()[0] + runs->back()[1] == start) {
    runs->back()[1] += length;
    return;
  }
  runs->push_back({start, length, data, zero});
}

Runs FromQemuMap(const std::string& text) {
  Runs runs;
  const json map = json::parse(text, nullptr, false);
  if (!map.is_array()) return {{0, 0, 9, 9}};  // never equal to a real map
  for (const json& e : map) {
    Append(&runs, e["start"], e["length"], e["data"].get<bool>(), e["zero"].get<bool>());
  }
  return runs;
}

// nbdinfo --map: "OFFSET LENGTH TYPE DESCRIPTION" (type bit 0 hole, bit 1 zero).
Runs FromNbdinfoMap(const std::string& text) {
  Runs runs;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    uint64_t start = 0, length = 0, type = 0;
    if (!(fields >> start >> length >> type)) return {{0, 0, 9, 9}};
    Append(&runs, start, length, !(type & 1), type & 2);
  }
  return runs;
}

std::string FixturesDir() { return SourceDir() + "/fixtures"; }

}  // namespace

TEST_CASE("nbdkit: every fixture image reads over NBD as qemu-img reads the file", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  std::ifstream in(FixturesDir() + "/manifest.json");
  const json manifest = json::parse(in, nullptr, false);
  REQUIRE(manifest.is_array());
  for (const json& e : manifest) {
    if (e["role"] != "image" || e["expect"] != "ok") continue;
    const std::string image = FixturesDir() + "/" + e["path"].get<std::string>();
    DYNAMIC_SECTION(e["name"].get<std::string>()) {
      TempDir dir;
      const Run3 r = InDir(dir.path(), Serve("readonly=1 '" + image + "'",
                                             "qemu-img convert -f raw \"$uri\" nbd.raw && "
                                             "qemu-img map --output=json -f raw \"$uri\" > nbd.map && "
                                             "nbdinfo --map \"$uri\" > nbdinfo.map && nbdinfo \"$uri\" > info && "
                                             "qemu-img convert --image-opts "
                                             "driver=nbd,server.type=unix,server.path=\"$unixsocket\" opts.raw"));
      INFO(r.out);
      REQUIRE(r.rc == 0);
      // qemu-img run where the manifest says (data file names).
      const std::string qemu_cwd = FixturesDir() + "/" + e["qemu_cwd"].get<std::string>();
      MustRun("cd '" + qemu_cwd + "' && qemu-img convert -O raw '" + image + "' '" + (dir / "file.raw") + "' && cmp '" +
              (dir / "nbd.raw") + "' '" + (dir / "file.raw") + "' && cmp '" + (dir / "opts.raw") + "' '" +
              (dir / "file.raw") + "'");
      std::string file_map;
      REQUIRE(Run("cd '" + qemu_cwd + "' && qemu-img map --output=json '" + image + "'", &file_map) == 0);
      const Runs expected = FromQemuMap(file_map);
      CHECK(FromQemuMap(ReadText(dir / "nbd.map")) == expected);
      CHECK(FromNbdinfoMap(ReadText(dir / "nbdinfo.map")) == expected);
      CHECK(ReadText(dir / "info").find("description: " + e["format"].get<std::string>()) != std::string::npos);
    }
  }
}

namespace {

// The writes of the write test: qemu-io commands, run once over NBD on the
// image and once on a raw copy of its content.
const char* const kWrites[] = {
    "-c 'write -P 1 0 64k' -c 'write -P 2 100k 7k' -c 'write -z 1M 192k' -c 'discard 2M 128k'"
    " -c 'write -P 3 4093k 3k' -c flush -c 'write -P 4 3M 1M' -c 'write -z -u 3584k 256k'",
    // a second connection, at the same time, elsewhere
    "-c 'write -P 5 5M 512k' -c 'write -z 5632k 64k' -c 'write -P 6 6M 4k' -c 'discard 6M 64k'"
    // what a trim leaves is unspecified (raw keeps the data): written again
    " -c 'write -P 7 6M 64k'",
};

struct WriteShape {
  const char* name;
  const char* make;  // makes `img` (8 MiB) in the current directory
  const char* format;
};

const WriteShape kWriteShapes[] = {
    {"qcow2 v3", "qemu-img create -q -f qcow2 img 8M", "qcow2"},
    {"qcow2 v2, 4 KiB clusters", "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k img 8M", "qcow2"},
    {"qcow2 over a backing file, zstd compressed data",
     "qemu-img create -q -f qcow2 base 8M && qemu-io -c 'write -P 9 0 8M' base >/dev/null && "
     "qemu-img create -q -f qcow2 -o compression_type=zstd -b base -F qcow2 img && "
     "qemu-io -c 'write -c -P 8 0 1M' img >/dev/null",
     "qcow2"},
    {"qcow2 extended L2", "qemu-img create -q -f qcow2 -o extended_l2=on img 8M", "qcow2"},
    {"qcow2 with an external data file", "qemu-img create -q -f qcow2 -o data_file=img.data img 8M", "qcow2"},
    {"qcow v1", "qemu-img create -q -f qcow img 8M", "qcow"},
    {"raw", "qemu-img create -q -f raw img 8M", "raw"},
};

}  // namespace

TEST_CASE("nbdkit: writes over NBD, on one connection and two at once, land as on a raw copy", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  for (const WriteShape* shape : Sampled(kWriteShapes)) {
    DYNAMIC_SECTION(shape->name) {
      TempDir dir;
      MustRun("cd '" + dir.path() + "' && " + shape->make + " && qemu-img convert -O raw img ref.raw");
      const Run3 r = InDir(dir.path(), Serve("img", std::string("qemu-io -f raw ") + kWrites[0] +
                                                        " \"$uri\" >/dev/null && "
                                                        "(qemu-io -f raw " +
                                                        kWrites[0] + " \"$uri\" >/dev/null & qemu-io -f raw " +
                                                        kWrites[1] + " \"$uri\" >/dev/null & wait)"));
      INFO(r.out);
      REQUIRE(r.rc == 0);
      MustRun("cd '" + dir.path() + "' && qemu-io -f raw " + kWrites[0] + " " + kWrites[1] + " ref.raw >/dev/null");
      const Run3 check = InDir(dir.path(), std::string("qemu-img check -f ") + shape->format + " img");
      INFO(check.out);
      if (std::string(shape->format) == "qcow2") CHECK(check.rc == 0);  // qemu-img checks no other format
      const Run3 compare =
          InDir(dir.path(), std::string("qemu-img compare -f ") + shape->format + " -F raw img ref.raw");
      INFO(compare.out);
      CHECK(compare.rc == 0);
    }
  }
}

// Multi-conn: what one connection wrote, before any flush, another reads.
TEST_CASE("nbdkit: a write on one connection is read on another before any flush", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 img 4M");
  // The writer sleeps with its connection open (qemu-io flushes only when it
  // closes) while the reader checks the pattern.
  const Run3 r = InDir(dir.path(), Serve("img",
                                         "(qemu-io -f raw -c 'write -P 5 64k 128k' -c 'sleep 3000' \"$uri\" "
                                         ">/dev/null &) && sleep 1 && "
                                         "qemu-io -f raw -c 'read -P 5 64k 128k' -c 'read -P 0 0 64k' \"$uri\""));
  INFO(r.out);
  CHECK(r.rc == 0);
  CHECK(r.out.find("Pattern verification failed") == std::string::npos);
}

TEST_CASE("nbdkit: a SIGKILL mid-write keeps what was flushed and corrupts nothing", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 -o cluster_size=4k img 64M");
  // qemu-io flushes when it closes the connection; the second one loses
  // nbdkit (killed) half way through 48 MiB of writes.
  const Run3 r = InDir(dir.path(), Serve("-P pid img",
                                         "qemu-io -f raw -c 'write -P 1 0 8M' \"$uri\" >/dev/null && "
                                         "(qemu-io -f raw -c 'write -P 3 0 4M' -c 'write -P 2 8M 48M' \"$uri\" "
                                         ">/dev/null 2>&1 &) && sleep 0.3 && kill -9 $(cat pid)"));
  INFO(r.out);
  const Run3 check = InDir(dir.path(), "qemu-img check img");
  INFO(check.out);
  CHECK((check.rc == 0 || check.rc == 3));  // leaks at worst
  CHECK(check.out.find("ERROR") == std::string::npos);
  // The flushed 8 MiB of 1s: each sector of the first 4 MiB holds 1s, or
  // 3s where the killed writer got to; the next 4 MiB hold 1s.
  MustRun("cd '" + dir.path() +
          "' && qemu-io -c 'read -P 1 4M 4M' img >/dev/null && qemu-img convert -O raw img all.raw");
  const std::vector<uint8_t> all = ReadWholeFile(dir / "all.raw");
  REQUIRE(all.size() == 64u << 20);
  size_t torn = 0;
  for (size_t sector = 0; sector < (4u << 20) / 512; sector++) {
    const uint8_t first = all[sector * 512];
    const bool whole = std::all_of(all.begin() + sector * 512, all.begin() + (sector + 1) * 512,
                                   [first](uint8_t b) { return b == first; });
    if (!whole || (first != 1 && first != 3)) torn++;
  }
  CHECK(torn == 0);
}

TEST_CASE("nbdkit: read-only serving and snapshots write nothing", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 img 4M && qemu-io -c 'write -P 1 0 1M' img >/dev/null"
          " && qemu-img snapshot -c s1 img && qemu-io -c 'write -P 2 0 64k' img >/dev/null && cp img before");
  for (const char* params : {"readonly=1 img", "snapshot=s1 img"}) {
    INFO(params);
    // QEMU may read beside a read-only server (its read lock is shared).
    const Run3 r = InDir(dir.path(), Serve(params,
                                           "qemu-img info img >/dev/null && "
                                           "! qemu-io -f raw -c 'write -P 7 0 4k' \"$uri\" 2>err && "
                                           "grep -q 'Permission denied' err && "
                                           "qemu-img convert -f raw \"$uri\" out.raw"));
    INFO(r.out);
    CHECK(r.rc == 0);
    CHECK(Run("cd '" + dir.path() + "' && cmp img before") == 0);
  }
  MustRun("cd '" + dir.path() + "' && qemu-img convert -O raw -l s1 img s1.raw && cmp out.raw s1.raw");
}

TEST_CASE("nbdkit: bad parameters and images that must not be served are refused before serving", "[nbdkit][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 img 4M && qemu-io -c 'write -P 1 0 1M' img >/dev/null"
          " && mkfifo fifo && qemu-img create -q -f qcow2 -u -b fifo -F raw onfifo 4M"
          " && qemu-img create -q -f qcow2 -u -b loop2 -F qcow2 loop1 4M"
          " && qemu-img create -q -f qcow2 -u -b loop1 -F qcow2 loop2 4M"
          " && qemu-img create -q -f qcow2 -u -b 'json:{\"file.filename\":\"img\"}' -F qcow2 jsonname 4M"
          " && qemu-img create -q -f qcow2 -o data_file=dfile dimg 4M && rm dfile && mkfifo dfile"
          " && cp '" +
          FixturesDir() + "/images/encrypted-luks.qcow2' luks && cp img before");
  const struct {
    const char* params;
    const char* message;
  } kCases[] = {
      {"", "the image is missing"},
      {"img nosuch=1", "unknown parameter 'nosuch'"},
      {"img file=img", "given twice"},
      {"img format=vmdk", "format=vmdk: not one of qcow2, qcow, raw"},
      {"img backing=other", "only backing=null"},
      {"img readonly=maybe", "readonly"},
      {"img snapshot=", "snapshot=: the snapshot id or name is empty"},
      {"img snapshot=nosuch", "nosuch"},
      {"missing", "missing"},
      {"img format=raw readonly=1 snapshot=s", "snapshot"},
      {"onfifo", "is a FIFO: the dmcow nbdkit plugin follows only regular files"},
      {"dimg", "could not open external data file 'dfile'"},
      {"loop1", "infinite loop"},
      {"jsonname", "json:"},
      {"luks", "encrypted"},
  };
  for (const auto& c : kCases) {
    INFO(c.params);
    const Run3 r = InDir(dir.path(), Serve(c.params, "echo served"));
    INFO(r.out);
    CHECK(r.rc == 1);
    CHECK(r.out.find("served") == std::string::npos);
    CHECK(r.out.find(c.message) != std::string::npos);
  }
  // A QEMU writing the image holds its lock: refused, and the other way round.
  const Run3 locked =
      InDir(dir.path(), "(sleep 3 | qemu-io img >/dev/null 2>&1 &) && sleep 1 && " + Serve("img", "echo served"));
  INFO(locked.out);
  CHECK(locked.rc == 1);
  CHECK(locked.out.find("lock") != std::string::npos);
  MustRun("sleep 2.5");
  const Run3 held = InDir(dir.path(), Serve("img", "! qemu-io -c 'read 0 4k' img 2>err && grep -q lock err"));
  INFO(held.out);
  CHECK(held.rc == 0);
  CHECK(Run("cd '" + dir.path() + "' && cmp img before") == 0);
}
