// --object, as qemu-img 7.2 reads it: every --object value through
// dmcow-img and qemu-img, on a command parsed by CLI11 (info) and one parsed
// by getopt (measure), with the same exit code, output and message; secrets
// inline, from a file, base64, and encrypted under another secret (keyid,
// iv; the ciphertexts below are `openssl enc -aes-256-cbc` of "hunter2" and,
// unpadded, of "abcdefghijklmnop", under the key and IV given).
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

const std::string kKey = "--object secret,id=k,data=0123456789abcdef0123456789abcdef ";
const std::string kIv = ",iv=YWJjZGVmZ2hpamtsbW5vcA==";
const std::string kCipher = "secret,id=s1,format=base64,data=xCK+5d5LJkVd7dOBR+jdNA==,keyid=k";

// Each is the --object part of a command line (quoted for the shell).
const std::vector<std::string> kObjects = {
    // Accepted.
    "--object secret,id=s0,data=abc",
    "--object secret,id=s0,file=pw.txt",
    "--object secret,id=s0,file=pw.txt,format=base64",
    "--object secret,id=s0,data=YWJj,format=base64",
    "--object secret,id=s0,data=YQ,format=base64",
    "--object secret,id=s0,data=,format=base64",
    "--object qom-type=secret,id=s0,data=a",
    "--object 'secret,id=s0,data=a,,b'",
    "--object secret,id=s0,data=a,",
    "--object secret,id=s0,data=a,id=s1",
    "--object secret,id=s0,data=a,format=raw,format=base64",
    "--object secret,id=s0,data=a,iv=xx",
    "--object secret,id=a_b.c-d,data=a",
    "--object '{\"qom-type\":\"secret\",\"id\":\"s0\",\"data\":\"a\"}'",
    "--object secret,id=s0,data=a --object secret,id=s1,data=b",
    kKey + "--object " + kCipher + kIv,
    "--object secret,id=s0,file=/dev/null",
    // Refused, each with qemu-img's words.
    "--object secret",
    "--object ''",
    "--object id=s0",
    "--object secret,data=a",
    "--object secret,id=s0",
    "--object secret,id=s0,data=a,file=pw.txt",
    "--object secret,id=s0,file=/nonexistent",
    "--object secret,id=s0,file=.",
    "--object secret,id=s0,data=a,format=hex",
    "--object secret,id=s0,format=hex,foo=1",
    "--object secret,id=s0,data=a,foo=1",
    "--object secret,id=s0,a.b=1",
    "--object secret,id=s0,data=a,loaded=on",
    "--object secret,id=s0,foo=1,loaded=on",
    "--object foo,id=x",
    "--object Secret,id=s0,data=a",
    "--object secret,id=0bad,data=a",
    "--object secret,id=,data=a",
    "--object 'secret,id=\xc3\xa9,data=a'",
    "--object secret,id=0bad,foo=1,format=hex",
    "--object secret,id=s0,data=a,keyid=k",
    "--object secret,id=s0,data=a,keyid=",
    "--object secret,id=s0,data=a,keyid=s0",
    "--object 'secret,,id=s0,data=a'",
    "--object secret,id=s0,data,x",
    "--object secret,id=s0,=a",
    "--object 'secret,id=s0,data=a!b,format=base64'",
    "--object '{\"qom-type\":\"secret\",\"id\":\"s0\"}'",
    "--object '{\"qom-type\":\"secret\",\"id\":\"s0\",\"data\":1}'",
    "--object '{\"qom-type\":\"secret\",\"id\":\"s0\",\"data\":\"a\",\"x\":\"y\"}'",
    "--object '{\"qom-type\":\"secret\",\"id\":\"s0\",\"data\":\"a\",\"loaded\":true}'",
    "--object '{}'",
    "--object '[1]'",
    "--object secret,id=s0,data=a --object secret,id=s0,data=b",
    kKey + "--object " + kCipher,
    kKey + "--object " + kCipher + ",iv=YWJj",
    kKey + "--object secret,id=s1,data=xCK+5d5LJkVd7dOBR+jdNA==,keyid=k" + kIv,
    kKey + "--object secret,id=s1,format=base64,data=fb2IJy+yWTdpKjuBAEdBdQ==,keyid=k" + kIv,
    kKey + "--object secret,id=s1,format=base64,data=YWJj,keyid=k" + kIv,
    kKey + "--object " + kCipher + ",iv='a!'",
    "--object secret,id=k,data=short --object " + kCipher + kIv,
    // A bad object is reported where it stands, before what follows it.
    "--object secret,id=s0 --object foo",
};

}  // namespace

TEST_CASE("--object: secrets and every refusal as qemu-img, on getopt and CLI11 commands", "[object][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 img 1M && printf hunter2 > pw.txt && mkdir logs");
  for (const std::string& objects : kObjects) {
    for (const char* command : {"info", "measure -O qcow2"}) {
      DYNAMIC_SECTION(command << " " << objects) {
        SplitResult theirs =
            Exec(dir.path(), dir.path() + "/logs", std::string("qemu-img ") + command + " " + objects + " img");
        SplitResult ours = Exec(dir.path(), dir.path() + "/logs", Ours() + " " + command + " " + objects + " img");
        CheckSameAsQemu(theirs, ours);
      }
    }
  }
}

// Where dmcow-img says otherwise (README): QEMU's other object types are
// named as not supported; JSON syntax errors get our parser's words; help
// lists what dmcow-img has.
TEST_CASE("--object: QEMU's other types, JSON errors and help", "[object][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 img 1M");
  SplitResult r = Ours(dir, "info --object authz-simple,id=a1,identity=x img");
  CHECK(r.rc == 1);
  CHECK(r.err == "dmcow-img: Object type 'authz-simple' is not supported by dmcow-img\n");
  r = Ours(dir, "info --object '{\"qom-type\":\"secret\"' img");
  CHECK(r.rc == 1);
  CHECK(r.err.rfind("dmcow-img: JSON parse error, ", 0) == 0);
  r = Ours(dir, "info --object help img");
  CHECK(r.rc == 0);
  CHECK(r.out == "List of user creatable objects:\n  secret\n");
  r = Ours(dir, "measure --object secret,help img");
  CHECK(r.rc == 0);
  CHECK(r.out == Exec(dir.path(), "qemu-img measure --object secret,help img").out);
}
