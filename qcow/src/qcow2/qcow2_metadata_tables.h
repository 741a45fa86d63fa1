// Readers for the qcow2 tables that hang off the header: the snapshot table
// and the bitmap directory. Every entry is bounds-checked before use.
#ifndef DMCOW_QCOW_QCOW2_METADATA_TABLES_H_
#define DMCOW_QCOW_QCOW2_METADATA_TABLES_H_

#include <vector>

#include "qcow2/qcow2_header.h"

namespace dmcow {

Status ReadQcow2Snapshots(File* file, const Qcow2Header& header, std::vector<SnapshotInfo>* snapshots);

Status ReadQcow2Bitmaps(File* file, const Qcow2Header& header, std::vector<BitmapInfo>* bitmaps);

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_METADATA_TABLES_H_
