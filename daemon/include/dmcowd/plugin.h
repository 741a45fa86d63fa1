// Plugin: the allocation policy of one dm-cow device. The daemon owns the
// kernel channel, the device table and the loop devices; a plugin owns the
// metadata that says where each chunk lives. See daemon/DESIGN.md.
//
// Thread safety: the daemon calls a plugin's methods under one mutex, never
// concurrently. No exception leaves a plugin: every fallible call returns a
// dmcow::Status whose message names the file and what failed.
#ifndef DMCOWD_PLUGIN_H_
#define DMCOWD_PLUGIN_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcowd {

using dmcow::Status;

// What the device is made of, reported by Open.
struct DeviceSpec {
  std::string base_path;        // file or block device, read-only (never written)
  std::string cow_path;         // file or block device the mappings point into
  uint64_t sectors = 0;         // device size in 512-byte sectors
  uint32_t chunk_sectors = 0;   // power of two, 8 .. 65536
  bool read_to_daemon = false;  // reads of unmapped chunks ask Map too
  // Optional: cow sectors from direct_from_sector on are sectors 0.. of the
  // block device direct_path (the cow device is itself a mapping over it;
  // a regular file is refused: a second loop device would not be writable).
  // Linear segments into that range then go to direct_path, one layer of
  // remapping fewer for every folded I/O.
  std::string direct_path;
  uint64_t direct_from_sector = 0;
};

// One question from the kernel.
struct MapRequest {
  uint64_t chunk = 0;       // device chunk
  bool write = false;       // MAP_WRITE (else MAP_READ)
  bool full_chunk = false;  // the write covers the whole chunk
  uint64_t batch = 0;       // number of the read() that delivered it (>= 1)
};

// Values are the ABI's (dmcow_map_kind).
enum class MapKind : uint32_t { kRW = 1, kRO = 2, kZero = 3, kFilledRW = 4, kBase = 5 };

// Chunks [chunk, chunk + nr_chunks) mapped; chunk + i lives at
// cow_sector + i * chunk_sectors (RW, RO, FILLED_RW; 0 otherwise).
struct Mapping {
  MapKind kind = MapKind::kBase;
  uint64_t chunk = 0;
  uint64_t nr_chunks = 1;
  uint64_t cow_sector = 0;
};

// The answer to a MapRequest: a mapping whose extent contains the chunk (a
// write must get RW or FILLED_RW), or a refusal with a positive errno
// (ENOSPC when the cow space is full). A Map that returns a non-OK Status
// failed itself (I/O error): the request is refused with EIO and logged.
struct Answer {
  Mapping mapping;
  int error = 0;
};

// A run of chunks mapped RW to consecutive cow sectors.
struct Extent {
  uint64_t chunk = 0;
  uint64_t nr_chunks = 0;
  uint64_t cow_sector = 0;
};

class Plugin {
 public:
  Plugin() = default;
  Plugin(const Plugin&) = delete;
  Plugin& operator=(const Plugin&) = delete;
  virtual ~Plugin() = default;

  // Opens (creating or formatting where the plugin's options say so) the
  // metadata, and describes the device.
  virtual Status Open(DeviceSpec* spec) = 0;

  // Mappings the kernel must hold before the device goes live (persisted
  // ones). The daemon leaves out chunks it routes through linear segments.
  virtual Status InitialMappings(std::vector<Mapping>* out) = 0;

  // Decides where `req.chunk` lives, allocating if needed. The daemon sends
  // the answer in the reply batch of req.batch; once that batch's replies
  // are written, the kernel installs (RW: fills) the mapping.
  virtual Status Map(const MapRequest& req, Answer* answer) = 0;

  // The kernel refused the reply carrying `mapping`: it is not installed
  // and must never be persisted. Its allocation may leak.
  virtual void Retract(const MapRequest& req, const Mapping& mapping) = 0;

  // The kernel guarantees that the data of every RW mapping returned for
  // batches <= durable_batch is durable on the cow device. Make their
  // metadata durable (and any data the plugin wrote itself); return OK only
  // then: the daemon acknowledges the flush on OK.
  virtual Status Flush(uint64_t durable_batch) = 0;

  // RW extents, sorted by chunk, whose data and metadata are durable and
  // that will never move or become shared: safe to route through dm-linear.
  virtual Status StableExtents(std::vector<Extent>* out) = 0;

  // Looks for stable extents that were there before the device (a plugin
  // that must walk its metadata to find them), one short, bounded slice of
  // the walk per call, so that the device appears before the walk is done;
  // *more while there is more to look at. The daemon calls it once before
  // the first table, then between requests until *more is false, and folds
  // what it found. StableExtents returns what is found so far.
  virtual Status ScanStable(bool* more) {
    *more = false;
    return Status::OK();
  }

  // A number that changes whenever StableExtents would return more.
  virtual uint64_t StableGeneration() const = 0;

  // Reclaiming space the kernel reads through RO mappings (the qcow2
  // plugin's scratch copies, once over their budget). WantsReclaim is asked
  // after every batch and must be cheap. Reclaim is called with the device
  // suspended (nothing in flight) and every request read so far answered:
  // it names the extents whose mappings the kernel must forget, and must no
  // longer hand out their chunks' old places. Reclaimed follows with one
  // errno per extent, 0 where the kernel took the INVALIDATE: only then (or
  // on EINVAL, a chunk the kernel no longer tracks) may that space be reused;
  // the others are named again at the next Reclaim.
  virtual bool WantsReclaim() const { return false; }
  virtual Status Reclaim(std::vector<Extent>* forget) {
    forget->clear();
    return Status::OK();
  }
  virtual void Reclaimed(const std::vector<int>& /*errors*/) {}

  // The device is gone (every kernel fill finished). Release everything.
  virtual Status Close() = 0;
};

// What a plugin is given on the command line. Plugin-specific settings
// come as --opt KEY=VALUE pairs, so new plugins need no new fields here.
struct PluginOptions {
  std::vector<std::string> args;              // positional: e.g. BASE COW
  uint32_t chunk_sectors = 0;                 // --chunk-size; 0 = plugin default
  bool format = false;                        // --format: overwrite the COW
  std::map<std::string, std::string> params;  // --opt KEY=VALUE
  dmcow::Env* env = dmcow::Env::Default();    // all file access
};

// Compiled-in plugins, by --plugin name; an unknown name or bad options give
// an InvalidArgument status.
Status MakePlugin(const std::string& name, const PluginOptions& options, std::unique_ptr<Plugin>* out);
// Names accepted by MakePlugin, for --help.
std::vector<std::string> PluginNames();

}  // namespace dmcowd

#endif  // DMCOWD_PLUGIN_H_
