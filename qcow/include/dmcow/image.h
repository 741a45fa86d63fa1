// Image: the guest-visible view of a disk image in any supported format
// (raw, legacy qcow v1, qcow2 v2/v3), including its backing chain.
//
// Opening validates everything the format lets an attacker control before it
// is used: an image file is hostile input. See docs/format-rules.md.
//
// Thread safety: after Open returns, Read, GetLayerStatus and the const
// accessors may be called concurrently from several threads.
#ifndef DMCOW_IMAGE_H_
#define DMCOW_IMAGE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

class DeviceImage;
class Image;

struct OpenOptions {
  std::string format;                       // "raw", "qcow", "qcow2"; empty = detect from content
  std::string snapshot;                     // internal snapshot id or name: a read-only point-in-time view
  bool writable = false;                    // open for Write/WriteZeroes/Discard/Flush (qcow2, qcow v1 and raw)
  size_t refcount_cache_bytes = 256 << 10;  // bound on cached refcount blocks (writable qcow2)
  bool open_backing = true;                 // false: unallocated ranges read as zeros (qemu-img -u style)
  // With writable: the open is only for ChangeBackingFile (qemu-img rebase
  // -u). Guest data cannot be written, and the autoclear bits stay set, so
  // persistent bitmaps stay valid: no guest-visible byte of this layer
  // changes. qcow2 only; other formats open as for writing.
  bool header_only = false;
  // With writable: persistent bitmaps stay valid (their autoclear bit is
  // kept), for the calls that change no guest-visible byte (qemu-img amend).
  // qcow2 only. While the image has bitmaps, calls that would change guest
  // content (Write, WriteZeroes, Discard, compressed writes, MakeEmpty,
  // ApplySnapshot) return NotSupported; Grow and Shrink resize the bitmaps
  // with the image, as QEMU's truncate does. The image is never served as
  // a block device.
  bool metadata_only = false;
  // With writable: persistent bitmaps are maintained, as QEMU maintains
  // them: each enabled bitmap is marked in use while the image is open (a
  // crash leaves it inconsistent, visibly), every guest write is noted, and
  // when the image closes the bits of what was written are set and the flag
  // cleared, in one directory switch. qcow2 only; the image is not served as
  // a block device (the kernel would write past the notes). A resize drops
  // the bitmaps' autoclear bit instead (inconsistent). Without this or
  // metadata_only, a writable open makes bitmaps inconsistent at once.
  bool maintain_bitmaps = false;
  // false: an external data file is not opened (qemu-img info does not open
  // it); reading a cluster stored there then fails.
  bool open_data_file = true;
  // The keys of encrypted layers, by depth in the chain ([0] the image
  // opened, [1] its backing file, ...): a LUKS passphrase, or a legacy AES
  // key (the first 16 bytes, zero-padded), as the secret holds it; not
  // copied, so it must outlive the open. A wrong key is refused at open. A
  // layer without one (nullptr or no entry) is refused too, unless
  // allow_missing_keys: then its metadata is read (info, check, map) but
  // reading one of its data clusters fails.
  std::vector<const std::string*> layer_secrets;
  bool allow_missing_keys = false;
  size_t l2_cache_bytes = 1 << 20;  // bound on cached L2 tables, per image in the chain
  int max_chain_depth = 64;         // longer backing chains are refused (hostile chains; loops are found at once)
  // Bound on the memory the L1 tables of all images in a chain hold together
  // (each holds what its table really names: see docs/format-rules.md).
  uint64_t max_chain_table_bytes = uint64_t{256} << 20;
  Env* env = Env::Default();  // all file access; tests put a MemEnv or a fault layer here
};

// State of a guest range within one layer of a chain.
enum class ClusterState {
  kUnallocated,  // not described by this layer: read from the backing image
  kZero,         // reads as zeros in this layer
  kData,         // stored uncompressed at host_offset in data_filename()
  kCompressed,   // stored compressed; no single host offset
};

struct LayerExtent {
  uint64_t length = 0;  // bytes from the queried offset that share this state
  ClusterState state = ClusterState::kUnallocated;
  bool has_host_offset = false;  // kData always; kZero and kUnallocated where space is preallocated
  uint64_t host_offset = 0;      // of the first byte, in data_filename()
  // kData whose host range is a hole in the file (or past its end) in an
  // image QEMU takes for metadata-preallocated: it reads as zeros, and
  // qemu-img map and compare -s report it as "zero" (QEMU's block-status
  // recursion into the file, BDRV_BLOCK_RECURSE).
  bool host_hole = false;
};

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  bool has_icount = false;
  uint64_t icount = 0;
  bool has_disk_size = false;
  uint64_t disk_size = 0;  // virtual size when the snapshot was taken
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
};

struct BitmapInfo {
  std::string name;
  uint32_t granularity = 0;  // bytes
  bool in_use = false;
  bool auto_flag = false;  // qemu-img prints "auto"
};

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct HeaderExtension {  // an extension we do not interpret, kept byte for byte
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct LuksSlotInfo {
  bool active = false;
  uint32_t iterations = 0;  // active slots only
  uint64_t key_offset = 0;  // bytes from the start of the LUKS header
  uint32_t stripes = 0;     // active slots only
};

// What an encrypted image says of its encryption, readable without a key
// (qemu-img info's "encrypt" block).
struct EncryptionInfo {
  std::string format;  // "aes" (legacy, crypt_method 1) or "luks"; empty when not encrypted
  // LUKS only, in QEMU's names (qapi/crypto.json).
  std::string cipher_alg;      // "aes-256"
  std::string cipher_mode;     // "xts"
  std::string ivgen_alg;       // "plain64"
  std::string ivgen_hash_alg;  // essiv only
  std::string hash_alg;        // "sha256"
  std::string uuid;
  std::vector<LuksSlotInfo> slots;
  uint64_t payload_offset = 0;  // bytes
  uint32_t master_key_iterations = 0;
};

struct ImageInfo {
  std::string format;  // "raw", "qcow", "qcow2"
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;  // 0 for raw
  bool encrypted = false;
  EncryptionInfo encryption;          // format set when encrypted (qcow, qcow2)
  bool dirty = false;                 // qcow2 incompatible bit 0 (lazy refcounts left unflushed)
  std::string backing_filename;       // as stored in the image
  std::string full_backing_filename;  // resolved against the image's directory
  std::string backing_format;         // from the backing format extension, may be empty
  std::vector<SnapshotInfo> snapshots;

  // qcow2 only.
  uint32_t version = 0;  // 1 (qcow), 2 or 3
  bool corrupt = false;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  uint32_t refcount_bits = 0;
  std::string compression_type;  // "zlib" or "zstd"
  std::string data_file;         // external data file name, empty if none
  bool data_file_raw = false;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  std::vector<FeatureName> feature_names;
  std::vector<BitmapInfo> bitmaps;
  std::vector<HeaderExtension> unknown_extensions;
};

// qemu-img amend's LUKS key slot options: encrypt.state (activate or
// erase), encrypt.keyslot, encrypt.old-secret, encrypt.new-secret,
// encrypt.iter-time.
struct KeySlotChange {
  bool activate = false;
  bool has_keyslot = false;
  int64_t keyslot = 0;
  const std::string* old_secret = nullptr;
  const std::string* new_secret = nullptr;
  uint64_t iter_time_ms = 2000;
};

// How far an amend step is: (work done, total work), in the step's units.
using AmendProgress = std::function<void(uint64_t done, uint64_t total)>;

// One of qemu-img bitmap's actions on a persistent dirty bitmap.
struct BitmapAction {
  enum class Kind { kAdd, kRemove, kClear, kEnable, kDisable, kMerge };
  Kind kind = Kind::kAdd;
  uint64_t granularity = 0;  // kAdd: bytes per bit (0: QEMU's default for the cluster size)
  Image* source = nullptr;   // kMerge: the image holding the source bitmap (nullptr: this one)
  std::string source_name;   // kMerge: the source bitmap
};

class Image {
 public:
  Image() = default;
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;
  virtual ~Image() = default;

  virtual const std::string& filename() const = 0;
  virtual const ImageInfo& info() const = 0;
  uint64_t virtual_size() const { return info().virtual_size; }

  // Reads guest bytes [offset, offset+len), resolving the backing chain.
  // Ranges past the end of a shorter backing image read as zeros.
  // Reading past virtual_size() is an InvalidArgument error.
  virtual Status Read(uint64_t offset, void* buf, size_t len) = 0;

  // Describes this layer only, starting at `offset` (< virtual_size()), for at
  // most `max_len` bytes: one run of uniform state. out->length >= 1.
  virtual Status GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) = 0;

  // The file holding kData clusters (the image itself, or its external data file).
  virtual const std::string& data_filename() const = 0;

  // The opened backing image, or nullptr.
  virtual Image* backing() const = 0;

  // Bytes the image file occupies on disk (qemu-img's actual-size).
  virtual uint64_t AllocatedFileBytes() const = 0;

  // Write side, for images opened with OpenOptions::writable; otherwise these
  // return NotSupported. A write is durable once a later Flush returns;
  // until then a crash may lose it (never anything flushed before it), and
  // never leaves the image corrupt (at worst leaked clusters).
  virtual Status Write(uint64_t offset, const void* buf, size_t len);
  // Makes [offset, offset+len) read as zeros, freeing whole clusters where
  // the format can say "zero" (qcow2 v3, or no backing file).
  virtual Status WriteZeroes(uint64_t offset, uint64_t len);
  // As WriteZeroes, but the range's storage may also be given back (QEMU's
  // write-zeroes with BDRV_REQ_MAY_UNMAP, which qemu-img convert and commit
  // use): a raw file gets a hole. WriteZeroes keeps a raw file's blocks
  // allocated (fallocate ZERO_RANGE where the file system has it).
  virtual Status WriteZeroesMayUnmap(uint64_t offset, uint64_t len) { return WriteZeroes(offset, len); }
  // Hints that [offset, offset+len) is unused: whole clusters inside it are
  // freed and read as zeros where the format can say so; otherwise unchanged.
  virtual Status Discard(uint64_t offset, uint64_t len);
  // Stores the cluster at `offset` (cluster aligned) compressed: `payload` is
  // what CompressCluster made of the cluster's full content, using the
  // image's compression type. Formats or images that cannot hold compressed
  // clusters (raw, external data files) return NotSupported.
  virtual Status WriteCompressedCluster(uint64_t offset, const void* payload, size_t len);
  virtual Status Flush();
  // Drops everything this layer stores, so that every byte reads from the
  // backing image again (qemu-img commit's last step): each cluster becomes
  // unallocated and its space is freed. Internal snapshots keep their
  // content. Durable when it returns. Formats that cannot do it, and images
  // not open for writing, return NotSupported.
  virtual Status MakeEmpty();
  // Grows the virtual size to `new_size` (qemu's truncate to a larger
  // size, preallocation off): the new range reads as zeros. Durable when it
  // returns. Shrinking, and formats or images that cannot grow (qcow2
  // version 2 with internal snapshots), return NotSupported.
  virtual Status Grow(uint64_t new_size);
  // Shrinks the virtual size to `new_size` (qemu-img resize --shrink):
  // everything past it is dropped and its space freed; the file (and an
  // external data file) is cut to what is still used. Durable when it
  // returns. Growing, and formats or images that cannot shrink, return
  // NotSupported.
  virtual Status Shrink(uint64_t new_size);
  // Records `backing` (empty: none) in the header as this image's backing
  // file, with `backing_format` (empty: none; only with a backing file),
  // stored as given: a relative name is relative to this image's directory.
  // What this layer stores is unchanged. Writes made before it are made
  // durable first, so that a crash leaves either the old name or the new
  // one over every byte written (qemu-img rebase's order). Durable when it
  // returns. The backing image this open reads through stays the old one.
  // Formats without the call (raw, qcow v1: as in QEMU) return
  // NotSupported; a name longer than 1023 bytes, a format with no name or
  // longer than 15 bytes, or any backing file for an image whose data file
  // is raw (data_file_raw) InvalidArgument; a header cluster without room
  // for them NoSpace.
  virtual Status ChangeBackingFile(const std::string& backing, const std::string& backing_format);
  // Internal snapshots (qcow2; other formats, and qcow2 images with an
  // external data file, return NotSupported, as QEMU's drivers do). Each is
  // durable when it returns; the crash-safe order of each is stated at the
  // top of qcow/src/qcow2/qcow2_snapshot.cc. A crash at any point leaves
  // the image as before or as after, with at most leaked clusters.
  //
  // Records the active state as a new snapshot: `snapshot` gives its name,
  // date, VM clock and icount; its id (the next free number), L1 table and
  // disk size are set here and returned in *snapshot. Too many snapshots
  // (65536), or a table past 64 MiB, is InvalidArgument.
  virtual Status CreateSnapshot(SnapshotInfo* snapshot);
  // Deletes the snapshot whose id is `id`, freeing what only it held.
  // NotFound when there is none.
  virtual Status DeleteSnapshot(const std::string& id);
  // Makes the snapshot whose id is `id` the active state (its content and
  // its disk size); the snapshot stays. NotFound when there is none.
  virtual Status ApplySnapshot(const std::string& id);
  // qemu-img amend's changes to a qcow2 image (other formats return
  // NotSupported). None changes what the guest reads; each is durable when
  // it returns, and a crash at any point leaves the image as before or as
  // after, with at most leaked clusters (the order is stated at the top of
  // qcow/src/qcow2/qcow2_amend.cc). The refusals are InvalidArgument, with
  // qemu's words after "PATH: ".
  //
  // Version 3 (compat=1.1) or 2 (compat=0.10). Going down needs 16-bit
  // refcounts, no external data file, snapshots taken at the current size
  // and no incompatible feature but zstd compression (with no compressed
  // cluster); zero clusters become unallocated (no backing file) or zeroed
  // data clusters, persistent bitmaps (which version 2 cannot hold) are
  // removed and their clusters freed.
  // `progress`, when set, hears (work done, total work) as QEMU reports
  // it: upgrading 0, 1 and 2 of 2; downgrading after each L1 entry of the
  // active table and then of each snapshot's.
  virtual Status ChangeVersion(uint32_t version, const AmendProgress& progress = {});
  // Refcount entries of `bits` bits (1 to 64, a power of two; version 3):
  // a new refcount table and blocks are written past the end of the
  // allocated clusters and the old ones become free space. A refcount too
  // large for the new width is InvalidArgument, before anything changes.
  // `progress` hears (clusters counted, clusters to count).
  virtual Status ChangeRefcountBits(uint32_t bits, const AmendProgress& progress = {});
  // The lazy refcounts compatible feature (version 3); turning it off makes
  // every refcount durable first.
  virtual Status SetLazyRefcounts(bool on);
  // Adds or erases LUKS key slots, as QEMU's qcrypto_block_luks_amend_options
  // (its checks and words); the image is open writable with its key.
  virtual Status ChangeKeySlots(const KeySlotChange& change);
  // qemu-img bitmap: applies `actions`, in order, to the persistent dirty
  // bitmap `name` (qcow2 version 3; kAdd makes an enabled bitmap, kMerge
  // sets every bit covering a range the source bitmap marks dirty, at this
  // bitmap's granularity). Guest content is untouched, and other bitmaps
  // stay valid. The outcome is written as one change, durable when this
  // returns: a crash leaves every bitmap as before or as after, with at
  // most leaked clusters (qcow/src/qcow2/qcow2_bitmap_change.cc). On a
  // refusal, *failed (when set) gets the index of the refused action, whose
  // status, with qemu's words after "PATH: ", is returned; the actions
  // before it are still written, as qemu-img keeps them. A bitmap in use
  // (left inconsistent) can only be removed.
  virtual Status ChangeBitmap(const std::string& name, const std::vector<BitmapAction>& actions, size_t* failed);
  // qemu's preallocation modes for a range that reads as zeros (a resize's
  // new range): kMetadata allocates clusters (qcow2: tables and refcounts,
  // the data left as holes), kFalloc reserves their storage too
  // (fallocate), kFull writes zeros over it. Raw files take kFalloc and
  // kFull; other formats return NotSupported.
  enum class Preallocation { kMetadata, kFalloc, kFull };
  virtual Status Preallocate(uint64_t offset, uint64_t len, Preallocation mode);

  // The calls that serve this image as a block device (dmcow/device_image.h,
  // for dmcowd's qcow2 plugin), or nullptr where the format cannot be served
  // that way (raw). Lives as long as the image.
  virtual DeviceImage* AsDeviceImage() { return nullptr; }
};

// Opens `path` and, unless options say otherwise, its whole backing chain.
Status OpenImage(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image);

// When `s` is OpenImage's refusal of an encrypted layer given no key (and
// no allow_missing_keys), that layer's file name; else "".
std::string LayerMissingKey(const Status& s);

// The snapshot qemu-img means by `id_or_name`: the first whose id is that,
// else the first whose name is (bdrv_snapshot_find). nullptr when none.
const SnapshotInfo* FindSnapshot(const std::vector<SnapshotInfo>& snapshots, const std::string& id_or_name);

// The file a name recorded in the image at `image_path` (a backing or data
// file name) designates, as QEMU reads it: a relative name is relative to the
// image's directory, not to the working directory.
std::string ResolveNameBesideImage(const std::string& image_path, const std::string& name);

// Detects the format as QEMU probes it: "qcow2", "qcow", "raw", or QEMU's name
// of a format dmcow does not read ("vmdk", "vdi", ...), which OpenImage refuses.
Status ProbeFormat(Env* env, const std::string& path, std::string* format);

// One run of qemu-img map's output: the state of a guest range across the chain.
struct MapExtent {
  uint64_t start = 0;
  uint64_t length = 0;
  int depth = 0;         // layer holding the data; if none, the deepest layer consulted
  bool present = false;  // some layer allocates it (data or zero)
  bool zero = false;     // reads as zeros
  bool data = false;     // reads from stored data
  bool compressed = false;
  bool has_offset = false;
  uint64_t offset = 0;   // host offset in `filename` (uncompressed data only)
  std::string filename;  // file holding the data, when has_offset
};

// The longest run starting at `offset` (at most `max_len` bytes) with one
// MapExtent state, as qemu-img map reports it.
Status GetMapExtent(Image* top, uint64_t offset, uint64_t max_len, MapExtent* out);

// SHA-256 (lowercase hex) of the guest-visible content: equal for equal
// content in any format, cluster size or chain shape. Reads (or hashes the
// zeros of) every byte: time in proportion to the virtual size.
Status ComputeContentSha256(Image* image, std::string* hex);

// The block digest "blk-sha256" (lowercase hex) of the guest-visible
// content, defined in docs/checksum.md: SHA-256 over the virtual size and,
// per 64 KiB block, the block's SHA-256 or, for a run of all-zero blocks,
// its length. Equal for equal content in any format and however its zeros
// are stored (holes, zero clusters, written zeros); time in proportion to
// the data and the block-status runs, not the virtual size.
Status ComputeBlockDigest(Image* image, std::string* hex);

}  // namespace dmcow

#endif  // DMCOW_IMAGE_H_
