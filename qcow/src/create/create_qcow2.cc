// qcow2 image creation: the options checked as QEMU 7.2 checks them
// (CreateQcow2, at the end), and the image laid out exactly as QEMU 7.2
// lays it out.
//
// qemu-img create does not compute a layout: it writes a minimal header, a
// refcount table (cluster 1) and an empty refcount block (cluster 2), opens
// that image with the qcow2 driver and lets the driver's allocator place
// everything else while it "truncates" the empty image to its size
// (qcow2_co_create -> qcow2_co_truncate -> preallocate_co). Where each
// structure lands therefore depends on the allocator's exact behaviour: its
// free-cluster cursor, when it needs a new refcount block and where that
// block goes (it may describe itself), how the refcount table grows and
// frees the old one, how data allocations stop at L2 table boundaries, the
// copy-on-write of a partial last cluster, and so on.
//
// Qcow2Model replays that sequence on an in-memory file: each function below
// is the QEMU function named in its comment, restricted to what can happen
// while creating an image (no existing data, no backing file attached yet,
// no snapshots, no compressed clusters), with QEMU's error codes. The model
// records every byte QEMU would write and the file length it would leave;
// WriteQcow2 then writes that content. Stale bytes are kept too: a freed
// refcount table that QEMU later hands out as a data cluster keeps its old
// content in QEMU's file, so it does in ours.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "create/create_internal.h"
#include "crypto/luks.h"
#include "qcow2/qcow2_header.h"
#include "util.h"

namespace dmcow::create_internal {
namespace {

// Validated qcow2 parameters (CreateQcow2 makes them from CreateOptions).
struct Qcow2Params {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  bool zstd = false;
  std::string data_file;
  bool data_file_raw = false;
  Prealloc prealloc = Prealloc::kOff;
  std::string backing_file;
  std::string backing_fmt;  // stored in the backing format extension when not empty
  uint64_t size = 0;        // multiple of 512
  uint32_t crypt_method = 0;
  uint64_t luks_region_bytes = 0;  // LUKS: the encryption header region QEMU allocates last
};

constexpr uint64_t kInvOffset = UINT64_MAX;  // INV_OFFSET
constexpr uint64_t kReftOffsetMask = 0xfffffffffffffe00ULL;
constexpr uint64_t kL1eOffsetMask = 0x00fffffffffffe00ULL;
constexpr uint64_t kOflagCopied = 1ULL << 63;
constexpr uint64_t kRequestMaxBytes = (INT_MAX >> 9) << 9;  // BDRV_REQUEST_MAX_BYTES

// One pending L2 update (QCowL2Meta) of a fresh allocation.
struct L2Meta {
  uint64_t offset = 0;        // guest offset of the first cluster
  uint64_t alloc_offset = 0;  // host offset of the first cluster
  uint64_t nb_clusters = 0;
  uint64_t cow_start_offset = 0, cow_start_bytes = 0;
  uint64_t cow_end_offset = 0, cow_end_bytes = 0;
};

class Qcow2Model {
 public:
  explicit Qcow2Model(const Qcow2Params& p)
      : p_(p),
        cb_(p.cluster_bits),
        cs_(uint64_t{1} << p.cluster_bits),
        refcount_order_(p.refcount_order),
        refcount_block_bits_(p.cluster_bits + 3 - p.refcount_order),
        refcount_block_size_(uint64_t{1} << refcount_block_bits_),
        refcount_max_(p.refcount_order == 6 ? UINT64_MAX : (uint64_t{1} << (1u << p.refcount_order)) - 1),
        entry_bytes_(p.extended_l2 ? 16 : 8),
        l2_bits_(p.cluster_bits - (p.extended_l2 ? 4 : 3)),
        l2_size_(uint64_t{1} << l2_bits_),
        subcluster_bits_(p.extended_l2 ? p.cluster_bits - 5 : p.cluster_bits),
        has_data_file_(!p.data_file.empty()) {}

  // qcow2_co_create from the first header write to the final close. Returns
  // 0 or -errno; *what says which step failed.
  int Run(std::string* what);

  // Results.
  const std::map<uint64_t, std::vector<uint8_t>>& clusters() const { return store_; }
  uint64_t file_size() const { return file_size_; }
  uint64_t data_file_size() const { return data_file_size_; }
  uint64_t luks_offset() const { return luks_offset_; }
  // Ranges QEMU extends with falloc/full preallocation, in the image and in
  // the data file.
  struct Range {
    uint64_t start = 0, end = 0;
  };
  const std::vector<Range>& file_prealloc() const { return file_prealloc_; }
  const std::vector<Range>& data_prealloc() const { return data_prealloc_; }

 private:
  // --- the in-memory file --------------------------------------------------
  uint8_t* Cluster(uint64_t offset) {
    auto& c = store_[offset & ~(cs_ - 1)];
    if (c.empty()) c.assign(cs_, 0);
    return c.data();
  }
  const uint8_t* ClusterOrNull(uint64_t offset) const {
    auto it = store_.find(offset & ~(cs_ - 1));
    return it == store_.end() ? nullptr : it->second.data();
  }
  void Write(uint64_t offset, const uint8_t* data, uint64_t len) {
    uint64_t done = 0;
    while (done < len) {
      uint64_t in = (offset + done) & (cs_ - 1);
      uint64_t n = std::min(len - done, cs_ - in);
      std::memcpy(Cluster(offset + done) + in, data + done, n);
      done += n;
    }
    file_size_ = std::max(file_size_, offset + len);
  }
  void WriteZeroes(uint64_t offset, uint64_t len) {
    for (uint64_t done = 0; done < len;) {
      uint64_t in = (offset + done) & (cs_ - 1);
      uint64_t n = std::min(len - done, cs_ - in);
      auto it = store_.find((offset + done) & ~(cs_ - 1));
      if (it != store_.end()) std::memset(it->second.data() + in, 0, n);
      done += n;
    }
    file_size_ = std::max(file_size_, offset + len);
  }
  // A table QEMU's cache starts empty and flushes as a whole cluster.
  uint8_t* EmptyTable(uint64_t offset) {
    uint8_t* c = Cluster(offset);
    std::memset(c, 0, cs_);
    file_size_ = std::max(file_size_, offset + cs_);
    return c;
  }
  void WriteBE64(uint64_t offset, uint64_t v) {
    uint8_t b[8];
    StoreBE64(b, v);
    Write(offset, b, 8);
  }

  // --- refcount block entries (get_refcount_ro0..6) ------------------------
  uint64_t GetRc(const uint8_t* b, uint64_t i) const {
    switch (refcount_order_) {
      case 0: return (b[i / 8] >> (i % 8)) & 1;
      case 1: return (b[i / 4] >> (2 * (i % 4))) & 3;
      case 2: return (b[i / 2] >> (4 * (i % 2))) & 15;
      case 3: return b[i];
      case 4: return LoadBE16(b + 2 * i);
      case 5: return LoadBE32(b + 4 * i);
      default: return LoadBE64(b + 8 * i);
    }
  }
  void SetRc(uint8_t* b, uint64_t i, uint64_t v) {
    switch (refcount_order_) {
      case 0: b[i / 8] = static_cast<uint8_t>((b[i / 8] & ~(1u << (i % 8))) | (v << (i % 8))); break;
      case 1: b[i / 4] = static_cast<uint8_t>((b[i / 4] & ~(3u << (2 * (i % 4)))) | (v << (2 * (i % 4)))); break;
      case 2: b[i / 2] = static_cast<uint8_t>((b[i / 2] & ~(15u << (4 * (i % 2)))) | (v << (4 * (i % 2)))); break;
      case 3: b[i] = static_cast<uint8_t>(v); break;
      case 4: StoreBE16(b + 2 * i, static_cast<uint16_t>(v)); break;
      case 5: StoreBE32(b + 4 * i, static_cast<uint32_t>(v)); break;
      default: StoreBE64(b + 8 * i, v); break;
    }
  }

  // qcow2_get_refcount
  uint64_t GetRefcount(uint64_t cluster_index) const {
    uint64_t ti = cluster_index >> refcount_block_bits_;
    if (ti >= reftable_.size()) return 0;
    uint64_t block = reftable_[ti] & kReftOffsetMask;
    if (block == 0) return 0;
    const uint8_t* b = ClusterOrNull(block);
    return b ? GetRc(b, cluster_index & (refcount_block_size_ - 1)) : 0;
  }

  bool InSameRefcountBlock(uint64_t a, uint64_t b) const {
    return (a >> (cb_ + refcount_block_bits_)) == (b >> (cb_ + refcount_block_bits_));
  }

  void UpdateMaxRefcountTableIndex() {
    uint64_t i = reftable_.size() - 1;
    while (i > 0 && (reftable_[i] & kReftOffsetMask) == 0) i--;
    max_reftable_index_ = i;
  }

  int AllocRefcountBlock(uint64_t cluster_index, uint64_t* block);
  int64_t RefcountArea(uint64_t start_offset, uint64_t additional_clusters, bool exact_size,
                       uint64_t new_refblock_index, uint64_t new_refblock_offset);
  int UpdateRefcount(uint64_t offset, uint64_t length, uint64_t addend, bool decrease);
  int64_t AllocClustersNoref(uint64_t size);
  int64_t AllocClusters(uint64_t size);
  int64_t AllocClustersAt(uint64_t offset, uint64_t nb_clusters);
  void FreeClusters(uint64_t offset, uint64_t size) { (void)UpdateRefcount(offset, size, 1, true); }
  int64_t GetLastCluster(uint64_t size) const;

  int GrowL1Table(uint64_t min_size);
  int L2Allocate(uint64_t l1_index);
  int GetClusterTable(uint64_t offset, uint64_t* l2_offset, uint64_t* l2_index);
  uint64_t GetL2Entry(uint64_t l2_offset, uint64_t index) {
    return LoadBE64(Cluster(l2_offset) + index * entry_bytes_);
  }
  int HandleCopied(uint64_t guest_offset);
  int HandleAlloc(uint64_t guest_offset, uint64_t* host_offset, uint64_t* bytes, std::vector<L2Meta>* metas);
  int AllocHostOffset(uint64_t offset, uint64_t* bytes, uint64_t* host_offset, std::vector<L2Meta>* metas);
  int LinkL2(const L2Meta& m);
  int Preallocate(uint64_t offset, uint64_t new_length, Prealloc mode, std::string* what);
  int Truncate(uint64_t size, Prealloc mode, std::string* what);
  int BuildHeader(bool with_backing);

  void TruncateData(uint64_t new_size, Prealloc mode) {
    if (mode == Prealloc::kFalloc || mode == Prealloc::kFull) data_prealloc_.push_back({data_file_size_, new_size});
    data_file_size_ = new_size;
  }

  const Qcow2Params& p_;
  const uint32_t cb_;
  const uint64_t cs_;
  const uint32_t refcount_order_;
  const uint32_t refcount_block_bits_;
  const uint64_t refcount_block_size_;
  const uint64_t refcount_max_;
  const uint32_t entry_bytes_;
  const uint32_t l2_bits_;
  const uint64_t l2_size_;  // entries per L2 table, also the L2 slice size
  const uint32_t subcluster_bits_;
  const bool has_data_file_;

  std::map<uint64_t, std::vector<uint8_t>> store_;
  uint64_t file_size_ = 0;
  uint64_t data_file_size_ = 0;
  uint64_t luks_offset_ = 0;
  std::vector<Range> file_prealloc_, data_prealloc_;

  std::vector<uint64_t> reftable_;
  uint64_t reftable_offset_ = 0;
  uint64_t max_reftable_index_ = 0;
  uint64_t free_cluster_index_ = 0;
  std::vector<uint64_t> l1_;
  uint64_t l1_offset_ = 0;
};

// alloc_refcount_block: the refcount block for cluster_index, allocating it
// (and growing the refcount table) if needed. -EAGAIN after an allocation.
int Qcow2Model::AllocRefcountBlock(uint64_t cluster_index, uint64_t* block) {
  const uint64_t ti = cluster_index >> refcount_block_bits_;
  if (ti < reftable_.size()) {
    uint64_t off = reftable_[ti] & kReftOffsetMask;
    if (off != 0) {
      *block = off;
      return 0;
    }
  }
  int64_t new_block = AllocClustersNoref(cs_);
  if (new_block < 0) return static_cast<int>(new_block);
  const uint64_t nb = static_cast<uint64_t>(new_block);
  if (InSameRefcountBlock(nb, cluster_index << cb_)) {
    uint8_t* b = EmptyTable(nb);
    SetRc(b, (nb >> cb_) & (refcount_block_size_ - 1), 1);  // the block describes itself
  } else {
    int ret = UpdateRefcount(nb, cs_, 1, false);
    if (ret < 0) return ret;
    EmptyTable(nb);
  }
  if (ti < reftable_.size()) {
    WriteBE64(reftable_offset_ + ti * 8, nb);
    reftable_[ti] = nb;
    max_reftable_index_ = std::max(max_reftable_index_, ti);
    return -EAGAIN;
  }
  // Grow the refcount table: new self-describing structures at the end.
  uint64_t blocks_used = DivRoundUp(std::max(cluster_index + 1, (nb >> cb_) + 1), refcount_block_size_);
  if (blocks_used > qcow2::kMaxRefTableBytes / 8) return -EFBIG;
  uint64_t meta_offset = blocks_used * refcount_block_size_ * cs_;
  int64_t r = RefcountArea(meta_offset, 0, false, ti, nb);
  if (r < 0) return static_cast<int>(r);
  return -EAGAIN;
}

// qcow2_refcount_area: a new refcount table and blocks at start_offset that
// cover themselves and additional_clusters beyond them. Returns the offset
// after them.
int64_t Qcow2Model::RefcountArea(uint64_t start_offset, uint64_t additional_clusters, bool exact_size,
                                 uint64_t new_refblock_index, uint64_t new_refblock_offset) {
  uint64_t total_u64 = 0;
  RefcountMetadataSize(static_cast<int64_t>(start_offset / cs_ + additional_clusters), cs_, refcount_order_,
                       !exact_size, &total_u64);
  if (total_u64 > qcow2::kMaxRefTableBytes) return -EFBIG;  // sic: QEMU compares a count with bytes
  const uint64_t total = total_u64;
  const uint64_t area_index = (start_offset / cs_) / refcount_block_size_;
  uint64_t table_size = exact_size ? total : total + DivRoundUp(total, 2);
  table_size = RoundUp(table_size, cs_ / 8);
  const uint64_t table_clusters = table_size * 8 / cs_;
  if (table_size > qcow2::kMaxRefTableBytes) return -EFBIG;

  std::vector<uint64_t> table(table_size, 0);
  uint64_t keep = table_size > max_reftable_index_ ? max_reftable_index_ + 1 : table_size;
  keep = std::min<uint64_t>(keep, reftable_.size());
  std::copy(reftable_.begin(), reftable_.begin() + static_cast<ptrdiff_t>(keep), table.begin());
  if (new_refblock_offset) table[new_refblock_index] = new_refblock_offset;

  uint64_t additional_blocks = 0;
  for (uint64_t i = area_index; i < total; i++) additional_blocks += table[i] == 0;
  const uint64_t table_offset = start_offset + additional_blocks * cs_;
  const uint64_t end_offset = table_offset + table_clusters * cs_;

  uint64_t block_offset = start_offset;
  for (uint64_t i = area_index; i < total; i++) {
    uint8_t* b;
    if (table[i]) {
      b = Cluster(table[i]);
    } else {
      b = EmptyTable(block_offset);
      table[i] = block_offset;
      block_offset += cs_;
    }
    uint64_t first_covered = i * refcount_block_size_ * cs_;
    if (first_covered < end_offset) {
      uint64_t j = first_covered < start_offset ? (start_offset - first_covered) / cs_ : 0;
      uint64_t end_index = std::min((end_offset - first_covered) / cs_, refcount_block_size_);
      for (; j < end_index; j++) SetRc(b, j, 1);
    }
  }

  std::vector<uint8_t> bytes(table_size * 8);
  for (uint64_t i = 0; i < table_size; i++) StoreBE64(bytes.data() + 8 * i, table[i]);
  Write(table_offset, bytes.data(), bytes.size());

  uint64_t old_offset = reftable_offset_, old_size = reftable_.size();
  reftable_ = std::move(table);
  reftable_offset_ = table_offset;
  UpdateMaxRefcountTableIndex();
  FreeClusters(old_offset, old_size * 8);
  return static_cast<int64_t>(end_offset);
}

// update_refcount
int Qcow2Model::UpdateRefcount(uint64_t offset, uint64_t length, uint64_t addend, bool decrease) {
  if (length == 0) return 0;
  const uint64_t start = offset & ~(cs_ - 1);
  const uint64_t last = (offset + length - 1) & ~(cs_ - 1);
  int64_t old_table_index = -1;
  uint64_t block = 0;
  int ret = 0;
  uint64_t cluster_offset;
  for (cluster_offset = start; cluster_offset <= last; cluster_offset += cs_) {
    uint64_t ci = cluster_offset >> cb_;
    int64_t ti = static_cast<int64_t>(ci >> refcount_block_bits_);
    if (ti != old_table_index) {
      ret = AllocRefcountBlock(ci, &block);
      // The caller restarts its search for free clusters: the same ones
      // first, if they are still free.
      if (ret == -EAGAIN && free_cluster_index_ > (start >> cb_)) free_cluster_index_ = start >> cb_;
      if (ret < 0) break;
    }
    old_table_index = ti;
    uint8_t* b = Cluster(block);
    uint64_t bi = ci & (refcount_block_size_ - 1);
    uint64_t rc = GetRc(b, bi);
    if (decrease ? (rc - addend > rc) : (rc + addend < rc || rc + addend > refcount_max_)) {
      ret = -EINVAL;
      break;
    }
    rc = decrease ? rc - addend : rc + addend;
    if (rc == 0 && ci < free_cluster_index_) free_cluster_index_ = ci;
    SetRc(b, bi, rc);
  }
  if (ret < 0) {
    // Undo what was done (this may succeed where the caller retries).
    if (cluster_offset > offset) (void)UpdateRefcount(offset, cluster_offset - offset, addend, !decrease);
    return ret;
  }
  return 0;
}

// alloc_clusters_noref
int64_t Qcow2Model::AllocClustersNoref(uint64_t size) {
  const uint64_t nb = DivRoundUp(size, cs_);
retry:
  for (uint64_t i = 0; i < nb; i++) {
    uint64_t next = free_cluster_index_++;
    if (GetRefcount(next) != 0) goto retry;
  }
  if (free_cluster_index_ > 0 && free_cluster_index_ - 1 > (static_cast<uint64_t>(INT64_MAX) >> cb_)) {
    return -EFBIG;
  }
  return static_cast<int64_t>((free_cluster_index_ - nb) << cb_);
}

// qcow2_alloc_clusters
int64_t Qcow2Model::AllocClusters(uint64_t size) {
  int64_t offset;
  int ret;
  do {
    offset = AllocClustersNoref(size);
    if (offset < 0) return offset;
    ret = UpdateRefcount(static_cast<uint64_t>(offset), size, 1, false);
  } while (ret == -EAGAIN);
  if (ret < 0) return ret;
  return offset;
}

// qcow2_alloc_clusters_at
int64_t Qcow2Model::AllocClustersAt(uint64_t offset, uint64_t nb_clusters) {
  if (nb_clusters == 0) return 0;
  uint64_t i;
  int ret;
  do {
    uint64_t ci = offset >> cb_;
    for (i = 0; i < nb_clusters; i++) {
      if (GetRefcount(ci++) != 0) break;
    }
    ret = UpdateRefcount(offset, i << cb_, 1, false);
  } while (ret == -EAGAIN);
  if (ret < 0) return ret;
  return static_cast<int64_t>(i);
}

// qcow2_get_last_cluster
int64_t Qcow2Model::GetLastCluster(uint64_t size) const {
  for (int64_t i = static_cast<int64_t>(DivRoundUp(size, cs_)) - 1; i >= 0; i--) {
    if (GetRefcount(static_cast<uint64_t>(i)) > 0) return i;
  }
  return -EIO;
}

// qcow2_grow_l1_table(exact_size = true)
int Qcow2Model::GrowL1Table(uint64_t min_size) {
  if (min_size <= l1_.size()) return 0;
  if (min_size > INT_MAX / 8) return -EFBIG;
  uint64_t new_size = min_size;
  if (new_size > qcow2::kMaxL1Bytes / 8) return -EFBIG;
  uint64_t size2 = new_size * 8;
  int64_t off = AllocClusters(size2);
  if (off < 0) return static_cast<int>(off);
  std::vector<uint8_t> bytes(size2, 0);
  for (size_t i = 0; i < l1_.size(); i++) StoreBE64(bytes.data() + 8 * i, l1_[i]);
  Write(static_cast<uint64_t>(off), bytes.data(), size2);
  uint64_t old_offset = l1_offset_, old_size = l1_.size();
  l1_offset_ = static_cast<uint64_t>(off);
  l1_.resize(new_size, 0);
  FreeClusters(old_offset, old_size * 8);
  return 0;
}

// l2_allocate (no previous L2 table: nothing to copy)
int Qcow2Model::L2Allocate(uint64_t l1_index) {
  int64_t l2_offset = AllocClusters(l2_size_ * entry_bytes_);
  if (l2_offset < 0) return static_cast<int>(l2_offset);
  if (l2_offset == 0) return -EIO;
  EmptyTable(static_cast<uint64_t>(l2_offset));
  l1_[l1_index] = static_cast<uint64_t>(l2_offset) | kOflagCopied;
  WriteBE64(l1_offset_ + 8 * l1_index, l1_[l1_index]);  // qcow2_write_l1_entry, 8-byte alignment
  return 0;
}

// get_cluster_table
int Qcow2Model::GetClusterTable(uint64_t offset, uint64_t* l2_offset, uint64_t* l2_index) {
  uint64_t l1_index = offset >> (l2_bits_ + cb_);
  if (l1_index >= l1_.size()) return -EIO;  // the L1 table always covers the image here
  if (!(l1_[l1_index] & kOflagCopied)) {
    int ret = L2Allocate(l1_index);
    if (ret < 0) return ret;
  }
  *l2_offset = l1_[l1_index] & kL1eOffsetMask;
  *l2_index = (offset >> cb_) & (l2_size_ - 1);
  return 0;
}

// handle_copied: finds nothing to reuse in a new image, but loads (and so
// allocates) the L2 table first.
int Qcow2Model::HandleCopied(uint64_t guest_offset) {
  uint64_t l2_offset, l2_index;
  int ret = GetClusterTable(guest_offset, &l2_offset, &l2_index);
  if (ret < 0) return ret;
  uint64_t entry = GetL2Entry(l2_offset, l2_index);
  return (entry & kOflagCopied) ? -EIO : 0;  // never linked twice while creating
}

// handle_alloc
int Qcow2Model::HandleAlloc(uint64_t guest_offset, uint64_t* host_offset, uint64_t* bytes, std::vector<L2Meta>* metas) {
  const uint64_t in_cluster = guest_offset & (cs_ - 1);
  uint64_t nb = DivRoundUp(in_cluster + *bytes, cs_);
  uint64_t l2_index = (guest_offset >> cb_) & (l2_size_ - 1);
  nb = std::min(nb, l2_size_ - l2_index);
  nb = std::min(nb, kRequestMaxBytes >> cb_);
  uint64_t l2_offset;
  int ret = GetClusterTable(guest_offset, &l2_offset, &l2_index);
  if (ret < 0) return ret;
  // count_single_write_clusters(new_alloc = true)
  uint64_t count = 0;
  while (count < nb && !(GetL2Entry(l2_offset, l2_index + count) & kOflagCopied)) count++;
  nb = count;

  uint64_t alloc = *host_offset == kInvOffset ? kInvOffset : (*host_offset & ~(cs_ - 1));
  // do_alloc_cluster_offset
  if (has_data_file_) {
    alloc = guest_offset & ~(cs_ - 1);
  } else if (alloc == kInvOffset) {
    int64_t off = AllocClusters(nb * cs_);
    if (off < 0) return static_cast<int>(off);
    alloc = static_cast<uint64_t>(off);
  } else {
    int64_t got = AllocClustersAt(alloc, nb);
    if (got < 0) return static_cast<int>(got);
    nb = static_cast<uint64_t>(got);
  }
  if (nb == 0) {
    *bytes = 0;
    return 0;
  }
  uint64_t requested = *bytes + in_cluster;
  uint64_t avail = nb << cb_;
  uint64_t nb_bytes = std::min(requested, avail);
  *host_offset = alloc + in_cluster;
  *bytes = std::min(*bytes, nb_bytes - in_cluster);

  // calculate_l2_meta(keep_old = false) over unallocated entries
  L2Meta m;
  uint64_t cow_start_to = in_cluster;
  uint64_t cow_end_from = cow_start_to + *bytes;
  uint64_t subcluster_size = uint64_t{1} << subcluster_bits_;
  uint64_t cow_start_from = (in_cluster >> subcluster_bits_) << subcluster_bits_;
  uint64_t cow_end_to = RoundUp(cow_end_from, subcluster_size);
  m.alloc_offset = alloc;
  m.offset = guest_offset & ~(cs_ - 1);
  m.nb_clusters = DivRoundUp(cow_end_from, cs_);
  m.cow_start_offset = cow_start_from;
  m.cow_start_bytes = cow_start_to - cow_start_from;
  m.cow_end_offset = cow_end_from;
  m.cow_end_bytes = cow_end_to - cow_end_from;
  metas->push_back(m);
  return 1;
}

// qcow2_alloc_host_offset
int Qcow2Model::AllocHostOffset(uint64_t offset, uint64_t* bytes, uint64_t* host_offset, std::vector<L2Meta>* metas) {
  uint64_t start = offset, remaining = *bytes, cluster_offset = kInvOffset, cur = 0;
  *host_offset = kInvOffset;
  metas->clear();
  while (true) {
    if (*host_offset == kInvOffset && cluster_offset != kInvOffset) *host_offset = cluster_offset;
    start += cur;
    remaining -= cur;
    if (cluster_offset != kInvOffset) cluster_offset += cur;
    if (remaining == 0) break;
    cur = remaining;
    int ret = HandleCopied(start);
    if (ret < 0) return ret;
    ret = HandleAlloc(start, &cluster_offset, &cur, metas);
    if (ret < 0) return ret;
    if (ret == 0) break;
  }
  *bytes -= remaining;
  return *bytes > 0 ? 0 : -EIO;
}

// qcow2_alloc_cluster_link_l2 for a preallocation (no subcluster bits set)
int Qcow2Model::LinkL2(const L2Meta& m) {
  // perform_cow: the regions read as zeros (nothing is allocated yet and the
  // backing file is only attached after the truncation).
  auto cow = [&](uint64_t off, uint64_t n) {
    if (n == 0) return;
    if (has_data_file_) {
      data_file_size_ = std::max(data_file_size_, m.alloc_offset + off + n);
    } else {
      WriteZeroes(m.alloc_offset + off, n);
    }
  };
  if (m.cow_start_bytes || m.cow_end_bytes) {
    cow(m.cow_start_offset, m.cow_start_bytes);
    cow(m.cow_end_offset, m.cow_end_bytes);
  }
  uint64_t l2_offset, l2_index;
  int ret = GetClusterTable(m.offset, &l2_offset, &l2_index);
  if (ret < 0) return ret;
  uint8_t* table = Cluster(l2_offset);
  for (uint64_t i = 0; i < m.nb_clusters; i++) {
    StoreBE64(table + (l2_index + i) * entry_bytes_, (m.alloc_offset + (i << cb_)) | kOflagCopied);
  }
  return 0;
}

// preallocate_co
int Qcow2Model::Preallocate(uint64_t offset, uint64_t new_length, Prealloc mode, std::string* what) {
  uint64_t bytes = new_length - offset;
  uint64_t host_offset = 0, cur_bytes = 0;
  const uint64_t max_chunk = (uint64_t{INT_MAX} / cs_) * cs_;
  std::vector<L2Meta> metas;
  while (bytes) {
    cur_bytes = std::min(bytes, max_chunk);
    int ret = AllocHostOffset(offset, &cur_bytes, &host_offset, &metas);
    if (ret < 0) {
      *what = "Could not resize image: Allocating clusters failed";
      return ret;
    }
    // qcow2_handle_l2meta walks the list newest first.
    for (auto it = metas.rbegin(); it != metas.rend(); ++it) {
      ret = LinkL2(*it);
      if (ret < 0) {
        *what = "Could not resize image: Mapping clusters failed";
        return ret;
      }
    }
    bytes -= cur_bytes;
    offset += cur_bytes;
  }
  uint64_t file_length = has_data_file_ ? data_file_size_ : file_size_;
  if (host_offset + cur_bytes > file_length) {
    if (mode == Prealloc::kMetadata) mode = Prealloc::kOff;
    if (has_data_file_) {
      TruncateData(host_offset + cur_bytes, mode);
    } else {
      if (mode == Prealloc::kFalloc || mode == Prealloc::kFull) {
        file_prealloc_.push_back({file_size_, host_offset + cur_bytes});
      }
      file_size_ = host_offset + cur_bytes;
    }
  }
  return 0;
}

// qcow2_co_truncate from an empty image to `size`
int Qcow2Model::Truncate(uint64_t size, Prealloc mode, std::string* what) {
  uint64_t new_l1_size = DivRoundUp(size, uint64_t{1} << (cb_ + l2_bits_));
  int ret = GrowL1Table(new_l1_size);
  if (ret < 0) {
    *what = "Could not resize image: Failed to grow the L1 table";
    return ret;
  }
  switch (mode) {
    case Prealloc::kOff:
      if (has_data_file_) TruncateData(size, Prealloc::kOff);
      break;
    case Prealloc::kMetadata:
      ret = Preallocate(0, size, mode, what);
      if (ret < 0) return ret;
      break;
    case Prealloc::kFalloc:
    case Prealloc::kFull: {
      if (has_data_file_) {
        ret = Preallocate(0, size, mode, what);
        if (ret < 0) return ret;
        break;
      }
      uint64_t old_file_size = file_size_;
      int64_t last_cluster = GetLastCluster(old_file_size);
      old_file_size = last_cluster >= 0 ? static_cast<uint64_t>(last_cluster + 1) * cs_ : RoundUp(old_file_size, cs_);
      uint64_t nb_new_data = RoundUp(size, cs_) >> cb_;
      uint64_t nb_new_l2 = DivRoundUp(nb_new_data, cs_ / entry_bytes_) + 1;
      int64_t allocation_start = RefcountArea(old_file_size, nb_new_data + nb_new_l2, true, 0, 0);
      if (allocation_start < 0) {
        *what = "Could not resize image: Failed to resize refcount structures";
        return static_cast<int>(allocation_start);
      }
      int64_t allocated = AllocClustersAt(static_cast<uint64_t>(allocation_start), nb_new_data);
      if (allocated < 0 || static_cast<uint64_t>(allocated) != nb_new_data) {
        *what = "Could not resize image: Failed to allocate data clusters";
        return allocated < 0 ? static_cast<int>(allocated) : -EIO;
      }
      uint64_t new_file_size = static_cast<uint64_t>(allocation_start) + nb_new_data * cs_;
      if (new_file_size > file_size_) file_prealloc_.push_back({file_size_, new_file_size});
      file_size_ = new_file_size;  // file-posix resizes regular files exactly
      uint64_t host = static_cast<uint64_t>(allocation_start), guest = 0;
      while (nb_new_data) {
        uint64_t n = std::min(nb_new_data, l2_size_ - ((guest >> cb_) & (l2_size_ - 1)));
        L2Meta m;
        m.offset = guest;
        m.alloc_offset = host;
        m.nb_clusters = n;
        m.cow_end_offset = n << cb_;
        ret = LinkL2(m);
        if (ret < 0) {
          *what = "Could not resize image: Failed to update L2 tables";
          return ret;
        }
        guest += n * cs_;
        host += n * cs_;
        nb_new_data -= n;
      }
      break;
    }
  }
  return 0;
}

// qcow2_update_header, with the final state. Returns -ENOSPC when the
// extensions (and backing file name) do not fit in the first cluster.
int Qcow2Model::BuildHeader(bool with_backing) {
  Qcow2Header h;
  h.version = p_.version;
  h.cluster_bits = cb_;
  h.size = p_.size;
  h.l1_size = static_cast<uint32_t>(l1_.size());
  h.l1_table_offset = l1_offset_;
  h.refcount_table_offset = reftable_offset_;
  h.refcount_table_clusters = static_cast<uint32_t>(reftable_.size() >> (cb_ - 3));
  if (p_.version >= 3) {
    if (has_data_file_) h.incompatible_features |= qcow2::kIncompatDataFile;
    if (p_.zstd) h.incompatible_features |= qcow2::kIncompatCompression;
    if (p_.extended_l2) h.incompatible_features |= qcow2::kIncompatExtendedL2;
    h.compatible_features = p_.lazy_refcounts ? qcow2::kCompatLazyRefcounts : 0;
    h.autoclear_features = p_.data_file_raw ? qcow2::kAutoclearDataFileRaw : 0;
    h.refcount_order = refcount_order_;
    h.compression_type = p_.zstd ? 1 : 0;
  }
  if (has_data_file_) h.data_file = p_.data_file;
  h.crypt_method = p_.crypt_method;
  if (luks_offset_ != 0) {
    h.has_crypto_ext = true;
    h.crypto_header_offset = luks_offset_;
    h.crypto_header_length = p_.luks_region_bytes;
  }
  if (with_backing) {
    h.backing_file = p_.backing_file;
    h.backing_format = p_.backing_fmt;
  }
  std::vector<uint8_t> cluster;
  size_t used = 0;
  if (!BuildHeaderCluster(h, {}, p_.version >= 3 && cs_ > 4096, &cluster, &used).ok()) return -ENOSPC;
  std::memcpy(Cluster(0), cluster.data(), cs_);
  file_size_ = std::max(file_size_, cs_);
  return 0;
}

int Qcow2Model::Run(std::string* what) {
  // The minimal header, then a refcount table at cluster 1 whose only entry
  // points to an empty refcount block at cluster 2.
  Cluster(0);
  file_size_ = cs_;
  reftable_.assign(cs_ / 8, 0);
  reftable_[0] = 2 * cs_;
  reftable_offset_ = cs_;
  max_reftable_index_ = 0;
  Cluster(cs_);
  WriteBE64(cs_, 2 * cs_);
  EmptyTable(2 * cs_);

  int64_t first = AllocClusters(3 * cs_);
  if (first != 0) {
    *what = "Could not allocate clusters for qcow2 header and refcount table";
    return first < 0 ? static_cast<int>(first) : -EIO;
  }
  if (BuildHeader(false) < 0) {
    *what = "Could not update qcow2 header";
    return -ENOSPC;
  }
  int ret = Truncate(p_.size, p_.prealloc, what);
  if (ret < 0) return ret;
  if (!p_.backing_file.empty()) {
    if (p_.backing_file.size() > qcow2::kMaxBackingNameSize) ret = -EINVAL;
    if (ret == 0) ret = BuildHeader(true);
    if (ret < 0) {
      *what = "Could not assign backing file '" + p_.backing_file + "' with format '" +
              (p_.backing_fmt.empty() ? std::string("(null)") : p_.backing_fmt) + "'";
      return ret;
    }
  } else {
    BuildHeader(false);
  }
  if (p_.luks_region_bytes != 0) {
    // qcow2_set_up_encryption: the region's clusters allocated (and zeroed,
    // WriteQcow2 writes the LUKS header into them), then the header.
    const int64_t at = AllocClusters(p_.luks_region_bytes);
    if (at < 0) {
      *what = "Could not allocate the encryption header";
      return static_cast<int>(at);
    }
    luks_offset_ = static_cast<uint64_t>(at);
    file_size_ = std::max(file_size_, luks_offset_ + RoundUp(p_.luks_region_bytes, cs_));
    BuildHeader(!p_.backing_file.empty());
  }
  // The final tables (every change was also written as QEMU writes it).
  for (uint64_t i = 0; i < reftable_.size(); i++)
    StoreBE64(Cluster(reftable_offset_ + 8 * i) + ((reftable_offset_ + 8 * i) & (cs_ - 1)), reftable_[i]);
  for (uint64_t i = 0; i < l1_.size(); i++)
    StoreBE64(Cluster(l1_offset_ + 8 * i) + ((l1_offset_ + 8 * i) & (cs_ - 1)), l1_[i]);
  return 0;
}

bool AllZero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (p[i]) return false;
  }
  return true;
}

std::string ErrnoText(int err) {
  switch (err) {
    case -EFBIG: return "File too large";
    case -ENOSPC: return "No space left on device";
    case -EINVAL: return "Invalid argument";
    default: return std::strerror(-err);
  }
}

// Writes a qcow2 image (and its external data file) for already validated
// parameters. Error messages are QEMU's, without the "PATH: " prefix.
Status WriteQcow2(Env* env, const std::string& path, const Qcow2Params& params, const std::vector<uint8_t>& luks) {
  auto model = std::make_unique<Qcow2Model>(params);
  std::string what;
  int ret = model->Run(&what);
  if (ret == -EFBIG) {
    return Status::InvalidArgument(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  }
  if (ret < 0) return Status::InvalidArgument(what + ": " + ErrnoText(ret));

  // The data file first, as QEMU: one that cannot be made leaves no image.
  std::unique_ptr<File> data;
  if (!params.data_file.empty()) {
    DMCOW_RETURN_IF_ERROR(CreateFile(env, path, params.data_file, &data));
  }
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(CreateFile(env, path, path, &file));
  const uint64_t cs = uint64_t{1} << params.cluster_bits;
  const uint64_t file_size = model->file_size();
  for (const auto& [offset, bytes] : model->clusters()) {
    if (offset >= file_size) continue;
    uint64_t n = std::min<uint64_t>(cs, file_size - offset);
    if (AllZero(bytes.data(), n)) continue;  // a hole reads the same
    DMCOW_RETURN_IF_ERROR(file->Write(offset, bytes.data(), n));
  }
  DMCOW_RETURN_IF_ERROR(file->Truncate(file_size));
  for (const auto& r : model->file_prealloc()) {
    DMCOW_RETURN_IF_ERROR(PreallocateFileRange(file.get(), r.start, r.end, params.prealloc));
  }
  if (model->luks_offset() != 0) {
    // As QEMU's qcow2_crypto_hdr_init_func: the region's clusters zeroed
    // (allocated), then the header and key material written.
    DMCOW_RETURN_IF_ERROR(file->WriteZeroes(model->luks_offset(), RoundUp(params.luks_region_bytes, cs)));
    DMCOW_RETURN_IF_ERROR(file->Write(model->luks_offset(), luks.data(), luks.size()));
  }
  DMCOW_RETURN_IF_ERROR(file->Sync());
  if (data) {
    DMCOW_RETURN_IF_ERROR(data->Truncate(model->data_file_size()));
    for (const auto& r : model->data_prealloc()) {
      DMCOW_RETURN_IF_ERROR(PreallocateFileRange(data.get(), r.start, r.end, params.prealloc));
    }
    DMCOW_RETURN_IF_ERROR(data->Sync());
  }
  return Status::OK();
}

}  // namespace

// qcow2_refcount_metadata_size
int64_t RefcountMetadataSize(int64_t clusters, uint64_t cluster_size, uint32_t refcount_order, bool generous_increase,
                             uint64_t* refblock_count) {
  int64_t blocks_per_table_cluster = static_cast<int64_t>(cluster_size / 8);
  int64_t refcounts_per_block = static_cast<int64_t>(cluster_size * 8 / (uint64_t{1} << refcount_order));
  int64_t table = 0, blocks = 0, last, n = 0;
  do {
    last = n;
    blocks = (clusters + table + blocks + refcounts_per_block - 1) / refcounts_per_block;
    table = (blocks + blocks_per_table_cluster - 1) / blocks_per_table_cluster;
    n = clusters + blocks + table;
    if (n == last && generous_increase) {
      clusters += (table + 1) / 2;
      n = 0;
      generous_increase = false;
    }
  } while (n != last);
  if (refblock_count) *refblock_count = static_cast<uint64_t>(blocks);
  return (blocks + table) * static_cast<int64_t>(cluster_size);
}

namespace {

bool OneOf(const std::string& v, std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (v == n) return true;
  }
  return false;
}

}  // namespace

std::string CheckLuksOptions(const CreateOptions& o, LuksCreateOptions* lo) {
  // The QAPI enums (qapi/crypto.json) first; then what dmcow has.
  if (!OneOf(o.encrypt_cipher_alg,
             {"aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192", "serpent-256",
              "twofish-128", "twofish-192", "twofish-256", "sm4"})) {
    return "Parameter 'cipher-alg' does not accept value '" + o.encrypt_cipher_alg + "'";
  }
  if (!OneOf(o.encrypt_cipher_mode, {"ecb", "cbc", "xts", "ctr"})) {
    return "Parameter 'cipher-mode' does not accept value '" + o.encrypt_cipher_mode + "'";
  }
  if (!OneOf(o.encrypt_ivgen_alg, {"plain", "plain64", "essiv"})) {
    return "Parameter 'ivgen-alg' does not accept value '" + o.encrypt_ivgen_alg + "'";
  }
  const std::initializer_list<const char*> hashes = {"md5",    "sha1",   "sha224",   "sha256",
                                                     "sha384", "sha512", "ripemd160"};
  if (!OneOf(o.encrypt_ivgen_hash_alg, hashes)) {
    return "Parameter 'ivgen-hash-alg' does not accept value '" + o.encrypt_ivgen_hash_alg + "'";
  }
  if (!OneOf(o.encrypt_hash_alg, hashes)) {
    return "Parameter 'hash-alg' does not accept value '" + o.encrypt_hash_alg + "'";
  }
  if (o.encrypt_secret == nullptr) return "Parameter 'encrypt.key-secret' is required for cipher";
  lo->spec = {o.encrypt_cipher_alg, o.encrypt_cipher_mode, o.encrypt_ivgen_alg,
              o.encrypt_ivgen_alg == "essiv" ? o.encrypt_ivgen_hash_alg : ""};
  lo->hash = o.encrypt_hash_alg;
  lo->iter_time_ms = o.encrypt_iter_time_ms;
  if (lo->spec.alg.rfind("aes-", 0) != 0)
    return "cipher " + lo->spec.alg + " is not supported (dmcow encrypts with AES)";
  return "";
}

namespace {

// qcow2_set_up_encryption's checks, in QEMU's words, and the LUKS region
// made (before any file is: a bad option creates nothing).
Status SetUpEncryption(const std::string& path, const CreateOptions& o, Qcow2Params* p, std::vector<uint8_t>* luks) {
  if (o.encrypt_format.empty()) return Status::OK();
  if (o.encrypt_format != "aes" && o.encrypt_format != "luks") {
    return Bad(path, "Parameter 'format' does not accept value '" + o.encrypt_format + "'");
  }
  if (o.encrypt_format == "aes") {
    if (o.encrypt_secret == nullptr) return Bad(path, "Parameter 'encrypt.key-secret' is required for cipher");
    p->crypt_method = 1;
    return Status::OK();
  }
  LuksCreateOptions lo;
  if (const std::string error = CheckLuksOptions(o, &lo); !error.empty()) return Bad(path, error);
  p->crypt_method = 2;
  return BuildLuks(lo, *o.encrypt_secret, path, luks, &p->luks_region_bytes);
}

}  // namespace

Status CreateQcow2(Env* env, const std::string& path, const CreateOptions& o) {
  Qcow2Params p;
  // The QAPI conversion of the options comes first.
  if (o.compat == "0.10" || o.compat == "v2") {
    p.version = 2;
  } else if (o.compat == "1.1" || o.compat == "v3") {
    p.version = 3;
  } else {
    return Bad(path, "Parameter 'version' does not accept value '" + o.compat + "'");
  }
  if (!o.backing_fmt.empty() && !IsBlockdevDriver(o.backing_fmt)) {
    return Bad(path, "Parameter 'backing-fmt' does not accept value '" + o.backing_fmt + "'");
  }
  if (!ParsePrealloc(o.preallocation, &p.prealloc)) {
    return Bad(path, "Parameter 'preallocation' does not accept value '" + o.preallocation + "'");
  }
  if (o.compression_type != "zlib" && o.compression_type != "zstd") {
    return Bad(path, "Parameter 'compression-type' does not accept value '" + o.compression_type + "'");
  }
  // Then qcow2_co_create's checks, in its order.
  const char* kUseV3 = " (use version=v3 or greater)";
  if (o.extended_l2 && p.version < 3) {
    return Bad(path,
               std::string("Extended L2 entries are only supported with compatibility level 1.1 and above") + kUseV3);
  }
  if (!IsPowerOfTwo(o.cluster_size) || o.cluster_size < (uint64_t{1} << qcow2::kMinClusterBits) ||
      o.cluster_size > (uint64_t{1} << qcow2::kMaxClusterBits)) {
    return Bad(path, "Cluster size must be a power of two between 512 and 2048k");
  }
  if (o.extended_l2 && o.cluster_size < 16384) {
    return Bad(path, "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
  if (!o.backing_file.empty() && p.prealloc != Prealloc::kOff && !o.extended_l2) {
    return Bad(path, "Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (!o.backing_fmt.empty() && o.backing_file.empty()) {
    return Bad(path, "Backing format cannot be used without backing file");
  }
  if (o.lazy_refcounts && p.version < 3) {
    return Bad(path, std::string("Lazy refcounts only supported with compatibility level 1.1 and above") + kUseV3);
  }
  if (o.refcount_bits > 64 || !IsPowerOfTwo(o.refcount_bits)) {
    return Bad(path, "Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (p.version < 3 && o.refcount_bits != 16) {
    return Bad(path,
               std::string("Different refcount widths than 16 bits require compatibility level 1.1 or above") + kUseV3);
  }
  if (o.data_file_raw && o.data_file.empty()) return Bad(path, "data-file-raw requires data-file");
  if (o.data_file_raw && !o.backing_file.empty()) {
    return Bad(path, "Backing file and data-file-raw cannot be used at the same time");
  }
  if (o.data_file_raw && p.prealloc == Prealloc::kOff) p.prealloc = Prealloc::kMetadata;
  if (!o.data_file.empty() && p.version < 3) {
    return Bad(path,
               std::string("External data files are only supported with compatibility level 1.1 and above") + kUseV3);
  }
  if (o.compression_type == "zstd" && p.version < 3) {
    return Bad(path, std::string("Non-zlib compression type is only supported with compatibility level 1.1 and "
                                 "above") +
                         kUseV3);
  }
  if (o.size > static_cast<uint64_t>(INT64_MAX) - kSector) {
    return Bad(path, "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  }
  p.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(o.cluster_size));
  p.refcount_order = static_cast<uint32_t>(__builtin_ctz(o.refcount_bits));
  p.lazy_refcounts = o.lazy_refcounts;
  p.extended_l2 = o.extended_l2;
  p.zstd = o.compression_type == "zstd";
  p.data_file = o.data_file;
  p.data_file_raw = o.data_file_raw;
  p.backing_file = o.backing_file;
  p.backing_fmt = o.backing_fmt;
  p.size = DivRoundUp(o.size, kSector) * kSector;
  std::vector<uint8_t> luks;
  DMCOW_RETURN_IF_ERROR(SetUpEncryption(path, o, &p, &luks));
  Status s = WriteQcow2(env, path, p, luks);
  if (!s.ok() && s.code() == Status::Code::kInvalidArgument) return Bad(path, s.message());
  return s;
}

}  // namespace dmcow::create_internal
