// MeasureImage: QEMU 7.2's qcow2_measure and raw_measure, figure for figure.
// The qcow2 figures are qcow2_calc_prealloc_size's: one header cluster, L2
// tables for every cluster, an L1 table rounded to whole clusters, and the
// refcount blocks and table that count all of it (the fixed point of
// RefcountMetadataSize, shared with create). `required` removes from the
// fully allocated size the data clusters the source does not need; like
// QEMU's it keeps the metadata of a full image, so it is an upper bound.
#include "dmcow/measure.h"

#include <string>

#include "create/create_internal.h"
#include "qcow2/qcow2_header.h"
#include "util.h"

namespace dmcow {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxL1Bytes = 32 << 20;  // QCOW_MAX_L1_SIZE

Status Bad(const std::string& msg) { return Status::InvalidArgument(msg); }

// qcow2_calc_prealloc_size.
uint64_t Qcow2PreallocSize(uint64_t virtual_size, uint64_t cluster_size, uint32_t refcount_order, bool extended_l2) {
  const uint64_t l2e_size = extended_l2 ? 16 : 8;
  const uint64_t aligned = RoundUp(virtual_size, cluster_size);
  uint64_t meta = cluster_size;  // the header
  const uint64_t l2_entries = RoundUp(aligned / cluster_size, cluster_size / l2e_size);
  meta += l2_entries * l2e_size;
  const uint64_t l1_entries = RoundUp(l2_entries * l2e_size / cluster_size, cluster_size / 8);
  meta += l1_entries * 8;
  meta += static_cast<uint64_t>(create_internal::RefcountMetadataSize(
      static_cast<int64_t>((meta + aligned) / cluster_size), cluster_size, refcount_order, false, nullptr));
  return meta + aligned;
}

// Bytes of data clusters (of `cluster_size`) a copy of `source` writes: every
// cluster holding a byte that reads from stored data and is not known to be
// zero, through the whole chain (QEMU's loop over bdrv_block_status_above).
Status SourceDataBytes(Image* source, uint64_t cluster_size, uint64_t* bytes) {
  *bytes = 0;
  const uint64_t size = source->virtual_size();
  for (uint64_t offset = 0; offset < size;) {
    MapExtent e;
    DMCOW_RETURN_IF_ERROR(GetMapExtent(source, offset, size - offset, &e));
    if (e.length == 0)
      return Status::Corrupt(source->filename() + ": empty extent at offset " + std::to_string(offset));
    uint64_t next = offset + e.length;
    if (!e.zero && e.data) {
      next = RoundUp(next, cluster_size);  // the rest of a counted cluster is in it already
      *bytes += next - RoundDown(offset, cluster_size);
    }
    offset = next;
  }
  return Status::OK();
}

// qcow2_get_persistent_dirty_bitmap_size: every bitmap as if fully set,
// with its table, plus the directory.
uint64_t BitmapsSize(const Image& source, uint64_t cluster_size) {
  uint64_t total = 0, directory = 0;
  for (const BitmapInfo& b : source.info().bitmaps) {
    const uint64_t bits = DivRoundUp(source.virtual_size(), uint64_t{b.granularity});
    const uint64_t clusters = DivRoundUp(DivRoundUp(bits, 8), cluster_size);
    total += clusters * cluster_size + RoundUp(clusters * 8, cluster_size);
    directory += RoundUp(24 + b.name.size(), 8);
  }
  return total + RoundUp(directory, cluster_size);
}

Status MeasureQcow2(const CreateOptions& o, Image* source, MeasureResult* out) {
  // qcow2_measure's checks, in its order and words: the LUKS options first.
  uint64_t luks_bytes = 0;
  if (o.encrypt_format == "luks") {
    LuksCreateOptions lo;
    if (const std::string error = create_internal::CheckLuksOptions(o, &lo); !error.empty()) return Bad(error);
    luks_bytes = LuksRegionBytes(lo.spec);
    if (luks_bytes == 0) return Bad("cipher " + lo.spec.alg + "-" + lo.spec.mode + " is not supported");
  } else if (!o.encrypt_format.empty() && o.encrypt_format != "aes") {
    return Bad("Parameter 'format' does not accept value '" + o.encrypt_format + "'");
  }
  const uint64_t cs = o.cluster_size;
  if (!IsPowerOfTwo(cs) || cs < (uint64_t{1} << qcow2::kMinClusterBits) ||
      cs > (uint64_t{1} << qcow2::kMaxClusterBits)) {
    return Bad("Cluster size must be a power of two between 512 and 2048k");
  }
  if (o.extended_l2 && cs < 16384) {
    return Bad("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
  int version;
  if (o.compat == "0.10") {
    version = 2;
  } else if (o.compat == "1.1") {
    version = 3;
  } else {
    return Bad("Invalid compatibility level: '" + o.compat + "'");
  }
  if (o.refcount_bits > 64 || !IsPowerOfTwo(o.refcount_bits)) {
    return Bad("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && o.refcount_bits != 16) {
    return Bad(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or "
        "greater)");
  }
  create_internal::Prealloc prealloc;
  if (!create_internal::ParsePrealloc(o.preallocation, &prealloc)) {
    return Bad("invalid parameter value: " + o.preallocation);
  }
  uint64_t virtual_size = RoundUp(source ? 0 : o.size, cs);
  const uint64_t l2e_size = o.extended_l2 ? 16 : 8;
  const uint64_t l2_tables = DivRoundUp(virtual_size / cs, cs / l2e_size);
  if (l2_tables * 8 > kMaxL1Bytes) return Bad("The image size is too large (try using a larger cluster size)");

  uint64_t required = 0;
  if (source) {
    virtual_size = RoundUp(source->virtual_size(), cs);
    if (!o.backing_file.empty()) {
      // The new backing file may share nothing with the source: all of it.
      required = virtual_size;
    } else {
      DMCOW_RETURN_IF_ERROR(SourceDataBytes(source, cs, &required));
    }
  }
  if (prealloc == create_internal::Prealloc::kFalloc || prealloc == create_internal::Prealloc::kFull) {
    required = virtual_size;
  }
  const uint32_t refcount_order = static_cast<uint32_t>(__builtin_ctz(o.refcount_bits));
  // The LUKS region, whole clusters, in both (qcow2_measure's luks_payload_size).
  out->fully_allocated = RoundUp(luks_bytes, cs) + Qcow2PreallocSize(virtual_size, cs, refcount_order, o.extended_l2);
  out->required = out->fully_allocated - virtual_size + required;
  out->has_bitmaps = version >= 3 && source && source->info().format == "qcow2" && source->info().version >= 3;
  out->bitmaps = out->has_bitmaps ? BitmapsSize(*source, cs) : 0;
  return Status::OK();
}

}  // namespace

Status MeasureImage(const CreateOptions& options, Image* source, MeasureResult* out) {
  *out = MeasureResult();
  if (options.format == "raw") {
    // Unallocated sectors count towards a raw file's size.
    out->required = out->fully_allocated = RoundUp(source ? source->virtual_size() : options.size, kSector);
    return Status::OK();
  }
  if (options.format == "qcow2") return MeasureQcow2(options, source, out);
  if (options.format == "luks") return Bad("Encryption is not supported by dmcow-img");
  if (create_internal::IsBlockdevDriver(options.format)) {
    return Bad("Block driver '" + options.format + "' does not support size measurement");
  }
  return Bad("Unknown file format '" + options.format + "'");
}

}  // namespace dmcow
