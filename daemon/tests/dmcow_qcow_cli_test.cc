// Bad command lines and images refused by dmcow-qcow and by dmcowd's qcow2
// plugin before anything is created: exit codes and messages. These run on
// the host (they fail before device-mapper or the kernel module are needed);
// the VM tests (tests/vm/qcow_test.cc) cover what happens with a kernel.
#include <catch2/catch.hpp>
#include <string>

#include "test_util.h"

using namespace dmcow_test;

namespace {

int Qcow(const std::string& args, std::string* out) { return Run(std::string(DMCOW_QCOW_PATH) + " " + args, out); }
int Daemon(const std::string& args, std::string* out) { return Run(std::string(DMCOWD_PATH) + " " + args, out); }

}  // namespace

TEST_CASE("dmcow-qcow refuses bad command lines with exit 2") {
  std::string out;
  CHECK(Qcow("", &out) == 2);
  CHECK(Qcow("frobnicate", &out) == 2);
  CHECK(out.find("unknown command 'frobnicate'") != std::string::npos);
  CHECK(Qcow("attach", &out) == 2);
  CHECK(out.find("usage: dmcow-qcow attach") != std::string::npos);
  CHECK(Qcow("attach --name 'a/b' x.qcow2", &out) == 2);
  CHECK(out.find("name 'a/b'") != std::string::npos);
  CHECK(Qcow("attach --name abcdefghijklmnopqrstuvwxyz0123 x.qcow2", &out) == 2);  // 30 characters
  CHECK(Qcow("attach --bogus x.qcow2", &out) == 2);
  CHECK(Qcow("attach --no-partitions=1 x.qcow2", &out) == 2);
  CHECK(out.find("usage: dmcow-qcow attach") != std::string::npos);
  for (const char* bad : {"-1", "1T", "12Q", "", "9999999G"}) {
    CHECK(Qcow(std::string("attach --scratch-max '") + bad + "' x.qcow2", &out) == 2);
    CHECK(out.find("bad --scratch-max") != std::string::npos);
  }
  CHECK(Qcow("mount", &out) == 2);
  CHECK(out.find("usage: dmcow-qcow mount") != std::string::npos);
  CHECK(Qcow("mount x.qcow2", &out) == 2);
  CHECK(Qcow("mount x.qcow2 /tmp extra", &out) == 2);
  for (const char* bad : {"0", "257", "-1", "1x", "", "99999999999999999999"}) {
    CHECK(Qcow(std::string("mount --partition '") + bad + "' x.qcow2 /tmp", &out) == 2);
    CHECK(out.find("bad --partition") != std::string::npos);
  }
  CHECK(Qcow("mount --partition 1 --no-partitions x.qcow2 /tmp", &out) == 2);
  CHECK(Qcow("mount --bogus x.qcow2 /tmp", &out) == 2);
  CHECK(Qcow("attach --partition 1 x.qcow2", &out) == 2);  // mount's alone
  CHECK(Qcow("umount", &out) == 2);
  CHECK(Qcow("umount a b", &out) == 2);
  CHECK(Qcow("detach", &out) == 2);
  CHECK(Qcow("detach ..", &out) == 2);
  CHECK(Qcow("list --output xml", &out) == 2);
  CHECK(Qcow("--help", &out) == 0);
  CHECK(out.find("dmcow-qcow attach") != std::string::npos);
}

TEST_CASE("dmcow-qcow refuses images it cannot serve, naming the file") {
  TempDir dir;
  std::string out;
  CHECK(Qcow("attach " + dir / "missing.qcow2", &out) == 1);
  CHECK(out.find("missing.qcow2") != std::string::npos);
  SKIP_WITHOUT_QEMU();
  MustRun("qemu-img create -q -f raw " + dir / "disk.raw" + " 1M");
  CHECK(Qcow("attach " + dir / "disk.raw", &out) == 1);
  CHECK(out.find("disk.raw: is raw; attach serves qcow2") != std::string::npos);
  // A backing file of a format the engine does not read.
  MustRun("qemu-img create -q -f vmdk " + dir / "base.vmdk" + " 1M");
  MustRun("qemu-img create -q -f qcow2 -b base.vmdk -F vmdk " + dir / "top.qcow2" + " 1M");
  CHECK(Qcow("attach " + dir / "top.qcow2", &out) == 1);
  CHECK(out.find("top.qcow2: backing format 'vmdk' is not supported") != std::string::npos);
  // Encrypted images (the header's crypt_method set to AES: no key
  // derivation, whose timing qemu-img's LUKS creation depends on).
  MustRun("qemu-img create -q -f qcow2 " + dir / "enc.qcow2" +
          " 1M && printf '\\000\\000\\000\\001' | "
          "dd of=" +
          dir / "enc.qcow2" + " bs=1 seek=32 conv=notrunc status=none");
  CHECK(Qcow("attach " + dir / "enc.qcow2", &out) == 1);
  CHECK(out.find("enc.qcow2: legacy AES encryption cannot be attached") != std::string::npos);
  // attach --tab NAME: /etc/dmcowtab's line ($DMCOWTAB here), refused as attach refuses it.
  CHECK(Qcow("attach --tab", &out) == 2);
  CHECK(Qcow("attach --tab a b", &out) == 2);
  CHECK(Qcow("attach --read-only --tab a", &out) == 2);
  MustRun("printf 'vm0 relative.qcow2\\nvm1 /x.qcow2 scratch-max=lots\\nvm2 " + dir / "enc.qcow2" + "\\n' > " +
          dir / "tab");
  const std::string tab = "DMCOWTAB=" + dir / "tab" + " ";
  CHECK(Run(tab + DMCOW_QCOW_PATH + " attach --tab vm0", &out) == 1);
  CHECK(out.find("tab:1: image 'relative.qcow2' is not an absolute path") != std::string::npos);
  CHECK(Run(tab + DMCOW_QCOW_PATH + " attach --tab vm1", &out) == 2);
  CHECK(out.find("bad --scratch-max lots") != std::string::npos);
  CHECK(Run(tab + DMCOW_QCOW_PATH + " attach --tab vm2", &out) == 1);
  CHECK(out.find("enc.qcow2: legacy AES encryption cannot be attached") != std::string::npos);
  CHECK(Run(tab + DMCOW_QCOW_PATH + " attach --tab nothere", &out) == 1);
  CHECK(out.find("tab: no line for nothere") != std::string::npos);
  CHECK(Run("DMCOWTAB=" + dir / "none " + DMCOW_QCOW_PATH + " attach --tab vm0", &out) == 1);
  CHECK(out.find("none: cannot be read") != std::string::npos);
  // mount: DIR is checked before anything is attached; umount: only what mount mounted.
  CHECK(Qcow("mount " + dir / "enc.qcow2" + " " + dir / "nothere", &out) == 1);
  CHECK(out.find("nothere: No such file or directory") != std::string::npos);
  CHECK(Qcow("mount " + dir / "enc.qcow2" + " " + dir / "enc.qcow2", &out) == 1);
  CHECK(out.find("enc.qcow2: not a directory") != std::string::npos);
  CHECK(Qcow("umount " + dir.path(), &out) == 1);
  CHECK(out.find("nothing dmcow-qcow mount mounted is there") != std::string::npos);
  CHECK(Qcow("umount " + dir / "nothere", &out) == 1);
  CHECK(out.find("No such file or directory") != std::string::npos);
  CHECK(Qcow("detach nothere", &out) == 1);
  CHECK(out.find("nothere: not attached") != std::string::npos);
}

TEST_CASE("dmcowd's qcow2 plugin refuses bad settings with exit 2") {
  TempDir dir;
  std::string out;
  const std::string img = dir / "i.qcow2";
  CHECK(Daemon("--plugin qcow2 --name t --opt bogus=1 " + img, &out) == 2);
  CHECK(out.find("no setting 'bogus'") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t --opt read_only=2 " + img, &out) == 2);
  CHECK(out.find("read_only=2") != std::string::npos);
  for (const char* bad : {"1G", "-5", "", "99999999999999999999"}) {
    CHECK(Daemon(std::string("--plugin qcow2 --name t --opt 'scratch_max=") + bad + "' " + img, &out) == 2);
    CHECK(out.find("expected a number of bytes") != std::string::npos);
  }
  CHECK(Daemon("--plugin qcow2 --name t --chunk-size 64K " + img, &out) == 2);
  CHECK(out.find("chunk is the image's cluster") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t", &out) == 2);
  CHECK(out.find("one argument, IMAGE") != std::string::npos);
  for (const char* bad : {"'a b'", "x/y", "'\xc3\xa9'", "\"$(printf %0129d 0)\""}) {
    CHECK(Daemon(std::string("--plugin qcow2 --name t --uuid ") + bad + " " + img, &out) == 2);
    CHECK(out.find("--uuid") != std::string::npos);
    CHECK(out.find("up to 128 characters") != std::string::npos);
  }
  CHECK(Daemon("--plugin qcow2 --name t --uuid " + std::string(128, 'u') + " --bogus " + img, &out) == 2);
  CHECK(out.find("--uuid") == std::string::npos);  // 128 characters pass
  CHECK(Daemon("--plugin qcow2 --name t --udev-private=1 " + img, &out) == 2);
  CHECK(Daemon("--plugin qcow2 --name t --ready-fd 1 " + img, &out) == 2);
  CHECK(out.find("bad --ready-fd") != std::string::npos);
}

// Files named inside an image (issue 15): attach opens each once, and only
// what it may follow. A FIFO, a socket or a character device as backing
// file, or as external data file, is refused at once with the image and the
// file named (before anything is made: no kernel needed); a block device
// too, unless --allow-device-backing, which lets nothing else in. `timeout`
// turns a hang (a FIFO opened for reading) into a failure.
TEST_CASE("dmcow-qcow refuses backing and data files that are not regular files, without blocking") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  std::string out;
  const std::string top = dir / "top.qcow2", b = dir / "b";
  MustRun("qemu-img create -q -f qcow2 -u -b b -F raw " + top + " 1M");
  auto refused = [&](const std::string& opts, const std::string& type) {
    INFO(opts + " / " + type);
    CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach --name t " + opts + " " + top, &out) == 1);
    CHECK(out.find(top + ": backing file '" + b + "' is " + type + ": attach follows only regular files") !=
          std::string::npos);
  };
  MustRun("mkfifo " + b);
  refused("", "a FIFO");
  refused("--allow-device-backing", "a FIFO");
  refused("--read-only", "a FIFO");
  MustRun("rm " + b + " && ln -s /dev/null " + b);
  refused("", "a character device");
  refused("--allow-device-backing --read-only", "a character device");
  MustRun("rm " + b + " && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('" + b + "')\" || mkfifo " +
          b);
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + top, &out) == 1);
  CHECK(out.find(top + ": backing file '" + b + "' is a ") != std::string::npos);
  // A block device, where the host has one.
  std::string blk;
  Run("find /dev -maxdepth 1 -type b 2>/dev/null | head -1 | tr -d '\\n'", &blk);
  if (!blk.empty()) {
    MustRun("rm -f " + b + " && ln -s " + blk + " " + b);
    refused("", "a block device");
    CHECK(out.find("(--allow-device-backing allows block devices)") != std::string::npos);
  }
  // --no-backing never looks at the backing file: attach gets as far as
  // starting the daemon (here one that fails at once).
  MustRun("rm -f " + b + " && mkfifo " + b);
  CHECK(Run("DMCOWD=/bin/false timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach --no-backing " + top, &out) == 1);
  CHECK(out.find("dmcowd exited before the device was ready") != std::string::npos);
  // A missing backing file names both.
  MustRun("rm " + b);
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + top, &out) == 1);
  CHECK(out.find(top + ": could not open backing file '" + b + "'") != std::string::npos);
  // An external data file that is a FIFO: refused by its type, never opened.
  const std::string df = dir / "df.qcow2", data = dir / "data";
  MustRun("qemu-img create -q -f qcow2 -o data_file=" + data + " " + df + " 1M && rm " + data + " && mkfifo " + data);
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + df, &out) == 1);
  CHECK(out.find(df + ": external data file '" + data + "' is a FIFO") != std::string::npos);
  // A loop through a symbolic link: refused by file identity.
  MustRun("qemu-img create -q -f qcow2 -u -b l2.qcow2 -F qcow2 " + dir / "l1.qcow2" +
          " 1M && "
          "qemu-img create -q -f qcow2 -u -b l1-link -F qcow2 " +
          dir / "l2.qcow2" + " 1M && ln -s l1.qcow2 " + dir / "l1-link");
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + dir / "l1.qcow2", &out) == 1);
  CHECK(out.find("creates an infinite loop") != std::string::npos);
  // The image itself may be a file or a block device, nothing else.
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + b + "-none", &out) == 1);
  MustRun("mkfifo " + dir / "fifo.qcow2");
  CHECK(Run("timeout 20 " + std::string(DMCOW_QCOW_PATH) + " attach " + dir / "fifo.qcow2", &out) == 1);
  CHECK(out.find("fifo.qcow2: is a FIFO") != std::string::npos);
}

TEST_CASE("dmcow-qcow attach's new options and dmcowd's descriptor settings refuse bad input") {
  TempDir dir;
  std::string out;
  CHECK(Qcow("attach --no-backing=1 x.qcow2", &out) == 2);
  CHECK(Qcow("attach --allow-device-backing", &out) == 2);
  CHECK(out.find("--allow-device-backing") != std::string::npos);  // the usage names the options
  CHECK(out.find("--no-backing") != std::string::npos);
  CHECK(Qcow("--help", &out) == 0);
  CHECK(out.find("--allow-device-backing") != std::string::npos);
  const std::string img = dir / "i.qcow2";
  for (const char* bad : {"image_fd=x", "image_fd=1", "image_fd=", "no_backing=2", "chain1=5:/x", "chain0=5:/x"}) {
    INFO(bad);
    CHECK(Daemon(std::string("--plugin qcow2 --name t --opt ") + bad + " " + img, &out) == 2);
  }
  CHECK(Daemon("--plugin qcow2 --name t --opt image_fd=7 --opt chain1=8 " + img, &out) == 2);
  CHECK(out.find("expected FD:NAME") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t --opt image_fd=7 --opt chain1=8: " + img, &out) == 2);
}

// --key-file (LUKS images attached through dm-crypt): every bad key file
// and key refused before anything is started, naming what is wrong; a FIFO
// does not hang the open. The kernel side (right and wrong keys, the crypt
// device) is tested in the VM (tests/vm/qcow_test.cc, qcow_luks).
TEST_CASE("dmcow-qcow attach refuses bad key files and keys for images that take none") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  std::string out;
  // qemu-img's key derivation times itself and sometimes gives up
  // ("Unable to get accurate CPU usage"): retried.
  MustRun("cd '" + dir.path() +
          "' && for i in 1 2 3 4 5; do qemu-img create -q -f qcow2 --object secret,id=s0,data=pw "
          "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 luks.qcow2 1M && break; done");
  MustRun("qemu-img create -q -f qcow2 " + dir / "plain.qcow2" + " 1M");
  MustRun("printf pw > " + dir / "key" + " && : > " + dir / "empty" + " && mkfifo " + dir / "fifo" +
          " && head -c 65537 /dev/zero > " + dir / "big");
  const std::string luks = " " + dir / "luks.qcow2 </dev/null";
  const std::string key = dir / "key";
  const struct {
    std::string args, want;
  } bad[] = {
      {"--key-file " + dir / "missing" + luks, "missing: No such file or directory"},
      {"--key-file " + dir.path() + luks, "not a regular file"},
      {"--key-file " + dir / "fifo" + luks, "fifo: not a regular file"},
      {"--key-file " + dir / "empty" + luks, "empty: empty"},
      {"--key-file -" + luks, "--key-file -: empty"},  // standard input
      {"--key-file " + dir / "big" + luks, "longer than 65536 bytes"},
      {"--key-file 0=" + key + luks, "N=FILE is for backing files, N from 1"},
      {"--key-file 1=" + luks, "no file named"},
      {"--key-file " + key + " --key-file " + key + luks, "a second key for the same image"},
      {"--key-file " + key + " " + dir / "plain.qcow2", "plain.qcow2 is not encrypted"},
      {"--key-file " + key + " --key-file 1=" + key + luks, "the chain has 1 file(s)"},
  };
  for (const auto& b : bad) {
    INFO(b.args);
    CHECK(Qcow("attach " + b.args, &out) == 2);
    INFO(out);
    CHECK(out.find(b.want) != std::string::npos);
  }
  // No key and no terminal to ask on.
  CHECK(Qcow("attach" + luks, &out) == 1);
  CHECK(out.find("luks.qcow2: image is encrypted: give its passphrase with --key-file FILE") != std::string::npos);
  // dmcowd's passphrase descriptors.
  for (const char* opt : {"secret0=abc", "secret0=1", "secret0=", "secret1=99999999"}) {
    INFO(opt);
    CHECK(Daemon(std::string("--plugin qcow2 --name t --opt ") + opt + " " + dir / "luks.qcow2", &out) == 2);
    CHECK(out.find("expected a descriptor number") != std::string::npos);
  }
  CHECK(Daemon("--plugin qcow2 --name t --opt secretx=4 " + dir / "luks.qcow2", &out) == 2);
  CHECK(out.find("no setting 'secretx'") != std::string::npos);
}

// The passphrase's way to dmcowd, with a stand-in daemon (DMCOWD) that
// prints what it got and exits: from --key-file and from the terminal
// prompt (under script(1); the prompt does not echo it), as secretK=FD of
// each level (the base level's own key is its secret0), never on a command
// line. (The sleep: what is typed before the prompt is discarded.)
TEST_CASE("dmcow-qcow attach hands each daemon its passphrases on descriptors, from a key file or a prompt") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  std::string out;
  auto make = [&](const std::string& cmd) {
    MustRun("cd '" + dir.path() + "' && for i in 1 2 3 4 5; do qemu-img create -q -f qcow2 " + cmd + " && break; done");
  };
  const std::string o = "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
  make("--object secret,id=s0,data=base-key " + o + " base.qcow2 1M");
  make("--object secret,id=s0,data=top-key --object secret,id=s1,data=base-key -b base.qcow2 -F qcow2 " + o +
       " top.qcow2 1M");
  MustRun("printf top-key > " + dir / "top.key" + " && printf base-key > " + dir / "base.key");
  const std::string fake = dir / "fake-dmcowd";
  MustRun(
      "printf '%s\\n' '#!/bin/bash' 'echo \"args: $*\" >&2' "
      "'for a in \"$@\"; do case $a in secret*=*) n=${a#*=}; echo \"${a%%=*}: [$(head -c 99 <&$n)]\" >&2;; "
      "esac; done' 'exit 1' > " +
      fake + " && chmod +x " + fake);
  const std::string qcow = "DMCOWD=" + fake + " " + DMCOW_QCOW_PATH + " attach --name t ";
  // The chain: the base level starts first and gets its own key as secret0.
  CHECK(Run(qcow + "--key-file " + dir / "top.key" + " --key-file 1=" + dir / "base.key" + " " + dir / "top.qcow2",
            &out) == 1);
  INFO(out);
  CHECK(out.find("secret0: [base-key]") != std::string::npos);
  CHECK(out.find("args: ") != std::string::npos);
  CHECK(out.substr(out.find("args: "), out.find('\n', out.find("args: ")) - out.find("args: ")).find("-key") ==
        std::string::npos);
  // The prompt, on a terminal: asked, not echoed, handed over.
  CHECK(Run("cd '" + dir.path() + "' && (sleep 3; printf 'base-key\\n') | script -qec '" + qcow + dir / "base.qcow2" +
                "' /dev/null",
            &out) != 0);
  CHECK(out.find("Enter passphrase for " + dir / "base.qcow2" + ": ") != std::string::npos);
  CHECK(out.find("secret0: [base-key]") != std::string::npos);
  CHECK(out.find("base-key\r") == std::string::npos);  // not echoed
}
