// Readers for the qcow2 tables that hang off the header: the snapshot table
// and the bitmap directory. Every entry is bounds-checked before use.
#ifndef DMCOW_QCOW_QCOW2_METADATA_TABLES_H_
#define DMCOW_QCOW_QCOW2_METADATA_TABLES_H_

#include <vector>

#include "qcow2/qcow2_header.h"

namespace dmcow {

// With `unknown_extra`, each snapshot's extra data past the 24 bytes QEMU
// knows is returned too, one vector per snapshot, so a rewrite keeps it.
Status ReadQcow2Snapshots(File* file, const Qcow2Header& header, std::vector<SnapshotInfo>* snapshots,
                          std::vector<std::vector<uint8_t>>* unknown_extra = nullptr);

// The bytes the snapshot table takes, entries and their padding (what a
// rewrite frees). Reads only the entries' fixed parts; bounded as above.
Status Qcow2SnapshotTableBytes(File* file, const Qcow2Header& header, uint64_t* bytes);

Status ReadQcow2Bitmaps(File* file, const Qcow2Header& header, std::vector<BitmapInfo>* bitmaps);

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_METADATA_TABLES_H_
