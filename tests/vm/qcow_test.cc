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
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
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

std::string Attach(const std::string& name, const std::string& image, bool read_only = false) {
  std::vector<std::string> args = {kQcow, "attach", "--name", name};
  if (read_only) args.push_back("--read-only");
  args.push_back(image);
  std::string out;
  const int st = Run(args, &out);
  if (st != 0) {
    std::string ls;
    Run({"/bin/sh", "-c", "ls /dev/dm-cow; ls /sys/class/misc | grep cow; dmsetup ls; cat /proc/mounts | grep dev"}, &ls);
    out += " || " + ls;
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
void WriteSeeded(const std::string& file, uint64_t seed) {
  const std::string path = std::string(kWork) + "/" + file;
  const std::string dev = Attach("qw", path);
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
  Attach("qw", path);
  CHECK(CheckLinearOntoImage("qw", path) > 0, "%s: no written cluster folded at reattach", file.c_str());
  CHECK(Sha256(dev) == dev_sum, "%s: reattached image differs", file.c_str());
  Detach("qw");
  CopyFile(path, std::string(kOut) + "/" + file);
  // qemu-img cannot check qcow v1 images: the host checks them otherwise.
  const bool v1 = file.size() > 5 && file.substr(file.size() - 5) == ".qcow";
  AddCheck((v1 ? "writev1 " : "write ") + file + " " + file + ".ref.raw");
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
  const int st = Run({"/sbin/bonnie++", "-d", "/tmp/qfs-mnt", "-s", "24", "-r", "12", "-n", "1", "-u", "root", "-x", "1", "-q"}, &out);
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

// --read-only works on an image nobody may write: here on a read-only
// file system, where even root cannot (and scratch space goes elsewhere).
void TestReadOnlyFs() {
  const std::string dir = "/tmp/qcow-ro";
  mkdir(dir.c_str(), 0755);
  Must({"/bin/mount", "-t", "tmpfs", "tmpfs", dir});
  for (const char* f : {"zlib.qcow2", "chain-mid.qcow2", "chain-base.raw"}) CopyFile(std::string(kIn) + "/" + f, dir + "/" + f);
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
        if (bad++ == 0) first_bad = Fmt("offset %llu: read %zd, byte 0 is %u, want %u", static_cast<unsigned long long>(off), n, b[0], want);
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

const TestCase kTests[] = {
    {"qcow_read_images", TestReadImages},
    {"qcow_write_images", TestWriteImages},
    {"qcow_filesystem", TestFilesystem},
    {"qcow_killed", TestKilled},
    {"qcow_lock", TestLock},
    {"qcow_read_only_fs", TestReadOnlyFs},
    {"qcow_scratch_budget", TestScratchBudget},
};

}  // namespace

int main(int argc, char** argv) {
  setenv("DMCOW_QCOW_VERBOSE", "1", 1);
  return TestMain(argc, argv, "qcowtest", kTests, sizeof(kTests) / sizeof(kTests[0]), "DMCOW_QCOW_TEST_TIMEOUT", 120);
}
