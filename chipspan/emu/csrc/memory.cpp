// Chip memory: host memory handed out per chip, with per-chip counts (current, peak)
// and an optional per-chip limit that fails the way a full chip does. Registered as
// PrivateUse1's allocator, so torch.accelerator.memory_allocated() sees it too (torch >= 2.9,
// whose DeviceAllocator carries the statistics; torch 2.8 has a plain Allocator).
#include "emu.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 9
#define EMU_DEVICE_ALLOCATOR 1
#define EMU_STATS_OVERRIDE override
#else
#define EMU_DEVICE_ALLOCATOR 0
#define EMU_STATS_OVERRIDE
#endif

#include <array>
#include <cstdio>
#include <mutex>
#include <unistd.h>
#include <string>
#include <unordered_map>
#include <unordered_set>

namespace chipspan_emu {
namespace {

using c10::CachingDeviceAllocator::DeviceStats;

std::string human_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof(text), unit ? "%.2f %s" : "%.0f %s", value, units[unit]);
  return text;
}

struct Block {
  c10::DeviceIndex chip;
  size_t bytes;
};

#if EMU_DEVICE_ALLOCATOR
class ChipAllocator final : public c10::DeviceAllocator {
#else
class ChipAllocator final : public c10::Allocator {
#endif
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const auto chip = current_chip();
    check_chip(chip);
    const c10::Device device(c10::DeviceType::PrivateUse1, chip);
    if (bytes == 0) return {nullptr, nullptr, &release, device};
    std::lock_guard<std::mutex> lock(mutex_);
    auto& stats = stats_[chip];
    const int64_t used = stats.allocated_bytes[0].current;
    const int64_t limit = limits_[chip];
    if (limit >= 0 && used + static_cast<int64_t>(bytes) > limit) {
      stats.num_ooms += 1;
      TORCH_CHECK_WITH(OutOfMemoryError, false, device, " out of memory: tried to allocate ",
                       human_bytes(bytes), " with ", human_bytes(used), " of its ",
                       human_bytes(limit), " limit in use; put fewer layers on this chip, ",
                       "shorten the batch, or use more chips");
    }
    void* data = c10::alloc_cpu(bytes);
    blocks_[data] = {chip, bytes};
    for (auto* stat : byte_stats(stats)) stat->increase(bytes);
    stats.allocation[0].increase(1);
    return {data, data, &release, device};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

#if EMU_DEVICE_ALLOCATOR
  bool initialized() override { return true; }
  void emptyCache(c10::MempoolId_t) override {}
  void recordStream(const c10::DataPtr&, c10::Stream) override {}
#endif

  DeviceStats getDeviceStats(c10::DeviceIndex chip) EMU_STATS_OVERRIDE {
    check_chip(chip);
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_[chip];
  }
  void resetAccumulatedStats(c10::DeviceIndex chip) EMU_STATS_OVERRIDE {
    check_chip(chip);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* stat : byte_stats(stats_[chip])) stat->reset_accumulated();
    stats_[chip].allocation[0].reset_accumulated();
  }
  void resetPeakStats(c10::DeviceIndex chip) EMU_STATS_OVERRIDE {
    check_chip(chip);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* stat : byte_stats(stats_[chip])) stat->reset_peak();
    stats_[chip].allocation[0].reset_peak();
  }
  // (free, total): the chip's limit, or the host's memory when it has none.
  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex chip) EMU_STATS_OVERRIDE {
    check_chip(chip);
    const auto memory = chip_memory(chip);
    if (memory.limit < 0) {
      const size_t page = sysconf(_SC_PAGESIZE);
      return {sysconf(_SC_AVPHYS_PAGES) * page, sysconf(_SC_PHYS_PAGES) * page};
    }
    return {static_cast<size_t>(std::max<int64_t>(memory.limit - memory.allocated, 0)),
            static_cast<size_t>(memory.limit)};
  }

  ChipMemory memory(c10::DeviceIndex chip) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& bytes = stats_[chip].allocated_bytes[0];
    return {bytes.current, bytes.peak, limits_[chip]};
  }
  void set_limit(c10::DeviceIndex chip, int64_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limits_[chip] = limit;
  }
  c10::Device device_of(const void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = blocks_.find(const_cast<void*>(ptr));
    TORCH_CHECK(found != blocks_.end(), "pointer ", ptr, " was not allocated on an emu chip");
    return {c10::DeviceType::PrivateUse1, found->second.chip};
  }

 private:
  static void release(void* data);

  // Without a cache, allocated = reserved = active bytes; PyTorch's tools read all three.
  static std::array<c10::CachingAllocator::Stat*, 3> byte_stats(DeviceStats& stats) {
    return {&stats.allocated_bytes[0], &stats.reserved_bytes[0], &stats.active_bytes[0]};
  }

  std::mutex mutex_;
  std::unordered_map<void*, Block> blocks_;
  std::array<DeviceStats, kMaxChips> stats_;
  std::array<int64_t, kMaxChips> limits_ = [] {
    std::array<int64_t, kMaxChips> none;
    none.fill(-1);
    return none;
  }();
};

ChipAllocator& chips() {
  static ChipAllocator* allocator = new ChipAllocator();  // never freed: tensors may outlive statics
  return *allocator;
}

void ChipAllocator::release(void* data) {
  if (!data) return;
  auto& self = chips();
  {
    std::lock_guard<std::mutex> lock(self.mutex_);
    auto found = self.blocks_.find(data);
    TORCH_INTERNAL_ASSERT(found != self.blocks_.end());
    auto& stats = self.stats_[found->second.chip];
    for (auto* stat : byte_stats(stats)) stat->decrease(found->second.bytes);
    stats.allocation[0].decrease(1);
    self.blocks_.erase(found);
  }
  c10::free_cpu(data);
}

// Pinned host memory is ordinary host memory here; we only remember which pointers are "pinned".
class PinnedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = bytes ? c10::alloc_cpu(bytes) : nullptr;
    if (data) {
      std::lock_guard<std::mutex> lock(mutex_);
      pinned_.insert(data);
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  bool contains(const void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    return pinned_.count(const_cast<void*>(ptr)) > 0;
  }

 private:
  static void release(void* data);
  std::mutex mutex_;
  std::unordered_set<void*> pinned_;
};

PinnedAllocator& pinned() {
  static PinnedAllocator* allocator = new PinnedAllocator();
  return *allocator;
}

void PinnedAllocator::release(void* data) {
  if (!data) return;
  {
    std::lock_guard<std::mutex> lock(pinned().mutex_);
    pinned().pinned_.erase(data);
  }
  c10::free_cpu(data);
}

const bool g_allocator_registered = [] {
  c10::SetAllocator(c10::DeviceType::PrivateUse1, &chips());
  return true;
}();

}  // namespace

ChipMemory chip_memory(c10::DeviceIndex chip) { return chips().memory(chip); }
std::pair<size_t, size_t> memory_info(c10::DeviceIndex chip) { return chips().getMemoryInfo(chip); }
void reset_peak(c10::DeviceIndex chip) { chips().resetPeakStats(chip); }
void set_limit(c10::DeviceIndex chip, int64_t limit) { chips().set_limit(chip, limit); }
c10::Device device_of_pointer(const void* ptr) { return chips().device_of(ptr); }
c10::Allocator* pinned_allocator() { return &pinned(); }
bool is_pinned(const void* ptr) { return pinned().contains(ptr); }

}  // namespace chipspan_emu
