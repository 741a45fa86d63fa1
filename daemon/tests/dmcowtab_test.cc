// /etc/dmcowtab lines (dmcowtab.h): what attach --tab makes of them, and
// every malformed line refused with the file, the line and the reason.
#include <catch2/catch.hpp>
#include <fstream>

#include "dmcowtab.h"
#include "test_util.h"

using namespace dmcow_test;
using dmcowd::TabEntry;

namespace {

std::string Table(const TempDir& dir, const std::string& text) {
  const std::string path = dir / "dmcowtab";
  std::ofstream(path) << text;
  return path;
}

// The error for NAME in a table holding `text`, or "" if it parses.
std::string ErrorFor(const std::string& text, const std::string& name = "vm0") {
  TempDir dir;
  TabEntry entry;
  const dmcow::Status s = dmcowd::FindTabEntry(Table(dir, text), name, &entry);
  return s.ok() ? "" : s.message();
}

}  // namespace

TEST_CASE("dmcowtab lines become attach's options") {
  TempDir dir;
  const std::string path = Table(dir,
                                 "# NAME IMAGE OPTIONS\n"
                                 "\n"
                                 "  vm0\t/images/vm0.qcow2   read-only,no-partitions  # the VM's disk\n"
                                 "web /srv/my\\040disk.qcow2 key-file=/etc/k,key-file=1=/etc/kb,scratch-max=2G\n"
                                 "plain /srv/plain.qcow2\n"
                                 "dash /srv/dash.qcow2 -\n"
                                 "this line is broken in ways nobody asked about\n");
  TabEntry e;
  REQUIRE(dmcowd::FindTabEntry(path, "vm0", &e).ok());
  CHECK(e.image == "/images/vm0.qcow2");
  CHECK(e.attach_args == std::vector<std::string>{"--read-only", "--no-partitions"});
  CHECK(e.line == 3);
  REQUIRE(dmcowd::FindTabEntry(path, "web", &e).ok());
  CHECK(e.image == "/srv/my disk.qcow2");
  CHECK(e.attach_args ==
        std::vector<std::string>{"--key-file", "/etc/k", "--key-file", "1=/etc/kb", "--scratch-max", "2G"});
  REQUIRE(dmcowd::FindTabEntry(path, "plain", &e).ok());
  CHECK(e.attach_args.empty());
  REQUIRE(dmcowd::FindTabEntry(path, "dash", &e).ok());
  CHECK(e.attach_args.empty());
}

TEST_CASE("malformed dmcowtab lines name the file, the line and the fault") {
  CHECK(ErrorFor("vm1 /a.qcow2\n").find("dmcowtab: no line for vm0") != std::string::npos);
  CHECK(ErrorFor("vm0\n").find("dmcowtab:1: vm0 has no image") != std::string::npos);
  CHECK(ErrorFor("vm0 a.qcow2\n").find(":1: image 'a.qcow2' is not an absolute path") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2\n\nvm0 /b.qcow2\n").find(":3: vm0 is defined twice (first on line 1)") !=
        std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 read-only extra\n").find(":1: more than three fields") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 readonly\n").find(":1: unknown option 'readonly'") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 read-only,,\n").find("unknown option ''") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 read-only=yes\n").find("option read-only takes no value") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 key-file\n").find("option key-file needs a value") != std::string::npos);
  CHECK(ErrorFor("vm0 /a.qcow2 scratch-max=\n").find("option scratch-max needs a value") != std::string::npos);
  CHECK(ErrorFor("vm0 /a\\0.qcow2\n").find("bad escape") != std::string::npos);
  CHECK(ErrorFor("vm0 /a\\000.qcow2\n").find("bad escape") != std::string::npos);
  CHECK(ErrorFor("vm0 /a\\9999\n").find("bad escape") != std::string::npos);
  CHECK(ErrorFor("vm0 /a" + std::string(5000, 'x') + "\n").find(":1: line longer than 4096 bytes") !=
        std::string::npos);
  // Options that attach itself refuses (a bad size) reach attach: its error, its exit code.
  CHECK(ErrorFor("vm0 /a.qcow2 scratch-max=lots\n").empty());
  TabEntry e;
  CHECK(dmcowd::FindTabEntry("/nonexistent/dmcowtab", "vm0", &e).message() == "/nonexistent/dmcowtab: cannot be read");
}
