// ReferenceCounts: how many times each host cluster is referenced, as the
// check counts it (QEMU's "in-memory refcount table"), in bounded memory.
//
// QEMU keeps one refcount-width counter per cluster (16 bits by default, 32
// MiB for 16 million clusters). Almost every cluster is referenced 0, 1 or
// a few times, so we keep a packed counter of at most 4 bits per cluster
// (8 MiB for 16 million clusters); with refcounts wider than 4 bits the top
// value means "look in the exact table", which only clusters referenced 15
// times or more (many snapshots) need. With refcounts of 4 bits or less the
// counter is exactly the refcount width and the table is never used.
//
// Thread safety: none.
#ifndef DMCOW_QCOW_REFERENCE_COUNTS_H_
#define DMCOW_QCOW_REFERENCE_COUNTS_H_

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace dmcow {

class ReferenceCounts {
 public:
  // refcount_bits: the image's refcount width (1 to 64); counts never exceed
  // the largest refcount it can hold.
  explicit ReferenceCounts(uint32_t refcount_bits)
      : bits_(refcount_bits < 4 ? refcount_bits : 4),
        bits_log2_(bits_ == 1   ? 0
                   : bits_ == 2 ? 1
                                : 2),
        per_word_(64 / bits_),
        field_max_((uint64_t{1} << bits_) - 1),
        max_(refcount_bits >= 64 ? UINT64_MAX : (uint64_t{1} << refcount_bits) - 1),
        exact_(refcount_bits > 4),
        direct_limit_(exact_ ? field_max_ - 1 : field_max_) {}

  uint64_t size() const { return size_; }
  uint64_t max() const { return max_; }

  // Grows to `clusters` entries (new ones zero); never shrinks.
  void Resize(uint64_t clusters) {
    if (clusters <= size_) return;
    size_ = clusters;
    words_.resize((clusters + per_word_ - 1) / per_word_, 0);
  }

  // Every count back to zero, size kept.
  void Clear() {
    std::fill(words_.begin(), words_.end(), 0);
    big_.clear();
  }

  uint64_t Get(uint64_t cluster) const {
    const uint64_t field = Field(cluster);
    if (field == field_max_ && exact_) return big_.at(cluster);
    return field;
  }

  // Adds one reference; false (and no change) if the count is already at
  // the refcount maximum. REQUIRES: cluster < size().
  bool Increment(uint64_t cluster) {
    uint64_t& w = words_[cluster >> (6 - bits_log2_)];
    const unsigned shift = static_cast<unsigned>((cluster & (per_word_ - 1)) << bits_log2_);
    if (((w >> shift) & field_max_) < direct_limit_) {
      w += uint64_t{1} << shift;
      return true;
    }
    return IncrementSlow(cluster);
  }

  // REQUIRES: cluster < size(), value <= max().
  void Set(uint64_t cluster, uint64_t value) {
    if (exact_ && value >= field_max_) {
      SetField(cluster, field_max_);
      big_[cluster] = value;
      return;
    }
    if (exact_ && Field(cluster) == field_max_) big_.erase(cluster);
    SetField(cluster, value);
  }

  // True if clusters [first, first + count) are all zero, looking at whole
  // words where it can. REQUIRES: first + count <= size().
  bool AllZero(uint64_t first, uint64_t count) const {
    uint64_t c = first;
    const uint64_t end = first + count;
    while (c < end) {
      if (c % per_word_ == 0 && end - c >= per_word_) {
        if (words_[c / per_word_] != 0) return false;
        c += per_word_;
      } else {
        if (Field(c) != 0) return false;
        c++;
      }
    }
    return true;
  }

  // Bytes held (for measurements and tests).
  uint64_t MemoryBytes() const { return words_.capacity() * 8 + big_.size() * 32; }

 private:
  uint64_t Field(uint64_t cluster) const {
    const unsigned shift = static_cast<unsigned>((cluster & (per_word_ - 1)) << bits_log2_);
    return (words_[cluster >> (6 - bits_log2_)] >> shift) & field_max_;
  }
  void SetField(uint64_t cluster, uint64_t value) {
    const unsigned shift = static_cast<unsigned>((cluster & (per_word_ - 1)) << bits_log2_);
    uint64_t& w = words_[cluster >> (6 - bits_log2_)];
    w = (w & ~(field_max_ << shift)) | (value << shift);
  }
  bool IncrementSlow(uint64_t cluster) {
    const uint64_t field = Field(cluster);
    if (!exact_) return false;  // at field_max_, which is the refcount maximum
    if (field == field_max_ - 1) {
      SetField(cluster, field_max_);
      big_[cluster] = field_max_;
      return true;
    }
    uint64_t& value = big_.at(cluster);
    if (value == max_) return false;
    value++;
    return true;
  }

  const uint32_t bits_;  // per cluster: 1, 2 or 4
  const uint32_t bits_log2_;
  const uint64_t per_word_;      // clusters per 64-bit word
  const uint64_t field_max_;     // all ones in a field
  const uint64_t max_;           // the refcount maximum
  const bool exact_;             // whether field_max_ means "see big_"
  const uint64_t direct_limit_;  // fields below this are incremented in place
  uint64_t size_ = 0;
  std::vector<uint64_t> words_;
  std::unordered_map<uint64_t, uint64_t> big_;  // exact counts >= field_max_
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_REFERENCE_COUNTS_H_
