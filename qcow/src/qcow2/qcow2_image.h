// Qcow2Image: qcow2 version 2 and 3 images. Reads (L1/L2 lookups, zero,
// compressed and subclustered clusters, external data files, snapshots as
// read-only views), writes with QEMU's metadata ordering (the rules at the
// top of qcow2_write.cc), and serves block devices (DeviceImage, in
// qcow2_device.cc).
#ifndef DMCOW_QCOW_QCOW2_IMAGE_H_
#define DMCOW_QCOW_QCOW2_IMAGE_H_

#include <memory>
#include <mutex>
#include <vector>

#include <set>
#include "image/table_image.h"

#include "image/l1_table.h"
#include "image/table_cache.h"
#include "qcow2/qcow2_bitmaps.h"
#include "qcow2/qcow2_header.h"
#include "qcow2/qcow2_overlap.h"
#include "qcow2/qcow2_refcounts.h"

namespace dmcow {

class Qcow2Image final : public TableImage, public DeviceImage {
 public:
  // Opens `file` as qcow2 up to its tables (LoadTables loads them); with a
  // non-empty `snapshot` (id or name), the view is that internal snapshot's
  // content.
  static Status Open(std::unique_ptr<File> file, const OpenOptions& options, const std::string* key,
                     const std::string& snapshot, std::unique_ptr<Image>* image);

  const std::string& data_filename() const override { return data_file_ ? data_file_->name() : file_->name(); }

  // Write side (see qcow2_write.cc for the ordering rules).
  ~Qcow2Image() override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status WriteCompressedCluster(uint64_t offset, const void* payload, size_t len) override;
  Status Flush() override;
  Status MakeEmpty() override;                                                     // qcow2_write.cc
  Status Grow(uint64_t new_size) override;                                         // qcow2_grow.cc
  Status Shrink(uint64_t new_size) override;                                       // qcow2_grow.cc
  Status Preallocate(uint64_t offset, uint64_t len, Preallocation mode) override;  // qcow2_preallocation.cc
  Status ChangeBackingFile(const std::string& backing, const std::string& backing_format) override;  // qcow2_backing.cc
  // Internal snapshots (qcow2_snapshot.cc, which states their ordering).
  Status CreateSnapshot(SnapshotInfo* snapshot) override;
  Status DeleteSnapshot(const std::string& id) override;
  Status ApplySnapshot(const std::string& id) override;
  // qemu-img amend's changes (qcow2_amend.cc, which states their order).
  Status ChangeVersion(uint32_t version, const AmendProgress& progress) override;
  Status ChangeRefcountBits(uint32_t bits, const AmendProgress& progress) override;
  Status SetLazyRefcounts(bool on) override;
  Status ChangeKeySlots(const KeySlotChange& change) override;
  // qemu-img bitmap's changes (qcow2_bitmap_change.cc, which states their order).
  Status ChangeBitmap(const std::string& name, const std::vector<BitmapAction>& actions, size_t* failed) override;
  // Block-device serving (qcow2_device.cc).
  DeviceImage* AsDeviceImage() override {
    // Encrypted: LUKS with its key only (dm-crypt maps it; legacy AES,
    // keyed by the guest sector, it cannot).
    const bool servable_crypt = !info_.encrypted || (luks_ != nullptr && cipher_ != nullptr);
    return metadata_only_ || !maintained_bitmaps_.empty() || !servable_crypt ? nullptr : this;
  }
  Status WithKernelCipher(const KernelCipherUse& use) const override { return KernelCipher(use); }
  Status DescribeCluster(uint64_t cluster, ClusterPlace* out) override;
  Status ReserveClusters(uint64_t count, uint64_t* host_offset) override;
  Status FillClusters(uint64_t first, uint64_t count, uint64_t host_offset) override;
  Status LinkClusters(uint64_t first, uint64_t count, uint64_t host_offset) override;
  Status UnreserveClusters(uint64_t count, uint64_t host_offset) override;
  uint64_t AllocationEnd() const override;

  const Qcow2Header& header() const { return header_; }

 private:
  explicit Qcow2Image(std::unique_ptr<File> file);

  Status LoadTables(const OpenOptions& options, uint64_t* chain_table_bytes) override;
  Status LoadL1(const OpenOptions& options, uint64_t* chain_table_bytes);

  Status Lookup(uint64_t offset, uint64_t max_len, Mapping* m) override REQUIRES_SHARED(rw_mu_);
  // qcow2_preallocation.cc: QEMU's qcow2_detect_metadata_preallocation,
  // run once, at the first data run a caller asks about.
  bool HostHolesReadAsZero() override;
  bool DetectMetadataPreallocation();

  // Refuses a writable open of an image marked corrupt or dirty.
  Status CheckWritable() const;
  // Readies a read-write open: refuses an image marked corrupt or dirty,
  // clears the autoclear bits we do not keep consistent, and sets up the
  // refcounts, the overlap guard and the dirty-metadata bound.
  Status PrepareForWriting(const OpenOptions& options);
  // Runs one step of a writing call (Write, Flush, the device calls...)
  // under rw_mu_ held exclusively. The first step that fails stops writing
  // through this open (rule 9 of qcow2_write.cc): every later step, and the
  // closing flush, fail without touching the file. A step that changes no
  // metadata (kKeepGoing: FillClusters, which only writes into reserved
  // clusters nothing maps yet) is refused after a stop but does not cause
  // one; its I/O errors stop writing at the file (FailStopFile).
  enum class OnFailure { kStop, kKeepGoing };
  template <typename Step>
  Status WriteStep(Step&& step, OnFailure on_failure = OnFailure::kStop) {
    WriterLock lock(&rw_mu_);
    if (!stopped_.ok()) return stopped_.WithMessage(stopped_.message() + " (no more writes through this open since)");
    Status s = step();
    if (!s.ok() && on_failure == OnFailure::kStop) stopped_ = s;
    return s;
  }
  // The *Locked helpers: the caller holds rw_mu_ exclusively (WriteStep).
  // Guest bytes to data_file() at `host`, encrypted if the image is.
  Status WriteGuestData(uint64_t guest, uint64_t host, const uint8_t* data, size_t n) REQUIRES(rw_mu_);
  Status WriteLocked(uint64_t offset, const uint8_t* buf, size_t len) REQUIRES(rw_mu_);
  Status ZeroLocked(uint64_t offset, uint64_t len, bool discard) REQUIRES(rw_mu_);
  Status MakeEmptyLocked() REQUIRES(rw_mu_);
  Status GrowLocked(uint64_t new_size) REQUIRES(rw_mu_);
  static constexpr uint64_t kMaxRunClusters = 256;  // clusters allocated and written per step
  Status PreallocateLocked(uint64_t offset, uint64_t len, Preallocation mode) REQUIRES(rw_mu_);
  // Host space for `count` new clusters from guest cluster `cluster` that
  // reads as zeros (qcow2_preallocation.cc), not yet synced.
  Status PreallocateRunLocked(uint64_t cluster, uint64_t count, Preallocation mode, uint64_t* host) REQUIRES(rw_mu_);
  Status ShrinkLocked(uint64_t new_size) REQUIRES(rw_mu_);
  // Writes `next` as the header (rules B2 and B3 at the top of
  // qcow2_backing.cc: one sector where it fits, stale bytes zeroed after),
  // synced, and takes it as header_. Callers make durable first whatever
  // the new header names (B1).
  Status WriteHeaderLocked(Qcow2Header next) REQUIRES(rw_mu_);
  // Writes the header's size field, synced, and takes it as the size; with
  // bitmaps kept (BitmapsKept), resizes them in the same header write.
  Status WriteVirtualSize(uint64_t new_size) REQUIRES(rw_mu_);
  // Unlinks the L2 table at `l2_offset` (0: none) from L1 entry `l1_index`;
  // it and the clusters its first `count` entries map are freed at the next
  // flush (MakeEmpty, Shrink).
  Status DropL2TableLocked(uint64_t l1_index, uint64_t l2_offset, uint64_t count) REQUIRES(rw_mu_);
  // Checks shared by Grow and Shrink: the size, and QEMU's refusal of
  // version 2 images with snapshots (they do not record their disk size).
  Status CheckResize(uint64_t new_size) const;
  Status FlushLocked(bool closing = false) REQUIRES(rw_mu_);
  // Writes the header's dirty bit (incompatible feature 0) and syncs.
  Status SetDirtyBit(bool dirty);
  Status MaybeFlush() REQUIRES(rw_mu_);  // flushes when too much metadata is dirty
  // The L2 table offset L1 entry `l1_index` holds (0: none); an unaligned
  // one is Corrupt, so that no path reads or writes a table straddling
  // clusters. REQUIRES: l1_index < l1_.size().
  Status L2TableOffset(uint64_t l1_index, uint64_t* l2_offset) const;
  Status GetL2Entry(uint64_t cluster, uint64_t* entry, uint64_t* bitmap);
  Status SetL2Entry(uint64_t cluster, uint64_t entry, uint64_t bitmap) REQUIRES(rw_mu_);
  // The L2 table for `l1_index`, created or copied (if shared) as needed.
  Status EnsureL2Table(uint64_t l1_index, uint64_t* l2_offset) REQUIRES(rw_mu_);
  bool WritableInPlace(uint64_t entry, uint64_t bitmap) const;
  // Frees (after the next flush) the host space an L2 entry held.
  void ReleaseClusterOf(uint64_t entry) REQUIRES(rw_mu_);
  // Host bytes for compressed data, packed after the previous compressed
  // cluster as QEMU packs them; refcounts count each compressed cluster
  // touching a host cluster once.
  Status AllocateCompressedBytes(uint64_t bytes, uint64_t* host_offset) REQUIRES(rw_mu_);

  // NotSupported when the open was metadata_only (OpenOptions) and the
  // image has valid persistent bitmaps: `what` would change guest content.
  Status RefuseIfMetadataOnly(const char* what) const;

  // qcow2_amend.cc.
  Status UpgradeLocked(const AmendProgress& progress) REQUIRES(rw_mu_);
  Status DowngradeLocked(const AmendProgress& progress) REQUIRES(rw_mu_);
  // Every zero cluster of the tree under `l1` becomes unallocated (no
  // backing file) or a zeroed data cluster (rule A2 of qcow2_amend.cc).
  // `progress` hears each L1 entry done (after *done, of `total`).
  Status ExpandZeroClustersInTree(const std::vector<uint64_t>& l1, const AmendProgress& progress, uint64_t* done,
                                  uint64_t total) REQUIRES(rw_mu_);
  // Calls visit(entry) for every L2 entry of the tree under `l1`.
  template <typename Visit>
  Status VisitL2Entries(const std::vector<uint64_t>& l1, Visit&& visit) REQUIRES(rw_mu_);
  // Frees the persistent bitmaps' directory, tables and data clusters,
  // once the header no longer names them: each cluster once, and none that
  // anything still reachable uses (rules F1-F3 of qcow2_bitmap_free.cc).
  Status FreeBitmapClustersLocked(const std::vector<Qcow2Bitmap>& bitmaps, uint64_t directory_offset,
                                  uint64_t directory_bytes) REQUIRES(rw_mu_);
  Status ChangeRefcountBitsLocked(uint32_t bits, const AmendProgress& progress) REQUIRES(rw_mu_);
  // A fresh refcount view and overlap map, after the refcount structure moved.
  Status ReloadRefcountsLocked() REQUIRES(rw_mu_);

  // qcow2_bitmap_change.cc.
  Status ChangeBitmapLocked(const std::string& name, const std::vector<BitmapAction>& actions, size_t* failed)
      REQUIRES(rw_mu_);
  // Writes the bits of `sources` (their union, at b's granularity, over a
  // `disk`-byte disk) as a new table and data clusters, not synced, and
  // points *b at them.
  Status StoreBitmapBitsLocked(const Qcow2PlannedBitmap& p, uint64_t disk, Qcow2Bitmap* b) REQUIRES(rw_mu_);
  // Makes `plan` the bitmap directory (D1-D3) of an image of `virtual_size`
  // bytes, written in the same header switch, freeing what only `old` named.
  Status WriteBitmapDirectoryLocked(const std::vector<Qcow2Bitmap>& old, const std::vector<Qcow2PlannedBitmap>& plan,
                                    uint64_t virtual_size) REQUIRES(rw_mu_);
  // True when this open keeps persistent bitmaps valid (metadata_only, and
  // the image has bitmaps QEMU would load): a resize must resize them.
  bool BitmapsKept() const;
  // Before a resize writes anything: QEMU's refusal of bitmaps in use, and
  // bitmaps too large for the new size; RefuseIfMetadataOnly otherwise.
  Status CheckBitmapsResizable(uint64_t new_size) const;
  // The size switch of a resize with bitmaps kept: every bitmap rewritten
  // for `new_size`, the size written with the new directory (D1-D3).
  Status ResizeBitmapsLocked(uint64_t new_size) REQUIRES(rw_mu_);
  // OpenOptions::maintain_bitmaps (rules M1-M3 at the top of
  // qcow2_bitmap_change.cc): marks the enabled bitmaps in use; notes a
  // guest write; at close, stores the noted writes and clears the flags;
  // on a resize, drops them all (autoclear bit cleared).
  Status StartMaintainingBitmaps();
  void NoteGuestWriteLocked(uint64_t offset, uint64_t len) REQUIRES(rw_mu_);
  Status StoreMaintainedBitmapsLocked() REQUIRES(rw_mu_);
  Status DropMaintainedBitmapsLocked() REQUIRES(rw_mu_);

  // qcow2_snapshot.cc.
  Status CreateSnapshotLocked(SnapshotInfo* snapshot) REQUIRES(rw_mu_);
  Status DeleteSnapshotLocked(const std::string& id) REQUIRES(rw_mu_);
  Status ApplySnapshotLocked(const std::string& id) REQUIRES(rw_mu_);
  // Calls visit(cluster index, is_l2_table) for every cluster the tree under
  // `l1` (entries as stored) references: each L2 table, and each data
  // cluster it maps (each host cluster a compressed cluster's bytes touch;
  // none in an external data file). Offsets that are misaligned or past the
  // end of the file are Corrupt, before anything is visited past them.
  template <typename Visit>
  Status VisitTree(const std::vector<uint64_t>& l1, Visit&& visit) REQUIRES(rw_mu_);
  // Adds `delta` to the refcount of every cluster VisitTree names, in the
  // cache; with delta > 0, first checks that none would overflow (QEMU's
  // -EINVAL), before changing any.
  Status AdjustTreeRefcounts(const std::vector<uint64_t>& l1, int64_t delta) REQUIRES(rw_mu_);
  // Sets the COPIED flag of every entry of the tree under `l1` (L1 entries
  // in *l1, L2 entries in the cache, dirty where changed) exactly where the
  // cluster's refcount is 1, as QEMU's qcow2_update_snapshot_refcount does.
  Status SyncCopiedFlags(std::vector<uint64_t>* l1) REQUIRES(rw_mu_);
  // Reads an L1 table of `entries` entries at `offset` (validated).
  Status ReadL1Entries(uint64_t offset, uint64_t entries, std::vector<uint64_t>* l1) REQUIRES(rw_mu_);
  std::vector<uint64_t> ActiveL1Entries() const REQUIRES(rw_mu_);
  // Stores the active L1 entries `l1` into l1_ (same size), marking changed
  // entries dirty.
  void SetActiveL1Entries(const std::vector<uint64_t>& l1) REQUIRES(rw_mu_);
  // Writes `snapshots` as the new snapshot table (S3 at the top of
  // qcow2_snapshot.cc) and frees the old one after the header switch.
  Status WriteSnapshotTable(const std::vector<SnapshotInfo>& snapshots,
                            const std::vector<std::vector<uint8_t>>& unknown_extra) REQUIRES(rw_mu_);

  // Classifies the guest range [pos, pos + *len) inside one cluster given its
  // L2 entry (and bitmap for extended L2), shortening *len to the part that
  // shares a state (a subcluster run).
  Status Classify(uint64_t pos, uint64_t entry, uint64_t bitmap, uint64_t* len, Mapping* m) const;
  // Corrupt when `entry`, the L2 entry of guest cluster `cluster`, is a zero
  // cluster in a version 2 image (QEMU refuses these: reads, writes and the
  // block-device calls all stop there). REQUIRES: cluster within the L1 table.
  Status CheckZeroFlagAllowed(uint64_t cluster, uint64_t entry) const;

  // The overlap check (qcow2_overlap.h, which states the rule; both defined
  // in qcow2_overlap.cc). LoadOverlapGuard builds the metadata map once the
  // refcounts are loaded and hooks it into the caches and the allocator.
  Status LoadOverlapGuard();
  // Before guest data reaches [host_offset, host_offset + bytes) of the data
  // file, or the daemon is told it may write there: a Corrupt status (image
  // marked corrupt) when that range holds metadata. `what` names the write.
  Status CheckDataWrite(uint64_t host_offset, uint64_t bytes, const char* what);

  Qcow2Header header_;
  File* data_file() const override { return data_file_ ? data_file_.get() : file_.get(); }
  std::unique_ptr<File> data_file_;  // external data file, if the image has one
  std::string snapshot_;             // the snapshot viewed; empty: the active state
  L1Table l1_;                       // active (or snapshot) L1, host byte order
  std::unique_ptr<TableCache> l2_cache_;

  bool writable_ = false;
  bool metadata_only_ = false;  // OpenOptions::metadata_only
  // OpenOptions::maintain_bitmaps: the bitmaps marked in use at open (as
  // they were before), and the guest ranges written since (start -> end).
  std::vector<Qcow2Bitmap> maintained_bitmaps_;
  std::map<uint64_t, uint64_t> noted_writes_ GUARDED_BY(rw_mu_);
  size_t refcount_cache_bytes_ = 0;             // OpenOptions::refcount_cache_bytes, for ReloadRefcountsLocked
  bool header_writable_ = false;                // opened with OpenOptions::header_only: only ChangeBackingFile writes
  Status stopped_ GUARDED_BY(rw_mu_);           // the failure that stopped writing (WriteStep)
  std::unique_ptr<Qcow2OverlapGuard> overlap_;  // set when writable_; outlives refcounts_, which uses it
  std::unique_ptr<Qcow2Refcounts> refcounts_;
  std::set<uint64_t> dirty_l1_ GUARDED_BY(rw_mu_);  // L1 indices changed since the last flush
  // Where the next compressed cluster may start (0: in a new cluster). Only
  // valid until frees are applied: the cluster could then be reused.
  uint64_t free_byte_offset_ GUARDED_BY(rw_mu_) = 0;
  uint64_t file_end_seen_ = 0;  // DescribeCluster: a file size seen (the file only grows while served)
  size_t max_dirty_slices_ = 0;
  bool lazy_refcounts_ = false;  // qcow2 v3 compatible feature bit 0
  std::once_flag preallocation_once_;
  bool metadata_preallocated_ = false;  // set once under preallocation_once_
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_IMAGE_H_
