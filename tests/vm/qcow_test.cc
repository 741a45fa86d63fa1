// dmcow-qcow in the test VM (tests/vm/run.sh): qcow2 and qcow v1 images that the real
// qemu-img made on the host (tests/vm/qcow_inputs.sh, in /qcow/in with a
// manifest of their content hashes) attached as block devices through the
// real dm-cow target and dmcowd's qcow2 plugin.
//
//   qcowtest list | run [name...]
//
// Images the tests wrote go to /tmp/qcow-out with a list of host checks
// (/tmp/qcow-out/checks); run.sh copies them out of the VM and checks them
// with qemu-img (check clean, compare equal to the raw reference written
// alongside, e2fsck of the file system), so the oracle is QEMU, not us
// (qcow v1, which qemu-img cannot check: "writev1", convert and compare
// succeed, and dmcow-img check finds no errors).
#include <fcntl.h>
#include <linux/loop.h>
#include <poll.h>
#include <signal.h>
#include <sys/fanotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "vm_harness.h"

namespace {

using namespace dmcow_vm;

const char* const kQcow = "/bin/dmcow-qcow";
const char* const kIn = "/qcow/in";
const char* const kWork = "/tmp/qcow-work";
const char* const kOut = "/tmp/qcow-out";

std::map<std::string, std::string> Manifest() {
  std::map<std::string, std::string> m;
  std::istringstream in(ReadText(std::string(kIn) + "/manifest"));
  std::string file, sum;
  while (in >> file >> sum) m[file] = sum;
  CHECK(!m.empty(), "no manifest in %s", kIn);
  return m;
}

std::string Sha256(const std::string& path) {
  std::string out;
  Must({"/bin/sha256sum", path});
  Run({"/bin/sha256sum", path}, &out);
  return out.substr(0, out.find(' '));
}

// `extra`: more attach options (--key-file). `daemon_log`, if not empty:
// the file dmcowd's own log goes to (DMCOW_QCOW_DAEMON_STDERR=1), with
// attach's stderr.
std::string Attach(const std::string& name, const std::string& image, bool read_only = false,
                   const std::vector<std::string>& extra = {}, const std::string& daemon_log = "") {
  std::vector<std::string> args = {kQcow, "attach", "--name", name};
  if (read_only) args.push_back("--read-only");
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(image);
  if (!daemon_log.empty()) {
    std::string cmd = "DMCOW_QCOW_DAEMON_STDERR=1 exec";
    for (const std::string& a : args) {
      cmd += " '";
      for (char c : a) cmd += c == '\'' ? std::string("'\\''") : std::string(1, c);
      cmd += "'";
    }
    args = {"/bin/sh", "-c", cmd + " 2>'" + daemon_log + "'"};
  }
  std::string out;
  const int st = Run(args, &out);
  if (st != 0) {
    std::string ls;
    Run({"/bin/sh", "-c", "ls /dev/dm-cow; ls /sys/class/misc | grep cow; dmsetup ls; cat /proc/mounts | grep dev"},
        &ls);
    out += " || " + ls;
    if (!daemon_log.empty()) out += " || " + ReadText(daemon_log);
  }
  CHECK(st == 0, "attach %s: exit %d: %s", image.c_str(), st, Tail(out, 1500).c_str());
  CHECK(out == "/dev/mapper/" + name + "\n", "attach printed '%s'", out.c_str());
  // "returns once the device is usable": it must be there and readable now.
  int fd = open(("/dev/mapper/" + name).c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "device missing right after attach");
  char b[512];
  CHECK(pread(fd, b, sizeof(b), 0) == 512, "device not readable right after attach");
  close(fd);
  return "/dev/mapper/" + name;
}

void Detach(const std::string& name) {
  std::string out;
  const int st = Run({kQcow, "detach", name}, &out);
  CHECK(st == 0, "detach %s: exit %d: %s", name.c_str(), st, Tail(out).c_str());
  CHECK(access(("/dev/mapper/" + name).c_str(), F_OK) != 0, "device still there after detach");
  CHECK(access(("/dev/mapper/" + name + "-store").c_str(), F_OK) != 0, "store device left behind");
}

// Folded clusters go straight to the image's loop device, not through the
// store (a device-mapper device) or the scratch file's loop: one remapping
// layer, as dm-linear over the file. Returns the number of linear targets.
int CheckLinearOntoImage(const std::string& name, const std::string& image) {
  std::string table;
  CHECK(Run({"/sbin/dmsetup", "table", name}, &table) == 0, "dmsetup table %s", name.c_str());
  struct stat img;
  CHECK(stat(image.c_str(), &img) == 0, "stat %s", image.c_str());
  std::istringstream in(table);
  std::string line;
  int linear = 0;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string start, len, type, dev;
    f >> start >> len >> type >> dev;
    if (type != "linear") continue;
    linear++;
    // dev is major:minor; a loop device names its file in sysfs.
    std::string backing = ReadText("/sys/dev/block/" + dev + "/loop/backing_file");
    while (!backing.empty() && backing.back() == '\n') backing.pop_back();
    struct stat st;
    CHECK(!backing.empty() && stat(backing.c_str(), &st) == 0 && st.st_ino == img.st_ino && st.st_dev == img.st_dev,
          "%s: linear target onto %s (file '%s'), not the image's loop device: %s", name.c_str(), dev.c_str(),
          backing.c_str(), line.c_str());
  }
  return linear;
}

// An encrypted image: the linear targets go to its dm-crypt device
// (NAME-crypt), a crypt target over the image's loop device whose key is a
// kernel keyring reference, never the key. Returns the number of linear
// targets.
int CheckLinearOntoCrypt(const std::string& name, const std::string& image) {
  std::string table, crypt, ls;
  CHECK(Run({"/sbin/dmsetup", "table", name}, &table) == 0, "dmsetup table %s", name.c_str());
  CHECK(Run({"/sbin/dmsetup", "table", "--showkeys", name + "-crypt"}, &crypt) == 0, "no %s-crypt device",
        name.c_str());
  std::istringstream c(crypt);
  std::string start, len, type, cipher, key, iv_offset, dev, offset;
  c >> start >> len >> type >> cipher >> key >> iv_offset >> dev >> offset;
  CHECK(type == "crypt" && iv_offset == "0" && offset == "0", "%s-crypt: %s", name.c_str(), crypt.c_str());
  CHECK(key.rfind(":", 0) == 0 && key.find(":logon:dmcow:") != std::string::npos,
        "%s-crypt: the key is not a keyring reference: %s", name.c_str(), crypt.c_str());
  std::string backing = ReadText("/sys/dev/block/" + dev + "/loop/backing_file");
  while (!backing.empty() && backing.back() == '\n') backing.pop_back();
  struct stat st, img;
  CHECK(stat(image.c_str(), &img) == 0 && stat(backing.c_str(), &st) == 0 && st.st_ino == img.st_ino,
        "%s-crypt is over %s ('%s'), not the image's loop", name.c_str(), dev.c_str(), backing.c_str());
  struct stat crypt_node;
  CHECK(stat(("/dev/mapper/" + name + "-crypt").c_str(), &crypt_node) == 0, "no /dev/mapper/%s-crypt", name.c_str());
  const std::string crypt_devt = Fmt("%u:%u", major(crypt_node.st_rdev), minor(crypt_node.st_rdev));
  std::istringstream in(table);
  std::string line;
  int linear = 0;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    f >> start >> len >> type >> dev;
    if (type != "linear") continue;
    linear++;
    CHECK(dev == crypt_devt, "%s: linear target onto %s, not %s-crypt (%s): %s", name.c_str(), dev.c_str(),
          name.c_str(), crypt_devt.c_str(), line.c_str());
  }
  return linear;
}

void CopyFile(const std::string& from, const std::string& to) {
  mkdir(kOut, 0755);
  Must({"/bin/cp", from, to});
}

void AddCheck(const std::string& line) {
  mkdir(kOut, 0755);
  const std::string path = std::string(kOut) + "/checks";
  WriteText(path, ReadText(path) + line + "\n");
}

// A fresh copy of the inputs (the chain's backing files come along).
void FreshWork() {
  Run({"/bin/rm", "-rf", kWork});
  Must({"/bin/cp", "-a", kIn, kWork});
}

// Every image of the manifest, attached read-only, reads exactly what
// qemu-img convert -O raw made of it on the host; the image files stay as
// they were.
void TestReadImages() {
  FreshWork();
  for (const auto& [file, sum] : Manifest()) {
    const std::string path = std::string(kWork) + "/" + file;
    const std::string before = Sha256(path);
    const std::string dev = Attach("qr", path, true);
    const std::string got = Sha256(dev);
    std::string out;
    Run({"/bin/cat", "/run/dmcow-qcow/qr.json"}, &out);
    Detach("qr");
    CHECK(got == sum, "%s read through the device differs from qemu-img's conversion", file.c_str());
    CHECK(Sha256(path) == before, "%s changed by a read-only attach", file.c_str());
  }
}

// Seeded writes (partial chunks, unaligned, three threads at once) through
// the device and into a raw reference; reads checked on the way; the image
// goes to the host for qemu-img check and compare.
// `keys`: --key-file options, and the host check's key files after the
// reference ("writeluks IMAGE REF KEY [BACKING KEY]").
void WriteSeeded(const std::string& file, uint64_t seed, const std::vector<std::string>& keys = {}) {
  const std::string path = std::string(kWork) + "/" + file;
  std::vector<std::string> key_opts, key_names;
  for (const std::string& k : keys) {
    const size_t eq = k.find('=');
    const std::string depth = eq == std::string::npos ? "" : k.substr(0, eq + 1);  // "1="
    key_names.push_back(k.substr(depth.size()));
    key_opts.insert(key_opts.end(), {"--key-file", depth + kWork + "/" + key_names.back()});
  }
  const std::string dev = Attach("qw", path, false, key_opts);
  mkdir(kOut, 0755);
  const std::string ref = std::string(kOut) + "/" + file + ".ref.raw";
  CopyFile(dev, ref);
  int dfd = open(dev.c_str(), O_RDWR | O_CLOEXEC);
  int rfd = open(ref.c_str(), O_RDWR | O_CLOEXEC);
  CHECK(dfd >= 0 && rfd >= 0, "open %s", dev.c_str());
  struct stat st;
  fstat(rfd, &st);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  std::atomic<int> bad{0};
  std::string why;
  auto worker = [&](int t) {
    std::mt19937_64 rng(seed * 7 + t);
    const uint64_t lo = size / 3 * t, hi = t == 2 ? size : size / 3 * (t + 1);
    std::vector<uint8_t> buf, got;
    for (int i = 0; i < 120 && !bad; i++) {
      uint64_t len = 1 + rng() % (i % 5 == 0 ? 300000 : 9000);
      uint64_t off = lo + rng() % (hi - lo);
      if (rng() % 3 == 0) off &= ~uint64_t{4095};
      len = std::min(len, hi - off);
      if (rng() % 4 == 0) {  // read back
        got.resize(len);
        buf.resize(len);
        if (pread(dfd, got.data(), len, off) != static_cast<ssize_t>(len) ||
            pread(rfd, buf.data(), len, off) != static_cast<ssize_t>(len) || got != buf) {
          bad = 1;
          why = Fmt("thread %d: read at %llu+%llu differs", t, (unsigned long long)off, (unsigned long long)len);
        }
        continue;
      }
      buf.resize(len);
      for (auto& b : buf) b = static_cast<uint8_t>(rng() % 7 == 0 ? 0 : rng());
      if (pwrite(dfd, buf.data(), len, off) != static_cast<ssize_t>(len) ||
          pwrite(rfd, buf.data(), len, off) != static_cast<ssize_t>(len)) {
        bad = 1;
        why = Fmt("thread %d: write at %llu failed: %s", t, (unsigned long long)off, strerror(errno));
      }
      if (i % 40 == 39) fsync(dfd);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; t++) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  CHECK(!bad, "%s: %s", file.c_str(), why.c_str());
  CHECK(fsync(dfd) == 0, "fsync %s: %s", dev.c_str(), strerror(errno));
  close(dfd);
  close(rfd);
  const std::string dev_sum = Sha256(dev);
  CHECK(dev_sum == Sha256(ref), "%s: device and reference differ after the writes", file.c_str());
  Detach("qw");
  // Reattached, the image shows the same.
  Attach("qw", path, false, key_opts);
  if (keys.empty())
    CHECK(CheckLinearOntoImage("qw", path) > 0, "%s: no written cluster folded at reattach", file.c_str());
  else
    CHECK(CheckLinearOntoCrypt("qw", path) > 0, "%s: no written cluster folded at reattach", file.c_str());
  CHECK(Sha256(dev) == dev_sum, "%s: reattached image differs", file.c_str());
  Detach("qw");
  CopyFile(path, std::string(kOut) + "/" + file);
  // qemu-img cannot check qcow v1 images: the host checks them otherwise.
  const bool v1 = file.size() > 5 && file.substr(file.size() - 5) == ".qcow";
  std::string check = (keys.empty() ? (v1 ? "writev1 " : "write ") : "writeluks ") + file + " " + file + ".ref.raw";
  for (const std::string& k : key_names) check += " " + k;
  AddCheck(check);
}

// LUKS images qemu-img made (three cipher settings, and a LUKS image over a
// LUKS backing file with another key), attached with the kernel's dm-crypt:
// read whole, identical to qemu-img convert; written and checked by
// qemu-img on the host with the keys. Wrong, missing and legacy-AES keys
// are refused with nothing attached and the image untouched.
void TestLuks() {
  FreshWork();
  const std::string w = kWork;
  std::istringstream manifest(ReadText(std::string(kIn) + "/manifest-luks"));
  std::string line;
  int read = 0;
  while (std::getline(manifest, line)) {
    std::istringstream f(line);
    std::string file, sum, key, backing_key;
    f >> file >> sum >> key >> backing_key;
    std::vector<std::string> opts = {"--key-file", w + "/" + key};
    if (!backing_key.empty()) opts.insert(opts.end(), {"--key-file", "1=" + w + "/" + backing_key});
    const std::string path = w + "/" + file;
    const std::string before = Sha256(path);
    const std::string dev = Attach("ql", path, true, opts);
    CHECK(CheckLinearOntoCrypt("ql", path) >= 0, "crypt table");
    const std::string got = Sha256(dev);
    Detach("ql");
    CHECK(access("/dev/mapper/ql-crypt", F_OK) != 0, "ql-crypt left behind");
    CHECK(got == sum, "%s read through dm-crypt differs from qemu-img's conversion", file.c_str());
    CHECK(Sha256(path) == before, "%s changed by a read-only attach", file.c_str());
    read++;
  }
  CHECK(read == 4, "manifest-luks has %d images", read);

  // Refusals: exit 1, the reason, no device, the image as it was.
  const std::string img = w + "/luks.qcow2";
  const std::string before = Sha256(img);
  auto refused = [&](const std::string& cmd, const std::string& want) {
    std::string out;
    const int st = Run({"/bin/sh", "-c", cmd + " </dev/null"}, &out);
    CHECK(st == 1 || st == 2, "%s: exit %d: %s", cmd.c_str(), st, out.c_str());
    CHECK(out.find(want) != std::string::npos, "%s: no '%s' in: %s", cmd.c_str(), want.c_str(), out.c_str());
    CHECK(access("/dev/mapper/qbad", F_OK) != 0 && access("/dev/mapper/qbad-crypt", F_OK) != 0, "%s left a device",
          cmd.c_str());
    CHECK(Sha256(img) == before, "%s changed the image", cmd.c_str());
  };
  const std::string attach = std::string(kQcow) + " attach --name qbad ";
  refused(attach + "--key-file " + w + "/key-bad " + img, "Invalid password, cannot unlock any keyslot");
  refused(attach + img, "luks.qcow2: image is encrypted: give its passphrase with --key-file FILE");
  refused(attach + "--key-file " + w + "/key-a " + w + "/luks-top.qcow2", "--key-file 1=FILE");
  refused(attach + "--key-file " + w + "/key-a --key-file 1=" + w + "/key-a " + img, "the chain has 1 file");
  refused(attach + "--key-file " + w + "/key-a " + w + "/v2.qcow2", "v2.qcow2 is not encrypted");
  refused(attach + "--key-file " + w + "/nothere " + img, "nothere");
  refused(attach + "--key-file " + w + "/key-a " + w + "/aes.qcow2", "legacy AES encryption cannot be attached");

  // Written through dm-crypt (and the daemon's own fills), then qemu-img's
  // check and compare on the host. luks.qcow2 first: it is luks-top's
  // backing file, which the host gets as it was when luks-top was written.
  WriteSeeded("luks.qcow2", 101, {"key-a"});
  WriteSeeded("luks-plain.qcow2", 102, {"key-a"});
  WriteSeeded("luks-top.qcow2", 103, {"key-b", "1=key-a"});
}

int TableLines(const std::string& name) {
  std::string table;
  CHECK(Run({"/sbin/dmsetup", "table", name}, &table) == 0, "dmsetup table %s", name.c_str());
  return static_cast<int>(std::count(table.begin(), table.end(), '\n'));
}

// An image with about 2,100 scattered runs: attach scans 1,024 chunks and
// loads at most 64 linear targets, the rest is scanned while the device
// serves and folded by the reload that follows the scan; the content is
// qemu-img's throughout. (Writes during a scan: qcow2_mapper_test; the
// VM's /tmp has no room for another written image and its reference.)
// The first table is read from dmcowd's log, not from dmsetup: 16 MiB scan
// in milliseconds, and a table read after attach may already be the fold.
void TestBackgroundScan() {
  FreshWork();
  const std::string path = std::string(kWork) + "/scattered.qcow2", log = "/tmp/qs-daemon.log";
  unlink(log.c_str());
  struct DetachAtEnd {  // however the test ends; Detach below when it passes
    ~DetachAtEnd() {
      if (access("/dev/mapper/qs", F_OK) == 0) Run({kQcow, "detach", "qs"});
    }
  } detach_at_end;
  const std::string dev = Attach("qs", path, /*read_only=*/true, {}, log);
  const std::string first_log = ReadText(log);
  const size_t ready = first_log.find("/dev/mapper/qs ready: ");
  CHECK(ready != std::string::npos, "no ready line: %s", Tail(first_log).c_str());
  const std::string ready_line = first_log.substr(ready, first_log.find('\n', ready) - ready);
  const size_t at = ready_line.rfind(", ");
  unsigned long linear = ~0UL;
  CHECK(at != std::string::npos && std::sscanf(ready_line.c_str() + at, ", %lu linear runs", &linear) == 1,
        "ready line without linear runs: %s", ready_line.c_str());
  CHECK(linear <= 64, "first table with %lu linear runs (at most 64 expected)", linear);
  const std::string sum = Manifest().at("scattered.qcow2");
  CHECK(Sha256(dev) == sum, "scattered.qcow2 read during the scan differs from qemu-img's conversion");
  const char* const scan_done = "scan for stable extents done";
  int lines = TableLines("qs");
  for (int i = 0; i < 600 && (lines < 2000 || ReadText(log).find(scan_done, ready) == std::string::npos); i++) {
    usleep(100000);
    lines = TableLines("qs");
  }
  CHECK(ReadText(log).find(scan_done, ready) != std::string::npos, "the scan did not go on after attach: %s",
        Tail(ReadText(log)).c_str());
  CHECK(lines >= 2000, "not folded 60 s after attach: %d table lines", lines);
  CHECK(CheckLinearOntoImage("qs", path) >= 1000, "folded runs not linear onto the image");
  CHECK(Sha256(dev) == sum, "scattered.qcow2 read after the fold differs from qemu-img's conversion");
  std::fprintf(stderr, "background_scan: first table %lu linear runs, after the scan %d lines\n", linear, lines);
  Detach("qs");
}

void TestWriteImages() {
  FreshWork();
  uint64_t seed = 1;
  for (const char* f : {"empty.qcow2", "v2.qcow2", "zlib.qcow2", "zstd.qcow2", "chain-top.qcow2", "extl2.qcow2",
                        "snap.qcow2", "small.qcow2", "v1.qcow", "v1zlib.qcow", "v1top.qcow"}) {
    WriteSeeded(f, seed++);
  }
}

// mkfs.ext4 on an attached empty image, files written, detach, reattach,
// files read back, fsck clean; the host runs e2fsck on qemu-img's view too.
void TestFilesystem() {
  FreshWork();
  const std::string path = std::string(kWork) + "/fs.qcow2";
  std::string dev = Attach("qfs", path);
  Must({"/sbin/mke2fs", "-q", "-F", "-t", "ext4", dev});
  mkdir("/tmp/qfs-src", 0755);
  std::mt19937_64 rng(42);
  std::vector<std::string> contents;
  for (int i = 0; i < 8; i++) {
    std::string text;
    const size_t n = 1000 + rng() % 900000;
    for (size_t j = 0; j < n; j++) text += static_cast<char>('a' + (rng() % 26));
    contents.push_back(text);
    WriteText(Fmt("/tmp/qfs-src/f%d", i), text);
    Must({"/sbin/debugfs", "-w", "-R", Fmt("write /tmp/qfs-src/f%d f%d", i, i), dev});
  }
  Must({"/sbin/debugfs", "-w", "-R", "mkdir d1", dev});
  Must({"/sbin/e2fsck", "-fn", dev});
  Detach("qfs");
  dev = Attach("qfs", path);
  for (int i = 0; i < 8; i++) {
    unlink("/tmp/qfs-dump");
    Must({"/sbin/debugfs", "-R", Fmt("dump f%d /tmp/qfs-dump", i), dev});
    CHECK(ReadText("/tmp/qfs-dump") == contents[i], "f%d differs after reattach", i);
  }
  Must({"/sbin/e2fsck", "-fn", dev});
  // The kernel's ext4 on it, under bonnie++ (as the original design was
  // tested): sequential and per-character I/O, rewrites, file creation.
  mkdir("/tmp/qfs-mnt", 0755);
  CHECK(mount(dev.c_str(), "/tmp/qfs-mnt", "ext4", 0, nullptr) == 0, "mount %s: %s", dev.c_str(), strerror(errno));
  std::string out;
  const int st = Run(
      {"/sbin/bonnie++", "-d", "/tmp/qfs-mnt", "-s", "24", "-r", "12", "-n", "1", "-u", "root", "-x", "1", "-q"}, &out);
  CHECK(umount("/tmp/qfs-mnt") == 0, "umount: %s", strerror(errno));
  CHECK(st == 0, "bonnie++ on the attached image: exit %d: %s", st, Tail(out).c_str());
  CHECK(ReadText("/tmp/qfs-mnt/f0").empty(), "mount point not empty after umount");
  Must({"/sbin/e2fsck", "-fn", dev});
  Detach("qfs");
  // After a detach and reattach, the files are still there through the kernel's ext4.
  dev = Attach("qfs", path);
  CHECK(mount(dev.c_str(), "/tmp/qfs-mnt", "ext4", MS_RDONLY, nullptr) == 0, "mount: %s", strerror(errno));
  const bool same = ReadText("/tmp/qfs-mnt/f3") == contents[3];
  CHECK(umount("/tmp/qfs-mnt") == 0, "umount: %s", strerror(errno));
  CHECK(same, "f3 differs through the mounted file system");
  Detach("qfs");
  Run({"/bin/rm", "-rf", "/tmp/qfs-src", "/tmp/qfs-dump"});
  CopyFile(path, std::string(kOut) + "/fs.qcow2");
  AddCheck("fs fs.qcow2 -");
}

pid_t DaemonPid(const std::string& name) {
  const std::string text = ReadText("/run/dmcow-qcow/" + name + ".json");
  const size_t at = text.find("\"pid\":");
  CHECK(at != std::string::npos, "no pid in the state of %s", name.c_str());
  return static_cast<pid_t>(std::atoll(text.c_str() + at + 6));
}

// SIGKILL of the daemon while a writer writes and flushes: the writer gets
// an error at once (no hang); every flushed write is there after a
// reattach; the host checks the image has no corruption (leaks allowed).
void TestKilled() {
  FreshWork();
  const std::string path = std::string(kWork) + "/empty.qcow2";
  const std::string dev = Attach("qk", path);
  const pid_t daemon = DaemonPid("qk");
  int fd = open(dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  CHECK(fd >= 0, "open %s", dev.c_str());
  constexpr uint64_t kSlot = 65536, kSlots = 128;  // 8 MiB
  std::vector<uint64_t> order(kSlots);
  for (uint64_t i = 0; i < kSlots; i++) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  Buf mem(kSlot);
  uint8_t* const buf = mem.bytes();
  std::vector<uint64_t> flushed, written;
  std::atomic<bool> stop{false};
  std::thread killer([&] {
    SleepMs(1500);
    kill(daemon, SIGKILL);
    stop = true;
  });
  const auto t0 = Clock::now();
  int err = 0;
  for (uint64_t i = 0;; i++) {
    const uint64_t slot = order[i % kSlots];
    if (i >= kSlots) {  // all written once: keep flushing rewrites of the same
      if (fsync(fd) != 0) {
        err = errno;
        break;
      }
      if (stop && MsSince(t0) > 6000) break;
      continue;
    }
    memset(buf, static_cast<int>(slot % 251) + 1, kSlot);
    if (pwrite(fd, buf, kSlot, static_cast<off_t>(slot * kSlot)) != static_cast<ssize_t>(kSlot)) {
      err = errno;
      break;
    }
    written.push_back(slot);
    if (written.size() % 8 == 0) {
      if (fsync(fd) != 0) {
        err = errno;
        break;
      }
      flushed = written;
    }
  }
  const long ms = MsSince(t0);
  killer.join();
  close(fd);
  CHECK(err != 0, "writes went on for %ld ms after the daemon was killed", ms);
  CHECK(ms < 20000, "the writer took %ld ms to see the daemon gone", ms);
  Detach("qk");  // removes what the dead daemon left
  CopyFile(path, std::string(kOut) + "/killed.qcow2");
  AddCheck("killed killed.qcow2 -");
  // Every flushed write survived.
  const std::string dev2 = Attach("qk", path);
  fd = open(dev2.c_str(), O_RDONLY | O_CLOEXEC);
  std::vector<uint8_t> got(kSlot);
  for (uint64_t slot : flushed) {
    CHECK(pread(fd, got.data(), kSlot, static_cast<off_t>(slot * kSlot)) == static_cast<ssize_t>(kSlot), "read");
    CHECK(std::count(got.begin(), got.end(), static_cast<uint8_t>(slot % 251 + 1)) == static_cast<long>(kSlot),
          "flushed slot %llu lost (%zu flushed)", (unsigned long long)slot, flushed.size());
  }
  close(fd);
  Detach("qk");
  CHECK(flushed.size() >= 8, "only %zu flushed writes before the kill: the test proves little", flushed.size());
}

// QEMU-compatible locks: an image attached read-write cannot be attached
// again, read-write or read-only (QEMU refuses it the same way: the lock
// bytes are QEMU's, tests/image_lock_test.cc checks them against QEMU).
void TestLock() {
  FreshWork();
  const std::string path = std::string(kWork) + "/v2.qcow2";
  Attach("ql", path);
  for (bool ro : {false, true}) {
    std::vector<std::string> args = {kQcow, "attach", "--name", "ql2"};
    if (ro) args.push_back("--read-only");
    args.push_back(path);
    std::string out;
    const int st = Run(args, &out);
    CHECK(st != 0, "second attach (%s) succeeded", ro ? "read-only" : "read-write");
    CHECK(out.find("lock") != std::string::npos, "second attach failed without naming the lock: %s", out.c_str());
    CHECK(access("/dev/mapper/ql2", F_OK) != 0, "a failed attach left a device");
  }
  // QEMU refuses an image we attached read-write, as it refuses one another
  // QEMU writes; with -U (force-share) it may read it.
  std::string out;
  int st = Run({"/bin/qemu-io", "-f", "qcow2", "-c", "read 0 512", path}, &out);
  CHECK(st != 0 && out.find("Failed to get \"write\" lock") != std::string::npos,
        "qemu-io opened an image attached read-write (exit %d): %s", st, Tail(out).c_str());
  st = Run({"/bin/qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 512", path}, &out);
  CHECK(st == 0, "qemu-io -r -U refused (exit %d): %s", st, Tail(out).c_str());
  Run({kQcow, "list"}, &out);
  CHECK(out.find("ql ") != std::string::npos && out.find("attached") != std::string::npos, "list: %s", out.c_str());
  Detach("ql");
  // Read-only attaches share.
  Attach("ql", path, true);
  Attach("ql2", path, true);
  Detach("ql2");
  Detach("ql");

  // An image a running QEMU has open for writing cannot be attached.
  int to_qemu[2];
  CHECK(pipe(to_qemu) == 0, "pipe");
  const pid_t qemu = fork();
  if (qemu == 0) {
    dup2(to_qemu[0], 0);
    close(to_qemu[1]);
    const int null_fd = open("/dev/null", O_WRONLY);
    dup2(null_fd, 1);
    dup2(null_fd, 2);
    execl("/bin/qemu-io", "qemu-io", "-f", "qcow2", path.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(to_qemu[0]);
  bool refused = false;
  std::string said;
  for (int i = 0; i < 100 && !refused; i++) {  // until qemu-io holds the image
    SleepMs(100);
    refused = Run({kQcow, "attach", "--name", "ql3", path}, &said) != 0;
    if (!refused) Detach("ql3");
  }
  close(to_qemu[1]);  // qemu-io quits at end of input
  waitpid(qemu, nullptr, 0);
  CHECK(refused, "attach succeeded while qemu-io had the image open for writing");
  CHECK(said.find("lock") != std::string::npos, "refused without naming the lock: %s", said.c_str());
  // And once QEMU is gone, it attaches.
  Attach("ql3", path);
  Detach("ql3");
}

// True while `pid` is a live process (not exited, not a zombie).
bool ProcessLive(pid_t pid) {
  const std::string stat = ReadText("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && stat.size() > paren + 2 && stat[paren + 2] != 'Z';
}

// Every "pid": N of a state file, top level first.
std::vector<pid_t> StatePids(const std::string& text) {
  std::vector<pid_t> pids;
  for (size_t at = text.find("\"pid\":"); at != std::string::npos; at = text.find("\"pid\":", at + 1)) {
    pids.push_back(static_cast<pid_t>(std::atoll(text.c_str() + at + 6)));
  }
  return pids;
}

// detach after the daemons died never signals whatever process has their
// pid now. The daemons are SIGKILLed and an unrelated process is written
// into the state file as the top daemon, as if the kernel had handed the
// pid on: detach removes the dead daemons' devices, exits 0, and that
// process lives on. State files with garbage or missing fields, or from
// before the daemon's identity was recorded, give an error naming the file
// and signal nothing.
void TestDetachReusedPid() {
  FreshWork();
  const std::string path = std::string(kWork) + "/chain-top.qcow2";
  Attach("qp", path);
  {  // a second attach of the chain fails at its top (locked): the level it started below is stopped again
    std::string out;
    CHECK(Run({kQcow, "attach", "--name", "qp2", path}, &out) != 0, "second attach of %s succeeded", path.c_str());
    for (int i = 0; i < 100 && access("/dev/mapper/qp2-b1", F_OK) == 0; i++) SleepMs(50);
    CHECK(access("/dev/mapper/qp2-b1", F_OK) != 0, "a failed attach left /dev/mapper/qp2-b1: %s", Tail(out).c_str());
  }
  const std::string state_path = "/run/dmcow-qcow/qp.json";
  const std::string state = ReadText(state_path);
  const std::vector<pid_t> daemons = StatePids(state);
  CHECK(daemons.size() == 2, "expected 2 levels (qp, qp-b1) in %s", state.c_str());
  for (pid_t d : daemons) kill(d, SIGKILL);
  for (int i = 0; i < 200 && (ProcessLive(daemons[0]) || ProcessLive(daemons[1])); i++) SleepMs(50);
  CHECK(!ProcessLive(daemons[0]) && !ProcessLive(daemons[1]), "daemons still running after SIGKILL");

  // The unrelated process: a child that waits for a signal. It keeps none
  // of our descriptors (the harness reads our result pipe to its end), and
  // dies with the test, whichever way the test ends.
  const pid_t other = fork();
  if (other == 0) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    for (;;) pause();
  }
  CHECK(other > 0, "fork");
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reaper{other};
  auto other_alive = [&] { return ProcessLive(other); };  // a zombie is dead; the reaper reaps it
  const std::string top_pid = "\"pid\": " + std::to_string(daemons[0]);
  const size_t at = state.find(top_pid);
  CHECK(at != std::string::npos, "no '%s' in %s", top_pid.c_str(), state.c_str());
  std::string reused = state;
  reused.replace(at, top_pid.size(), "\"pid\": " + std::to_string(other));
  WriteText(state_path, reused);

  std::string out;
  int st = Run({kQcow, "detach", "qp"}, &out);
  const bool survived = other_alive();
  CHECK(survived, "detach signalled pid %d, which was not the daemon (detach exit %d: %s)", (int)other, st,
        Tail(out).c_str());
  CHECK(st == 0, "detach of the dead daemons' devices: exit %d: %s", st, Tail(out).c_str());
  for (const char* dev : {"/dev/mapper/qp", "/dev/mapper/qp-store", "/dev/mapper/qp-b1", "/dev/mapper/qp-b1-store"}) {
    CHECK(access(dev, F_OK) != 0, "%s left behind by detach", dev);
  }
  CHECK(access(state_path.c_str(), F_OK) != 0, "state file left behind by detach");

  // Damaged or old state files: exit 1, one line naming the damage (and
  // the file), no crash, nothing signalled (the pid given is `other`'s).
  const std::string pid = std::to_string(other);
  const std::string level = "{\"name\": \"qz\", \"pid\": " + pid + ", \"start_time\": \"1\"}";
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"garbage {", "damaged state file"},
      {"{\"levels\": 5}", "damaged state file"},
      {"{\"levels\": []}", "no levels recorded"},
      {"{\"levels\": [{\"name\": \"qz\", \"pid\": \"" + pid + "\"}]}", "pid"},
      {"{\"levels\": [{\"name\": \"qz\"}]}", "pid"},
      {"{\"levels\": [{\"pid\": " + pid + "}]}", "name"},
      {"{\"levels\": [{\"name\": \"../qz\", \"pid\": " + pid + "}]}", "qz-bN"},
      {"{\"levels\": [{\"name\": \"qz\", \"pid\": " + pid + ", \"start_time\": 7}]}", "start_time"},
      {"{\"levels\": [{\"name\": \"qz\", \"pid\": " + pid + ", \"start_time\": \"x1\"}]}", "start_time"},
      // Partition mappings only by the names attach gives them.
      {"{\"levels\": [" + level + "], \"partitions\": 5}", "\"partitions\" is not a list"},
      {"{\"levels\": [" + level + "], \"partitions\": [{\"name\": \"sda\", \"number\": 1}]}", "is not qz1"},
      {"{\"levels\": [" + level + "], \"partitions\": [{\"name\": \"qz1\", \"number\": 0}]}", "number"},
      {"{\"levels\": [" + level + "], \"partitions\": [{\"name\": \"qz1\", \"number\": \"1\"}]}", "number"},
      {"{\"levels\": [" + level + "], \"partitions\": [{\"name\": \"qz300\", \"number\": 300}]}", "number"},
      {"{\"levels\": [" + level + "], \"partitions\": [{\"number\": 2}]}", "is not qz2"},
      // From before start times were recorded: the pid cannot be confirmed.
      {"{\"name\": \"qz\", \"device\": \"/dev/mapper/qz\", \"levels\": [{\"name\": \"qz\", \"pid\": " + pid + "}]}",
       "not signalled"},
  };
  for (const auto& [text, says] : bad) {
    WriteText("/run/dmcow-qcow/qz.json", text);
    st = Run({kQcow, "detach", "qz"}, &out);
    const bool alive = other_alive();
    CHECK(alive, "detach with state '%s' signalled pid %d: %s", text.c_str(), (int)other, Tail(out).c_str());
    CHECK(st == 1 && out.find(says) != std::string::npos && out.find('\n') == out.size() - 1,
          "detach with state '%s': exit %d, expected 1 and one line naming '%s': %s", text.c_str(), st, says.c_str(),
          Tail(out).c_str());
    st = Run({kQcow, "list"}, &out);
    CHECK(st == 0 && out.find("qz ") != std::string::npos, "list with state '%s': exit %d: %s", text.c_str(), st,
          Tail(out).c_str());
  }
  unlink("/run/dmcow-qcow/qz.json");
}

// --read-only works on an image nobody may write: here on a read-only
// file system, where even root cannot (and scratch space goes elsewhere).
void TestReadOnlyFs() {
  const std::string dir = "/tmp/qcow-ro";
  mkdir(dir.c_str(), 0755);
  Must({"/bin/mount", "-t", "tmpfs", "tmpfs", dir});
  for (const char* f : {"zlib.qcow2", "chain-mid.qcow2", "chain-base.raw"})
    CopyFile(std::string(kIn) + "/" + f, dir + "/" + f);
  Must({"/bin/mount", "-o", "remount,ro", dir});
  std::string error;
  const auto manifest = Manifest();
  bool ok = true;
  for (const char* f : {"zlib.qcow2", "chain-mid.qcow2"}) {
    const std::string dev = Attach("qro", dir + "/" + f, true);
    const std::string sum = Sha256(dev);
    Detach("qro");
    if (sum != manifest.at(f)) ok = false, error = f;
  }
  std::string out;
  const int st = Run({kQcow, "attach", "--name", "qro", dir + "/zlib.qcow2"}, &out);
  Run({"/bin/umount", dir});
  CHECK(ok, "%s read through a read-only attach on a read-only file system differs", error.c_str());
  CHECK(st != 0, "a read-write attach of an image on a read-only file system succeeded");
}

// The scratch file's bound: a 32 MiB compressed image attached with a
// 4 MiB budget reads as qemu-img converts it, in order and in random
// O_DIRECT reads from two threads while the daemon reclaims (the kernel
// forgets the oldest copies under a suspend, their slots are reused); the
// scratch file never holds more than twice the budget and a run.
void TestScratchBudget() {
  FreshWork();
  const std::string path = std::string(kWork) + "/scratch.qcow2";
  std::string out;
  CHECK(Run({kQcow, "attach", "--read-only", "--name", "qb", "--scratch-max", "4M", path}, &out) == 0, "attach: %s",
        Tail(out).c_str());
  const std::string dev = "/dev/mapper/qb";
  // The scratch file: the daemon's unlinked file, or its memfd.
  const std::string fds = "/proc/" + std::to_string(DaemonPid("qb")) + "/fd";
  auto scratch_bytes = [&]() -> uint64_t {
    std::string ls;
    Run({"/bin/sh", "-c", "for f in " + fds + "/*; do echo \"$f $(readlink $f)\"; done"}, &ls);
    std::istringstream in(ls);
    std::string fd, target;
    while (in >> fd && std::getline(in, target)) {
      if (target.find("(deleted)") == std::string::npos && target.find("memfd:") == std::string::npos) continue;
      struct stat st;
      CHECK(stat(fd.c_str(), &st) == 0, "stat %s", fd.c_str());
      return static_cast<uint64_t>(st.st_blocks) * 512;
    }
    CHECK(false, "no scratch file among the daemon's files: %s", ls.c_str());
    return 0;
  };
  const uint64_t bound = 2 * (4 << 20) + (2 << 20);
  // In order: the whole device as qemu-img converts it.
  CHECK(Sha256(dev) == Manifest()["scratch.qcow2"], "scratch.qcow2 read in order differs");
  const uint64_t after_order = scratch_bytes();
  CHECK(after_order <= bound, "scratch holds %llu bytes after reading 32 MiB in order (budget 4 MiB)",
        static_cast<unsigned long long>(after_order));
  // Random 4 KiB O_DIRECT reads, two threads: cluster i holds i % 251 + 1,
  // then i / 251 + 1 (qcow_inputs.sh), unique to it.
  std::atomic<int> bad{0};
  std::string first_bad;
  std::mutex mu;
  auto reader = [&](uint64_t seed) {
    int fd = open(dev.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
      bad++;
      return;
    }
    Buf buf(4096);
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 2500 && bad == 0; i++) {
      const uint64_t off = rng() % ((32 << 20) / 4096) * 4096;
      const uint64_t cluster = off / 65536;
      const uint8_t want = static_cast<uint8_t>(off % 65536 < 32768 ? cluster % 251 + 1 : cluster / 251 + 1);
      const ssize_t n = pread(fd, buf.data(), 4096, static_cast<off_t>(off));
      const uint8_t* b = buf.bytes();
      if (n != 4096 || std::count(b, b + 4096, want) != 4096) {
        std::lock_guard<std::mutex> l(mu);
        if (bad++ == 0)
          first_bad =
              Fmt("offset %llu: read %zd, byte 0 is %u, want %u", static_cast<unsigned long long>(off), n, b[0], want);
      }
    }
    close(fd);
  };
  std::thread t1(reader, 1), t2(reader, 2);
  t1.join();
  t2.join();
  CHECK(bad == 0, "random reads under reclaim: %d bad, first: %s", bad.load(), first_bad.c_str());
  const uint64_t after_random = scratch_bytes();
  CHECK(after_random <= bound, "scratch holds %llu bytes after the random reads (budget 4 MiB)",
        static_cast<unsigned long long>(after_random));
  // Again in order, from the device, not from the page cache of the first pass.
  WriteText("/proc/sys/vm/drop_caches", "3\n");
  CHECK(Sha256(dev) == Manifest()["scratch.qcow2"], "scratch.qcow2 read in order again differs");
  Detach("qb");
  std::printf("scratch after reading in order: %llu KiB, after random reads: %llu KiB (budget 4096 KiB)\n",
              static_cast<unsigned long long>(after_order >> 10), static_cast<unsigned long long>(after_random >> 10));
}

// ---- files named by an image, one open per file (issue 15) --------------------

// A refused attach leaves no device, helper device or state behind.
void CheckNothingAttached(const std::string& name) {
  for (const std::string& n :
       {name, name + "-store", name + "-base", name + "-b1", name + "-b1-store", name + "-b1-base"}) {
    CHECK(access(("/dev/mapper/" + n).c_str(), F_OK) != 0, "a refused attach left /dev/mapper/%s", n.c_str());
  }
  CHECK(access(("/run/dmcow-qcow/" + name + ".json").c_str(), F_OK) != 0, "a refused attach left its state");
}

// attach with a time limit: a file it must refuse must never block it.
int AttachRun(const std::vector<std::string>& opts, std::string* out) {
  std::vector<std::string> args = {"/bin/timeout", "20", kQcow, "attach"};
  args.insert(args.end(), opts.begin(), opts.end());
  return Run(args, out);
}

bool ProcessGone(pid_t pid) {
  const std::string stat = ReadText("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return stat.empty() || (paren != std::string::npos && stat.size() > paren + 2 && stat[paren + 2] == 'Z');
}

// Every byte of [off, off + len) of the open device is `want`.
void CheckBytes(int fd, uint64_t off, uint64_t len, uint8_t want, const std::string& what) {
  std::vector<uint8_t> buf(65536);
  for (uint64_t at = off; at < off + len;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), off + len - at));
    CHECK(pread(fd, buf.data(), n, static_cast<off_t>(at)) == static_cast<ssize_t>(n), "%s: read at %llu", what.c_str(),
          static_cast<unsigned long long>(at));
    for (size_t i = 0; i < n; i++) {
      CHECK(buf[i] == want, "%s: byte %llu is 0x%02x, want 0x%02x", what.c_str(),
            static_cast<unsigned long long>(at + i), buf[i], want);
    }
    at += n;
  }
}

// SIGKILL of the daemon leaves the device (its folded segments write the
// image through the loop device): the QEMU lock must stay as long as that,
// so QEMU (and a second attach) cannot open the image for writing under it.
// The lock lives on the loop's own open file; detach removes the devices,
// the loop lets the file go, and with it the lock.
void TestLockAfterKill() {
  FreshWork();
  const std::string path = std::string(kWork) + "/v2.qcow2";
  Attach("qlk", path);
  const pid_t daemon = DaemonPid("qlk");
  CHECK(kill(daemon, SIGKILL) == 0, "kill %d: %s", daemon, strerror(errno));
  for (int i = 0; i < 200 && !ProcessGone(daemon); i++) SleepMs(50);
  CHECK(ProcessGone(daemon), "dmcowd %d still runs after SIGKILL", daemon);
  std::string out;
  int st = Run({"/bin/qemu-io", "-f", "qcow2", "-c", "read 0 512", path}, &out);
  CHECK(st != 0 && out.find("Failed to get \"write\" lock") != std::string::npos,
        "qemu-io opened for writing an image whose device is still there (daemon killed): exit %d: %s", st,
        Tail(out).c_str());
  st = Run({kQcow, "attach", "--name", "qlk2", path}, &out);
  CHECK(st != 0 && out.find("lock") != std::string::npos,
        "a second read-write attach of it succeeded or failed without naming the lock: exit %d: %s", st,
        Tail(out).c_str());
  CheckNothingAttached("qlk2");
  Detach("qlk");
  for (int i = 0; i < 30; i++) {  // the loop device lets go of the file once the tables do
    st = Run({"/bin/qemu-io", "-f", "qcow2", "-c", "read 0 512", path}, &out);
    if (st == 0) break;
    SleepMs(100);
  }
  CHECK(st == 0, "qemu-io still refused after detach: %s", Tail(out).c_str());
}

// Holds every opener of one file at its open (fanotify permission events)
// and, at the first, runs `swap` while that opener waits: a name changed
// between two opens, deterministically.
class SwapAtFirstOpen {
 public:
  SwapAtFirstOpen(const std::string& file, std::function<void()> swap) : swap_(std::move(swap)) {
    fan_ = fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, O_RDONLY | O_LARGEFILE);
    CHECK(fan_ >= 0, "fanotify_init: %s", strerror(errno));
    CHECK(fanotify_mark(fan_, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, file.c_str()) == 0, "fanotify_mark %s: %s",
          file.c_str(), strerror(errno));
    thread_ = std::thread([this] { Loop(); });
  }
  ~SwapAtFirstOpen() {
    stop_ = true;
    thread_.join();
    close(fan_);  // also allows whatever still waits
  }
  int opens() const { return opens_; }

 private:
  void Loop() {
    while (!stop_) {
      pollfd p{fan_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      alignas(fanotify_event_metadata) char buf[4096];
      ssize_t n = read(fan_, buf, sizeof(buf));
      for (auto* m = reinterpret_cast<fanotify_event_metadata*>(buf); n > 0 && FAN_EVENT_OK(m, n);
           m = FAN_EVENT_NEXT(m, n)) {
        if (m->mask & FAN_OPEN_PERM) {
          if (opens_++ == 0) swap_();
          fanotify_response r{m->fd, FAN_ALLOW};
          (void)!write(fan_, &r, sizeof(r));
        }
        if (m->fd >= 0) close(m->fd);
      }
    }
  }
  std::function<void()> swap_;
  int fan_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> opens_{0};
  std::thread thread_;
};

// No name is resolved twice. The user who owns an image's directory swaps
// it for a symbolic link to another directory (another image of the same
// name) while attach opens the image: the opener waits on a fanotify
// permission event meanwhile. The device must be the file attach opened:
// its content, its loop device's file, and writes land in it, never in the
// other file. Before one open per file, the daemon opened the path three
// more times and served the other image.
void TestOneOpen() {
  const std::string dir = "/tmp/qcow-swap";
  Run({"/bin/rm", "-rf", dir});
  CHECK(mkdir(dir.c_str(), 0755) == 0 && mkdir((dir + "/d").c_str(), 0755) == 0 &&
            mkdir((dir + "/evil").c_str(), 0755) == 0,
        "mkdir %s", dir.c_str());
  Must({"/bin/cp", std::string(kIn) + "/v2.qcow2", dir + "/d/img.qcow2"});
  Must({"/bin/cp", std::string(kIn) + "/zlib.qcow2", dir + "/evil/img.qcow2"});
  const std::string evil_sum = Sha256(dir + "/evil/img.qcow2");
  const auto manifest = Manifest();
  std::atomic<bool> swapped{false};
  {
    SwapAtFirstOpen watch(dir + "/d/img.qcow2", [&] {
      swapped =
          rename((dir + "/d").c_str(), (dir + "/d.orig").c_str()) == 0 && symlink("evil", (dir + "/d").c_str()) == 0;
    });
    const std::string dev = Attach("qso", dir + "/d/img.qcow2");
    CHECK(watch.opens() >= 1 && swapped, "the directory was not swapped during the attach (%d opens)", watch.opens());
    CHECK(Sha256(dev) == manifest.at("v2.qcow2"),
          "the device serves another file than the one attach opened (a name resolved again after the swap)");
    CHECK(CheckLinearOntoImage("qso", dir + "/d.orig/img.qcow2") > 0, "no linear target onto the image's loop");
    const int fd = open(dev.c_str(), O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0, "open %s", dev.c_str());
    std::vector<uint8_t> pattern(65536, 0x5a);
    CHECK(pwrite(fd, pattern.data(), pattern.size(), 0) == static_cast<ssize_t>(pattern.size()) && fsync(fd) == 0,
          "write through %s: %s", dev.c_str(), strerror(errno));
    close(fd);
    Detach("qso");
  }
  CHECK(Sha256(dir + "/evil/img.qcow2") == evil_sum, "the other image was written through the device");
  const std::string dev = Attach("qso", dir + "/d.orig/img.qcow2", true);
  const int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "open %s", dev.c_str());
  CheckBytes(fd, 0, 65536, 0x5a, "the image attach opened, after the write");
  close(fd);
  Detach("qso");
  Run({"/bin/rm", "-rf", dir});
}

// A backing file that is not a regular file: a FIFO, a character device
// (never opened, so never blocking), a block device: refused with the
// image and the file named, nothing attached; --allow-device-backing lets
// the block device in (LVM users), and it reads right; nothing lets the
// others in.
void TestOddBacking() {
  FreshWork();
  const std::string img = std::string(kWork) + "/odd.qcow2", base = std::string(kWork) + "/odd-base";
  auto refused = [&](const std::vector<std::string>& opts, const char* type) {
    std::vector<std::string> args = {"--name", "qod"};
    args.insert(args.end(), opts.begin(), opts.end());
    args.push_back(img);
    std::string out;
    const auto t0 = Clock::now();
    const int st = AttachRun(args, &out);
    CHECK(st == 1, "attach of an image whose backing file is %s: exit %d after %ld ms (want 1): %s", type, st,
          MsSince(t0), Tail(out).c_str());
    const std::string want = img + ": backing file '" + base + "' is " + type;
    CHECK(out.find(want) != std::string::npos, "message does not say '%s': %s", want.c_str(), Tail(out).c_str());
    CheckNothingAttached("qod");
    return out;
  };
  CHECK(mkfifo(base.c_str(), 0644) == 0, "mkfifo: %s", strerror(errno));
  refused({}, "a FIFO");
  refused({"--allow-device-backing"}, "a FIFO");
  unlink(base.c_str());
  CHECK(symlink("/dev/null", base.c_str()) == 0, "symlink");
  refused({"--allow-device-backing"}, "a character device");
  // A block device: a loop device over a file of 0xb2.
  const std::string raw = "/tmp/qcow-odd-dev.raw";
  WriteText(raw, std::string(4 << 20, '\xb2'));
  const int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  const int n = ctl < 0 ? -1 : ioctl(ctl, LOOP_CTL_GET_FREE);
  if (ctl >= 0) close(ctl);
  CHECK(n >= 0, "no free loop device: %s", strerror(errno));
  const std::string loop = "/dev/loop" + std::to_string(n);
  const int lfd = open(loop.c_str(), O_RDWR | O_CLOEXEC), ffd = open(raw.c_str(), O_RDWR | O_CLOEXEC);
  CHECK(lfd >= 0 && ffd >= 0 && ioctl(lfd, LOOP_SET_FD, ffd) == 0, "loop device over %s: %s", raw.c_str(),
        strerror(errno));
  close(ffd);
  unlink(base.c_str());
  CHECK(symlink(loop.c_str(), base.c_str()) == 0, "symlink");
  const std::string said = refused({}, "a block device");
  CHECK(said.find("--allow-device-backing") != std::string::npos, "the refusal does not name the option: %s",
        said.c_str());
  std::string out;
  const int st = AttachRun({"--name", "qod", "--allow-device-backing", img}, &out);
  CHECK(st == 0 && out == "/dev/mapper/qod\n", "attach --allow-device-backing: exit %d: %s", st, Tail(out).c_str());
  const int fd = open("/dev/mapper/qod", O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "open /dev/mapper/qod");
  CheckBytes(fd, 0, 65536, 0xa1, "the image's own cluster");
  CheckBytes(fd, 65536, (4 << 20) - 65536, 0xb2, "the block device under it");
  close(fd);
  Detach("qod");
  ioctl(lfd, LOOP_CLR_FD, 0);
  close(lfd);
  unlink(raw.c_str());
}

// --no-backing: the top image alone, its unallocated clusters read zeros
// where the chain below holds data (chain-top.qcow2: 0x53 at 1536 KiB,
// 1 MiB long, and the cluster at 7 MiB: 0x54 for 3 KiB, then the 0x51 qemu
// copied from below; the rest is chain-mid's and chain-base's, 0x51 and
// 0x52 everywhere), and no device for the levels below.
void TestNoBacking() {
  FreshWork();
  const std::string path = std::string(kWork) + "/chain-top.qcow2";
  std::string out;
  const int st = AttachRun({"--name", "qnb", "--no-backing", path}, &out);
  CHECK(st == 0 && out == "/dev/mapper/qnb\n", "attach --no-backing: exit %d: %s", st, Tail(out).c_str());
  CHECK(access("/dev/mapper/qnb-b1", F_OK) != 0, "--no-backing attached the backing image too");
  const int fd = open("/dev/mapper/qnb", O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "open /dev/mapper/qnb");
  CheckBytes(fd, 0, 1536 << 10, 0, "unallocated, below 1536 KiB");
  CheckBytes(fd, 1536 << 10, 1 << 20, 0x53, "the image's data");
  CheckBytes(fd, 2560 << 10, (7 << 20) - (2560 << 10), 0, "unallocated, 2560 KiB to 7 MiB");
  CheckBytes(fd, 7 << 20, 3 << 10, 0x54, "the image's data at 7 MiB");
  // The rest of that cluster is the image's too: qemu-io copied the backing's 0x51 into it.
  CheckBytes(fd, (7 << 20) + (3 << 10), 61 << 10, 0x51, "the rest of the image's cluster at 7 MiB");
  CheckBytes(fd, (7 << 20) + (64 << 10), (1 << 20) - (64 << 10), 0, "unallocated, after 7 MiB + 64 KiB");
  close(fd);
  Detach("qnb");
}

// --read-only opens nothing for writing: each daemon's descriptors onto the
// chain's files are read-only, so are the loop devices over them; a write to
// the device fails; every file of the chain (image, qcow2 backing, raw
// bottom) keeps its bytes, mtime and ctime. Bad command lines: exit 2,
// nothing attached.
void TestReadOnlyUntouched() {
  FreshWork();
  const std::vector<std::string> files = {std::string(kWork) + "/chain-top.qcow2",
                                          std::string(kWork) + "/chain-mid.qcow2",
                                          std::string(kWork) + "/chain-base.raw"};
  std::vector<std::string> sums;
  std::vector<struct stat> before(files.size());
  for (size_t i = 0; i < files.size(); i++) {
    sums.push_back(Sha256(files[i]));
    CHECK(stat(files[i].c_str(), &before[i]) == 0, "stat %s", files[i].c_str());
  }
  std::string out;
  int st = AttachRun({"--name", "qrd", "--read-only", files[0]}, &out);
  CHECK(st == 0 && out == "/dev/mapper/qrd\n", "attach --read-only: exit %d: %s", st, Tail(out).c_str());
  CHECK(Sha256("/dev/mapper/qrd") == Manifest().at("chain-top.qcow2"), "chain-top.qcow2 read-only reads wrong");
  // Every daemon: no descriptor onto a file of the chain is open for writing.
  const std::string state = ReadText("/run/dmcow-qcow/qrd.json");
  int daemons = 0;
  for (size_t at = state.find("\"pid\":"); at != std::string::npos; at = state.find("\"pid\":", at + 1)) {
    const std::string fds = "/proc/" + std::to_string(std::atoll(state.c_str() + at + 6)) + "/fd";
    daemons++;
    std::string ls;
    Run({"/bin/sh", "-c", "for f in " + fds + "/*; do echo \"${f##*/} $(readlink $f)\"; done"}, &ls);
    std::istringstream in(ls);
    std::string fd, target;
    while (in >> fd && std::getline(in, target)) {
      target.erase(0, target.find_first_not_of(' '));
      if (std::find(files.begin(), files.end(), target) == files.end()) continue;
      const std::string info = ReadText(fds.substr(0, fds.size() - 2) + "fdinfo/" + fd);
      const size_t f = info.find("flags:");
      CHECK(f != std::string::npos && (std::strtol(info.c_str() + f + 6, nullptr, 8) & O_ACCMODE) == O_RDONLY,
            "a daemon has %s open for writing (fd %s): %s", target.c_str(), fd.c_str(), info.c_str());
    }
  }
  CHECK(daemons == 2, "%d daemons for a chain of two qcow2 levels", daemons);
  std::string loops;
  Run({"/bin/sh", "-c",
       "for l in /sys/block/loop*; do [ -f $l/loop/backing_file ] && echo \"$(cat $l/ro) $(cat "
       "$l/loop/backing_file)\"; done"},
      &loops);
  for (const std::string& f : files) {
    const size_t at = loops.find(" " + f + "\n");
    CHECK(at == std::string::npos || (at > 0 && loops[at - 1] == '1'), "a loop device over %s is writable: %s",
          f.c_str(), loops.c_str());
  }
  const int fd = open("/dev/mapper/qrd", O_WRONLY | O_DIRECT | O_CLOEXEC);
  if (fd >= 0) {
    Buf buf(4096);
    memset(buf.data(), 0x77, 4096);
    const ssize_t w = pwrite(fd, buf.data(), 4096, 0);
    close(fd);
    CHECK(w < 0, "a write to a read-only attached device succeeded");
  }
  Detach("qrd");
  for (size_t i = 0; i < files.size(); i++) {
    struct stat after;
    CHECK(stat(files[i].c_str(), &after) == 0, "stat %s", files[i].c_str());
    CHECK(Sha256(files[i]) == sums[i], "%s changed by a read-only attach", files[i].c_str());
    CHECK(after.st_mtim.tv_sec == before[i].st_mtim.tv_sec && after.st_mtim.tv_nsec == before[i].st_mtim.tv_nsec &&
              after.st_ctim.tv_sec == before[i].st_ctim.tv_sec && after.st_ctim.tv_nsec == before[i].st_ctim.tv_nsec,
          "%s: mtime or ctime changed by a read-only attach", files[i].c_str());
  }
  // Bad command lines.
  for (const std::vector<std::string>& bad :
       std::vector<std::vector<std::string>>{{"--name", "qrd", "--bogus", files[0]},
                                             {"--name", "qrd", "--no-backing=1", files[0]},
                                             {"--name", "qrd", "--read-only"},
                                             {"--name", "q/rd", "--read-only", files[0]}}) {
    st = AttachRun(bad, &out);
    CHECK(st == 2, "attach %s ...: exit %d (want 2): %s", bad[2].c_str(), st, Tail(out).c_str());
    CHECK(out.find("dmcow-qcow: ") != std::string::npos, "no message: %s", out.c_str());
    CheckNothingAttached("qrd");
  }
}

// The kernel's mapping store of a dm-cow device ("dmsetup status": entries
// first; with the bound, cached entries, their bound and those dropped are
// appended after the daemon state).
struct Store {
  uint64_t mapped = 0, cached = 0, cache_max = 0, dropped = 0;
  bool has_cache = false;
};
Store StoreOf(const std::string& name) {
  std::string out;
  CHECK(Run({"/sbin/dmsetup", "status", name}, &out) == 0, "dmsetup status %s: %s", name.c_str(), out.c_str());
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string start, len, type, daemon;
    Store s;
    uint64_t skip;
    f >> start >> len >> type;
    if (type != "cow") continue;
    f >> s.mapped >> skip >> skip >> skip >> skip >> skip >> skip >> skip >> daemon;
    CHECK(!f.fail(), "%s: status line '%s'", name.c_str(), line.c_str());
    s.has_cache = static_cast<bool>(f >> s.cached >> s.cache_max >> s.dropped);
    return s;
  }
  CHECK(false, "%s: no cow target in the status: %s", name.c_str(), out.c_str());
  return Store();
}

// Kernel memory stays bounded whatever is read: a 16 GiB sparse qcow2 over a
// 16 GiB sparse qcow2 backing (64 KiB clusters: 262,144 chunks each, 16 times
// the VM's memory) read from end to end, 4 KiB at every MiB. Every read of an
// unallocated chunk asks the daemon, which answers BASE (the top) or ZERO (the
// backing) for up to 4,096 chunks; the kernel used to keep one entry per
// chunk for good (~9 bytes each: 2.4 GiB for 16 TiB). Now each store holds at
// most cache_chunks (65,536) such entries plus the few allocated chunks read
// before a reload folded them, and drops older ones. The data read is right
// at clusters far apart: the top's, the backing's, zero clusters in either.
// Then writes under a tiny cache (below).
void TestCacheBound() {
  FreshWork();
  const std::string path = std::string(kWork) + "/sparse-top.qcow2";
  const uint64_t size = uint64_t{16} << 30, G = uint64_t{1} << 30;
  const std::string dev = Attach("qs", path);
  // qcow_inputs.sh: what each 64 KiB cluster reads.
  auto expect = [&](uint64_t off) -> uint8_t {
    const uint64_t c = off & ~uint64_t{0xffff};
    if (c == 0) return 0xa1;
    if (c == 5 * G) return 0xb1;
    if (c == 10 * G) return 0xa2;
    if (c == size - 65536) return 0xb2;
    return 0;  // 6 GiB: the top's zero cluster over the backing's 0xa3
  };
  const auto t0 = std::chrono::steady_clock::now();
  int fd = open(dev.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  CHECK(fd >= 0, "open %s", dev.c_str());
  Buf buf(4096);
  std::vector<uint64_t> offsets;
  for (uint64_t off = 0; off < size; off += 1 << 20) offsets.push_back(off);
  for (uint64_t off : {5 * G + 61440, 6 * G + 4096, 12 * G + 65536, size - 65536, size - 4096}) offsets.push_back(off);
  for (uint64_t off : offsets) {
    const ssize_t n = pread(fd, buf.data(), 4096, static_cast<off_t>(off));
    const uint8_t* b = buf.bytes();
    const uint8_t want = expect(off);
    if (n != 4096 || std::count(b, b + 4096, want) != 4096) close(fd);
    CHECK(n == 4096, "read at %llu: %zd (%s)", static_cast<unsigned long long>(off), n, strerror(errno));
    CHECK(std::count(b, b + 4096, want) == 4096, "offset %llu: byte 0 is %#x, want %#x",
          static_cast<unsigned long long>(off), b[0], want);
  }
  close(fd);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string param_path = "/sys/module/dm_cow/parameters/cache_chunks";
  const std::string param = ReadText(param_path);
  const uint64_t cache = param.empty() ? 65536 : std::stoull(param);  // the default
  const uint64_t bound = cache + 64;
  const Store stores[2] = {StoreOf("qs"), StoreOf("qs-b1")};
  std::printf(
      "read 16 GiB sparse at every MiB in %.1f s; entries in the kernel's store: qs %llu, qs-b1 %llu (bound %llu)\n",
      secs, static_cast<unsigned long long>(stores[0].mapped), static_cast<unsigned long long>(stores[1].mapped),
      static_cast<unsigned long long>(bound));
  for (int i = 0; i < 2; i++) {
    const Store& st = stores[i];
    const char* name = i ? "qs-b1" : "qs";
    CHECK(st.mapped <= bound, "%s: the kernel's store holds %llu entries after reading 16 GiB (bound %llu)", name,
          static_cast<unsigned long long>(st.mapped), static_cast<unsigned long long>(bound));
    CHECK(st.has_cache, "%s: no cache figures in the status", name);
    CHECK(st.cached <= st.cache_max && st.cache_max == cache && st.dropped > 0, "%s: %llu cached of %llu, %llu dropped",
          name, static_cast<unsigned long long>(st.cached), static_cast<unsigned long long>(st.cache_max),
          static_cast<unsigned long long>(st.dropped));
  }
  Detach("qs");

  // Seeded writes through the daemon while mappings are dropped all the
  // time (a cache of 16 chunks), over an image with zero clusters over a
  // backing file (extended L2, 128 KiB clusters): whole-chunk writes to
  // those are zeroed by the daemon, never filled from the backing; the host
  // checks the image with qemu-img check and compare.
  struct Restore {
    std::string path, value;
    ~Restore() { WriteText(path, value); }
  } restore{param_path, param};
  WriteText(param_path, "16\n");
  Must({"/bin/cp", std::string(kWork) + "/extl2.qcow2", std::string(kWork) + "/cache-extl2.qcow2"});
  WriteSeeded("cache-extl2.qcow2", 15);
}

// The image served by nbdkit with our plugin (nbdkit/) to the kernel's NBD
// client over two connections (multi-conn): ext4 made, written, checked and
// read back through it; nbdkit stopped; the host checks the image clean
// and e2fsck's its content as qemu-img reads it.
void TestNbd() {
  FreshWork();
  const std::string path = std::string(kWork) + "/fs.qcow2";
  const char* const sock = "/tmp/nbd.sock";
  const char* const pidfile = "/tmp/nbd.pid";
  unlink(pidfile);
  Must({"/bin/nbdkit", "-U", sock, "-P", pidfile, "/lib/nbdkit-dmcow-plugin.so", path});
  pid_t pid = 0;
  for (int i = 0; i < 200 && pid <= 0; i++) {
    pid = static_cast<pid_t>(std::atoll(ReadText(pidfile).c_str()));
    if (pid <= 0) usleep(50000);
  }
  CHECK(pid > 0, "nbdkit wrote no pid file");
  std::string out;
  const int st = Run({"/sbin/nbd-client", "-unix", sock, "/dev/nbd0", "-C", "2"}, &out);
  CHECK(st == 0, "nbd-client: exit %d: %s", st, Tail(out).c_str());
  // Two connections: nbdkit holds its listening socket and two more.
  std::string fds;
  Run({"/bin/sh", "-c", Fmt("ls -l /proc/%d/fd | grep -c socket:", static_cast<int>(pid))}, &fds);
  const int sockets = std::atoi(fds.c_str());
  CHECK(sockets == 3, "nbdkit holds %d sockets, not 3 (one listening, two connections)", sockets);
  Must({"/sbin/mke2fs", "-q", "-F", "-t", "ext4", "/dev/nbd0"});
  mkdir("/tmp/nbd-mnt", 0755);
  CHECK(mount("/dev/nbd0", "/tmp/nbd-mnt", "ext4", 0, nullptr) == 0, "mount /dev/nbd0: %s", strerror(errno));
  std::mt19937_64 rng(7);
  std::vector<std::string> contents;
  for (int i = 0; i < 6; i++) {
    std::string text;
    const size_t n = 1000 + rng() % 3000000;
    for (size_t j = 0; j < n; j++) text += static_cast<char>('a' + (rng() % 26));
    contents.push_back(text);
    WriteText(Fmt("/tmp/nbd-mnt/f%d", i), text);
  }
  CHECK(umount("/tmp/nbd-mnt") == 0, "umount: %s", strerror(errno));
  Must({"/sbin/e2fsck", "-fn", "/dev/nbd0"});
  CHECK(mount("/dev/nbd0", "/tmp/nbd-mnt", "ext4", MS_RDONLY, nullptr) == 0, "mount: %s", strerror(errno));
  bool same = true;
  for (int i = 0; i < 6; i++) same = same && ReadText(Fmt("/tmp/nbd-mnt/f%d", i)) == contents[i];
  CHECK(umount("/tmp/nbd-mnt") == 0, "umount: %s", strerror(errno));
  CHECK(same, "a file differs when read back over NBD");
  CHECK(Run({"/sbin/nbd-client", "-d", "/dev/nbd0"}, &out) == 0, "nbd-client -d: %s", Tail(out).c_str());
  // nbdkit closes the image (a flush) when it exits.
  CHECK(kill(pid, SIGTERM) == 0, "kill nbdkit: %s", strerror(errno));
  for (int i = 0; i < 200 && !ProcessGone(pid); i++) usleep(50000);
  CHECK(ProcessGone(pid), "nbdkit did not exit on SIGTERM");
  CopyFile(path, std::string(kOut) + "/nbd.qcow2");
  AddCheck("fs nbd.qcow2 -");
}

// Partitioned images made on the host (sfdisk, mke2fs): the partitions are
// there when attach returns, named, numbered and identified as kpartx does;
// they mount, read the host's files and take writes (checked on the host:
// qemu-img check, e2fsck, the files); detach refuses while one is mounted,
// removes them first, and a table that does not fit the disk maps the rest.
uint64_t DeviceBytes(const std::string& dev) {
  const int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "%s missing: %s", dev.c_str(), strerror(errno));
  uint64_t bytes = 0;
  CHECK(ioctl(fd, BLKGETSIZE64, &bytes) == 0, "BLKGETSIZE64 %s", dev.c_str());
  close(fd);
  return bytes;
}

std::string DmUuid(const std::string& name) {
  std::string out;
  CHECK(Run({"/sbin/dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name}, &out) == 0, "dmsetup info %s: %s",
        name.c_str(), out.c_str());
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// Mounts the partition, checks the host's file, writes one for the host
// (for the host check of `copy`, the name the image goes out as).
void MountReadWrite(const std::string& dev, const std::string& image, int number, std::string copy = "") {
  if (copy.empty()) copy = image;
  mkdir("/tmp/qp-mnt", 0755);
  CHECK(mount(dev.c_str(), "/tmp/qp-mnt", "ext4", 0, nullptr) == 0, "mount %s: %s", dev.c_str(), strerror(errno));
  const std::string hello = ReadText("/tmp/qp-mnt/hello");
  WriteText("/tmp/qp-mnt/from-vm", Fmt("written in the VM to %s partition %d\n", copy.c_str(), number));
  CHECK(umount("/tmp/qp-mnt") == 0, "umount %s: %s", dev.c_str(), strerror(errno));
  CHECK(hello == Fmt("%s partition %d\n", image.c_str(), number), "%s: hello reads '%s'", dev.c_str(), hello.c_str());
}

void TestPartitions() {
  FreshWork();
  std::string out;
  // GPT, a name that does not end in a digit: gpt1, gpt2.
  const std::string gpt = std::string(kWork) + "/gpt.qcow2";
  Attach("gpt", gpt);
  CHECK(DmUuid("gpt") == "DMCOW-QCOW-gpt", "uuid of gpt: %s", DmUuid("gpt").c_str());
  const uint64_t gpt_sizes[] = {32768 * 512, 40960 * 512};
  for (int n = 1; n <= 2; n++) {
    const std::string dev = Fmt("/dev/mapper/gpt%d", n);
    CHECK(DeviceBytes(dev) == gpt_sizes[n - 1], "%s: %llu bytes", dev.c_str(), (unsigned long long)DeviceBytes(dev));
    CHECK(DmUuid(Fmt("gpt%d", n)) == Fmt("part%d-DMCOW-QCOW-gpt", n), "uuid of gpt%d", n);
    MountReadWrite(dev, "gpt.qcow2", n);
  }
  CHECK(access("/dev/mapper/gpt3", F_OK) != 0, "gpt3 mapped");
  CHECK(Run({kQcow, "list"}, &out) == 0 && out.find("/dev/mapper/gpt2") != std::string::npos &&
            out.find("partition of gpt") != std::string::npos,
        "list: %s", out.c_str());
  CHECK(Run({kQcow, "list", "--output", "json"}, &out) == 0 && out.find("\"start_sector\": 34816") != std::string::npos,
        "list json: %s", out.c_str());
  // Mounted: detach refuses and removes nothing.
  CHECK(mount("/dev/mapper/gpt2", "/tmp/qp-mnt", "ext4", MS_RDONLY, nullptr) == 0, "mount: %s", strerror(errno));
  const int busy = Run({kQcow, "detach", "gpt"}, &out);
  const bool all_there = access("/dev/mapper/gpt1", F_OK) == 0 && access("/dev/mapper/gpt", F_OK) == 0;
  CHECK(umount("/tmp/qp-mnt") == 0, "umount: %s", strerror(errno));
  CHECK(busy == 1 && out.find("/dev/mapper/gpt2 is in use") != std::string::npos, "detach while mounted: %d %s", busy,
        out.c_str());
  CHECK(all_there, "detach removed devices while a partition was mounted");
  Detach("gpt");
  CHECK(access("/dev/mapper/gpt1", F_OK) != 0 && access("/dev/mapper/gpt2", F_OK) != 0, "partitions left after detach");
  CopyFile(gpt, std::string(kOut) + "/gpt.qcow2");
  AddCheck("parts gpt.qcow2 1,2");

  // MBR, a name ending in a digit: mbr0p1, the extended mbr0p2 (1 KiB), logical mbr0p5 and mbr0p6.
  const std::string mbr = std::string(kWork) + "/mbr.qcow2";
  Attach("mbr0", mbr);
  CHECK(DeviceBytes("/dev/mapper/mbr0p2") == 1024, "the extended partition maps its first 1 KiB");
  CHECK(access("/dev/mapper/mbr0p3", F_OK) != 0 && access("/dev/mapper/mbr01", F_OK) != 0, "wrong names");
  for (int n : {1, 5, 6}) MountReadWrite(Fmt("/dev/mapper/mbr0p%d", n), "mbr.qcow2", n);
  Detach("mbr0");
  for (int n : {1, 2, 5, 6}) CHECK(access(Fmt("/dev/mapper/mbr0p%d", n).c_str(), F_OK) != 0, "mbr0p%d left", n);
  CopyFile(mbr, std::string(kOut) + "/mbr.qcow2");
  AddCheck("parts mbr.qcow2 1,5,6");

  // Read-only: the partitions too. --no-partitions: none.
  Attach("gpt", gpt, true);
  int ro = 0;
  const int fd = open("/dev/mapper/gpt1", O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0 && ioctl(fd, BLKROGET, &ro) == 0 && ro == 1, "gpt1 of a read-only attach is writable");
  close(fd);
  Detach("gpt");
  Attach("gpt", gpt, false, {"--no-partitions"});
  CHECK(access("/dev/mapper/gpt1", F_OK) != 0, "--no-partitions mapped gpt1");
  Detach("gpt");

  // Entry 2 lies past the end of the disk: partition 1 alone, and a warning.
  CHECK(Run({kQcow, "attach", "--name", "bad", std::string(kWork) + "/mbr-bad.qcow2"}, &out) == 0, "attach: %s",
        out.c_str());
  CHECK(out.find("warning: /dev/mapper/bad: partition 2 (sectors 1073760256+16384) does not lie within the device") !=
            std::string::npos,
        "no warning: %s", out.c_str());
  CHECK(access("/dev/mapper/bad1", F_OK) == 0 && access("/dev/mapper/bad2", F_OK) != 0, "bad1/bad2");
  Detach("bad");

  // A partition's name is taken: attach fails, and leaves nothing attached.
  Must({"/sbin/dmsetup", "create", "gpt1", "--table", "0 8 zero"});
  const int taken = Run({kQcow, "attach", "--name", "gpt", gpt}, &out);
  Must({"/sbin/dmsetup", "remove", "gpt1"});
  CHECK(taken == 1 && out.find("/dev/mapper/gpt1 exists already") != std::string::npos, "attach over gpt1: %d %s",
        taken, out.c_str());
  CHECK(access("/dev/mapper/gpt", F_OK) != 0 && access("/run/dmcow-qcow/gpt.json", F_OK) != 0,
        "a failed attach left gpt behind");
}

bool Attached(const std::string& name) {
  return access(("/dev/mapper/" + name).c_str(), F_OK) == 0 ||
         access(("/run/dmcow-qcow/" + name + ".json").c_str(), F_OK) == 0;
}

// dmcow-qcow mount / umount: a partition (asked for, or the only one) or a
// whole-disk file system, mounted in one command and unmounted and detached
// in one; refusals leave nothing attached; umount never unmounts another
// file system mounted over the image's, nor a busy one.
void TestMount() {
  FreshWork();
  const std::string dir = "/tmp/qm";
  mkdir(dir.c_str(), 0755);
  const std::string gpt = std::string(kWork) + "/gpt.qcow2";
  std::string out;
  auto qcow = [&](const std::vector<std::string>& args) {
    std::vector<std::string> all = {kQcow};
    all.insert(all.end(), args.begin(), args.end());
    return Run(all, &out);
  };
  CHECK(qcow({"mount", "--partition", "2", gpt, dir}) == 0, "mount: %s", out.c_str());
  CHECK(ReadText(dir + "/hello") == "gpt.qcow2 partition 2\n", "hello: %s", ReadText(dir + "/hello").c_str());
  WriteText(dir + "/from-vm", "written in the VM to gpt-mount.qcow2 partition 2\n");
  CHECK(qcow({"list"}) == 0 && out.find("mounted on /tmp/qm") != std::string::npos, "list: %s", out.c_str());
  CHECK(qcow({"mount", "--name", "other", std::string(kWork) + "/wholefs.qcow2", dir}) == 1 &&
            out.find("gpt is mounted there already") != std::string::npos && !Attached("other"),
        "second mount on the same directory: %s", out.c_str());
  // Busy: refused, still mounted and attached.
  const int open_fd = open((dir + "/from-vm").c_str(), O_RDONLY | O_CLOEXEC);
  const int busy = qcow({"umount", dir});
  close(open_fd);
  CHECK(busy == 1 && out.find("Device or resource busy") != std::string::npos && Attached("gpt") &&
            access((dir + "/hello").c_str(), F_OK) == 0,
        "umount while busy: %d %s", busy, out.c_str());
  // Something mounted over it since: not unmounted.
  Must({"/bin/mount", "-t", "tmpfs", "none", dir});
  const int over = qcow({"umount", dir});
  Must({"/bin/umount", dir});
  CHECK(over == 1 && out.find("is not /dev/mapper/gpt2's") != std::string::npos && Attached("gpt"),
        "umount with tmpfs on top: %d %s", over, out.c_str());
  CHECK(qcow({"umount", dir}) == 0, "umount: %s", out.c_str());
  CHECK(!Attached("gpt") && access((dir + "/hello").c_str(), F_OK) != 0, "still attached or mounted after umount");
  CopyFile(gpt, std::string(kOut) + "/gpt-mount.qcow2");
  AddCheck("parts gpt-mount.qcow2 2");

  // Which file system: several partitions need --partition; a partition
  // that is not there, or an extended one, is refused; nothing stays attached.
  CHECK(qcow({"mount", gpt, dir}) == 1 &&
            out.find("has partitions 1, 2: say which with --partition N") != std::string::npos,
        "mount of two partitions: %s", out.c_str());
  CHECK(!Attached("gpt"), "a refused mount left gpt attached");
  const std::string mbr = std::string(kWork) + "/mbr.qcow2";
  for (const char* n : {"2", "3"}) {
    CHECK(qcow({"mount", "--partition", n, mbr, dir}) == 1 &&
              out.find(Fmt("has no partition %s (its partitions: 1, 5, 6)", n)) != std::string::npos,
          "mount --partition %s: %s", n, out.c_str());
    CHECK(!Attached("mbr"), "a refused mount left mbr attached");
  }
  // A mount that fails (no file system on the whole disk of an empty image): detached again.
  CHECK(
      qcow({"mount", std::string(kWork) + "/empty.qcow2", dir}) == 1 && out.find("detached again") != std::string::npos,
      "mount of an empty image: %s", out.c_str());
  CHECK(!Attached("empty"), "a failed mount left empty attached");
  // The only partition; read-only; a whole-disk file system; unmounted by hand first.
  CHECK(qcow({"mount", "--name", "one", std::string(kWork) + "/mbr-bad.qcow2", dir}) == 0, "mount: %s", out.c_str());
  CHECK(ReadText(dir + "/hello") == "mbr-bad.qcow2 partition 1\n", "the only partition is not the one mounted");
  CHECK(qcow({"umount", dir}) == 0 && !Attached("one"), "umount: %s", out.c_str());
  CHECK(qcow({"mount", "--read-only", "--partition", "5", mbr, dir}) == 0, "mount --read-only: %s", out.c_str());
  const int wfd = open((dir + "/new").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  const int werr = errno;
  CHECK(qcow({"umount", dir}) == 0, "umount: %s", out.c_str());
  CHECK(wfd < 0 && werr == EROFS, "a --read-only mount took a new file");
  CHECK(qcow({"mount", std::string(kWork) + "/wholefs.qcow2", dir}) == 0, "mount: %s", out.c_str());
  CHECK(ReadText(dir + "/hello") == "wholefs.qcow2 whole disk\n", "whole-disk file system not mounted");
  CHECK(umount(dir.c_str()) == 0, "umount(2): %s", strerror(errno));
  CHECK(qcow({"umount", dir}) == 0 && !Attached("wholefs"), "umount after a manual umount: %s", out.c_str());
}

// The unit's commands for a dmcowtab line, as systemd would run them
// (ExecStart/ExecStop of the unit as built, %i the name), in the unit's
// order: attach, use, detach.
std::string UnitCommand(const std::string& key, const std::string& name) {
  std::istringstream unit(ReadText("/lib/systemd/system/dmcow-qcow@.service"));
  std::string line;
  while (std::getline(unit, line)) {
    if (line.rfind(key + "=", 0) != 0) continue;
    std::string command = line.substr(key.size() + 1);
    for (size_t at; (at = command.find("%i")) != std::string::npos;) command.replace(at, 2, name);
    return command;
  }
  CHECK(false, "the unit has no %s", key.c_str());
  return "";
}

int RunUnitCommand(const std::string& key, const std::string& name, std::string* out) {
  std::istringstream words(UnitCommand(key, name));
  std::vector<std::string> args;
  for (std::string w; words >> w;) args.push_back(w);
  return Run(args, out);
}

void TestDmcowtab() {
  FreshWork();
  const std::string gpt = std::string(kWork) + "/gpt.qcow2";
  WriteText("/etc/dmcowtab",
            "# NAME IMAGE OPTIONS\n"
            "disk0 " +
                gpt +
                " scratch-max=64M  # partitions: disk0p1, disk0p2\n"
                "ro " +
                std::string(kWork) +
                "/mbr.qcow2 read-only,no-partitions\n"
                "typo " +
                gpt + " read-only,no-partition\n");
  std::string out;
  CHECK(RunUnitCommand("ExecStart", "disk0", &out) == 0, "ExecStart for disk0: %s", out.c_str());
  CHECK(access("/dev/mapper/disk0p1", F_OK) == 0 && access("/dev/mapper/disk0p2", F_OK) == 0,
        "disk0's partitions missing once ExecStart returned");
  MountReadWrite("/dev/mapper/disk0p1", "gpt.qcow2", 1, "gpt-tab.qcow2");
  CHECK(RunUnitCommand("ExecStart", "ro", &out) == 0, "ExecStart for ro: %s", out.c_str());
  int ro = 0;
  const int fd = open("/dev/mapper/ro", O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0 && ioctl(fd, BLKROGET, &ro) == 0 && ro == 1, "ro is not read-only");
  close(fd);
  CHECK(access("/dev/mapper/rop1", F_OK) != 0, "no-partitions ignored");
  // A line the table gets wrong fails its unit alone, with the line named.
  CHECK(RunUnitCommand("ExecStart", "typo", &out) == 1 &&
            out.find("/etc/dmcowtab:4: unknown option 'no-partition'") != std::string::npos,
        "ExecStart for typo: %s", out.c_str());
  CHECK(!Attached("typo"), "typo attached");
  CHECK(RunUnitCommand("ExecStart", "missing", &out) == 1 && out.find("no line for missing") != std::string::npos,
        "ExecStart for a name not in the table: %s", out.c_str());
  for (const char* name : {"disk0", "ro"}) {
    CHECK(RunUnitCommand("ExecStop", name, &out) == 0, "ExecStop for %s: %s", name, out.c_str());
    CHECK(!Attached(name), "%s still attached after ExecStop", name);
  }
  unlink("/etc/dmcowtab");
  CopyFile(gpt, std::string(kOut) + "/gpt-tab.qcow2");
  AddCheck("parts gpt-tab.qcow2 1");
}

// Where udev runs, attach returns once udev's rules for the device and its
// partitions ran (libdevmapper's udev cookie): the /dev/disk links are
// there at once, with no waiting here, and detach returns once they are
// gone. udevd runs with device-mapper's rules (55-dm, 60-persistent-storage-dm,
// 95-dm-notify, as dmsetup installs them) for this test only.
std::string Ext4Uuid(const std::string& dev) {
  const int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
  uint8_t u[16] = {};
  CHECK(fd >= 0 && pread(fd, u, 16, 1024 + 0x68) == 16, "superblock of %s", dev.c_str());
  close(fd);
  return Fmt("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4], u[5],
             u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

std::string Join(const std::vector<std::string>& words) {
  std::string all;
  for (const std::string& w : words) all += (all.empty() ? "" : " ") + w;
  return all;
}

bool SameDevice(const std::string& link, const std::string& dev) {
  struct stat a, b;
  return stat(link.c_str(), &a) == 0 && stat(dev.c_str(), &b) == 0 && S_ISBLK(a.st_mode) && a.st_rdev == b.st_rdev;
}

void TestUdev() {
  FreshWork();
  Must({"/lib/systemd/systemd-udevd", "--daemon"});
  for (int i = 0; i < 200 && access("/run/udev/control", F_OK) != 0; i++) usleep(50000);
  CHECK(access("/run/udev/control", F_OK) == 0, "udevd did not start");
  std::string out;
  const std::string gpt = std::string(kWork) + "/gpt.qcow2";
  // The device alone (the daemon's activation), then with its partitions (attach's own).
  Attach("ue", gpt, false, {"--no-partitions"});
  const bool whole = SameDevice("/dev/disk/by-id/dm-uuid-DMCOW-QCOW-ue", "/dev/mapper/ue");
  Detach("ue");
  const bool whole_gone = access("/dev/disk/by-id/dm-uuid-DMCOW-QCOW-ue", F_OK) != 0;
  Attach("ud", gpt);
  // Checked at once: attach must have waited for udev.
  std::vector<std::pair<std::string, std::string>> links = {
      {"/dev/disk/by-id/dm-uuid-DMCOW-QCOW-ud", "/dev/mapper/ud"},
      {"/dev/disk/by-id/dm-name-ud", "/dev/mapper/ud"},
      {"/dev/disk/by-id/dm-uuid-part1-DMCOW-QCOW-ud", "/dev/mapper/ud1"},
      {"/dev/disk/by-id/dm-uuid-part2-DMCOW-QCOW-ud", "/dev/mapper/ud2"},
      {"/dev/disk/by-label/gpt.qcow2-p2", "/dev/mapper/ud2"},
  };
  links.push_back({"/dev/disk/by-uuid/" + Ext4Uuid("/dev/mapper/ud1"), "/dev/mapper/ud1"});
  std::vector<std::string> missing;
  for (const auto& [link, dev] : links) {
    if (!SameDevice(link, dev)) missing.push_back(link);
  }
  std::vector<std::string> private_links;  // helper devices: none
  for (const char* dev : {"ud-store", "ud-base"}) {
    if (access(Fmt("/dev/disk/by-id/dm-name-%s", dev).c_str(), F_OK) == 0) private_links.push_back(dev);
  }
  Run({"/bin/sh", "-c", "ls -l /dev/disk/by-id /dev/disk/by-uuid /dev/disk/by-label 2>&1"}, &out);
  Detach("ud");
  std::vector<std::string> left;
  for (const auto& [link, dev] : links) {
    if (access(link.c_str(), F_OK) == 0) left.push_back(link);
  }
  // A file system in a backing image: its link names the top device; the
  // backing level and the helper devices get no /dev/disk links at all.
  Attach("uc", std::string(kWork) + "/wholefs-top.qcow2");
  const std::string by_uuid = "/dev/disk/by-uuid/" + Ext4Uuid("/dev/mapper/uc");
  const bool top_named = SameDevice(by_uuid, "/dev/mapper/uc");
  for (const char* dev : {"uc-store", "uc-base", "uc-b1", "uc-b1-store", "uc-b1-base"}) {
    if (access(Fmt("/dev/disk/by-id/dm-name-%s", dev).c_str(), F_OK) == 0) private_links.push_back(dev);
  }
  const bool b1_there = access("/dev/mapper/uc-b1", F_OK) == 0;
  std::string listing;
  Run({"/bin/sh", "-c", "ls -l /dev/disk/by-id /dev/disk/by-uuid 2>&1"}, &listing);
  Detach("uc");
  Run({"/bin/udevadm", "control", "--exit"});
  for (int i = 0; i < 200 && access("/run/udev/control", F_OK) == 0; i++) usleep(50000);
  CHECK(whole, "/dev/disk/by-id/dm-uuid-DMCOW-QCOW-ue missing when attach --no-partitions returned");
  CHECK(whole_gone, "/dev/disk/by-id/dm-uuid-DMCOW-QCOW-ue left when detach returned");
  CHECK(missing.empty(), "links missing when attach returned: %s (have: %s)", Tail(Join(missing), 300).c_str(),
        Tail(out, 1200).c_str());
  CHECK(left.empty(), "links left when detach returned: %s", Join(left).c_str());
  CHECK(b1_there, "no /dev/mapper/uc-b1: the backing level was not attached");
  CHECK(top_named, "%s does not name /dev/mapper/uc: %s", by_uuid.c_str(), Tail(listing, 1200).c_str());
  CHECK(private_links.empty(), "by-id links of private devices: %s", Join(private_links).c_str());
}

const TestCase kTests[] = {
    {"qcow_read_images", TestReadImages},
    {"qcow_write_images", TestWriteImages},
    {"qcow_background_scan", TestBackgroundScan},
    {"qcow_filesystem", TestFilesystem},
    {"qcow_killed", TestKilled},
    {"qcow_lock", TestLock},
    {"qcow_detach_reused_pid", TestDetachReusedPid},
    {"qcow_read_only_fs", TestReadOnlyFs},
    {"qcow_scratch_budget", TestScratchBudget},
    {"qcow_lock_after_kill", TestLockAfterKill},
    {"qcow_one_open", TestOneOpen},
    {"qcow_odd_backing", TestOddBacking},
    {"qcow_no_backing", TestNoBacking},
    {"qcow_read_only_untouched", TestReadOnlyUntouched},
    {"qcow_cache_bound", TestCacheBound},
    {"qcow_nbd", TestNbd},
    {"qcow_luks", TestLuks},
    {"qcow_partitions", TestPartitions},
    {"qcow_mount", TestMount},
    {"qcow_dmcowtab", TestDmcowtab},
    {"qcow_udev", TestUdev},
};

}  // namespace

int main(int argc, char** argv) {
  setenv("DMCOW_QCOW_VERBOSE", "1", 1);
  return TestMain(argc, argv, "qcowtest", kTests, sizeof(kTests) / sizeof(kTests[0]), "DMCOW_QCOW_TEST_TIMEOUT", 120);
}
