// Peak heap use of a test binary that links heap_peak.cc: it replaces the
// global operator new/delete with counting ones, so a test can assert what
// one open of a hostile image cost (tests never assert on time; memory is
// what a hostile field could blow up).
#ifndef DMCOW_TESTS_HEAP_PEAK_H_
#define DMCOW_TESTS_HEAP_PEAK_H_

#include <cstddef>

namespace dmcow_test {

// Starts a measurement from what is live now.
void ResetHeapPeak();
// The most bytes live at once since ResetHeapPeak, beyond what was live then.
size_t HeapPeakSinceReset();

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_HEAP_PEAK_H_
