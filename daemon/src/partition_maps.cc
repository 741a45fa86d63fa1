#include "partition_maps.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "dm.h"
#include "partition_table.h"
#include "sys_error.h"

namespace dmcowd {

using dmcow::Status;

Status MapPartitions(const std::string& whole, bool read_only, std::vector<PartitionMap>* made,
                     std::vector<std::string>* warnings) {
  made->clear();
  const std::string device = "/dev/mapper/" + whole;
  dm::Info info;
  DMCOW_RETURN_IF_ERROR(dm::GetInfo(whole, &info));
  const int fd = ::open(device.c_str(), O_RDONLY | O_CLOEXEC);
  uint64_t bytes = 0;
  if (fd < 0 || ::ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
    Status s = Errno(device, errno);
    if (fd >= 0) ::close(fd);
    return s;
  }
  auto read_at = [fd](uint64_t offset, void* buf, size_t len) {
    return ::pread(fd, buf, len, static_cast<off_t>(offset)) == static_cast<ssize_t>(len);
  };
  PartitionTable table;
  Status s = ReadPartitionTable(read_at, bytes / 512, &table);
  ::close(fd);
  if (!s.ok()) return Status::IOError(device + ": " + s.message());
  *warnings = table.warnings;
  const std::string linear_onto = std::to_string(info.major) + ":" + std::to_string(info.minor) + " ";
  for (const Partition& p : table.partitions) {
    PartitionMap m{PartitionName(whole, p.number), p.number, p.start_sector, p.sectors, p.extended};
    if (dm::Exists(m.name)) {
      s = Status::InvalidArgument("partition " + std::to_string(p.number) + " of " + device + ": /dev/mapper/" +
                                  m.name + " exists already (another device's name?)");
    } else {
      const dm::Target target{0, p.sectors, "linear", linear_onto + std::to_string(p.start_sector)};
      s = dm::CreateActive(m.name, info.uuid.empty() ? "" : PartitionUuid(info.uuid, p.number), {target}, read_only);
    }
    if (!s.ok()) {
      std::vector<std::string> names;
      for (const PartitionMap& done : *made) names.push_back(done.name);
      UnmapPartitions(names);
      made->clear();
      return s;
    }
    made->push_back(m);
  }
  return Status::OK();
}

Status CheckUnused(const std::string& whole, const std::vector<std::string>& partitions) {
  int mapped = 0;
  for (const std::string& name : partitions) {
    dm::Info info;
    Status s = dm::GetInfo(name, &info);
    if (s.code() == Status::Code::kNotFound) continue;
    DMCOW_RETURN_IF_ERROR(s);
    if (info.open_count > 0) return Status::Busy("/dev/mapper/" + name + " is in use (mounted or open)");
    mapped++;
  }
  dm::Info info;
  Status s = dm::GetInfo(whole, &info);
  if (s.code() == Status::Code::kNotFound) return Status::OK();
  DMCOW_RETURN_IF_ERROR(s);
  // Each partition mapping holds the device open once.
  if (info.open_count > mapped) return Status::Busy("/dev/mapper/" + whole + " is in use (mounted or open)");
  return Status::OK();
}

Status UnmapPartitions(const std::vector<std::string>& partitions) {
  for (auto it = partitions.rbegin(); it != partitions.rend(); ++it) {
    if (!dm::Exists(*it)) continue;
    bool busy = false;
    Status s = dm::Remove(*it, &busy);
    if (!s.ok()) return busy ? Status::Busy("/dev/mapper/" + *it + " is in use (mounted or open)") : s;
  }
  return Status::OK();
}

}  // namespace dmcowd
