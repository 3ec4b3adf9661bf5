// Shared declarations of the emulated chip backend `emu` (PyTorch's PrivateUse1 key).
// Every chip keeps its tensors in host memory; compute runs through CPU kernels.
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace chipspan_emu {

constexpr c10::DeviceIndex kMaxChips = 64;

// chips.cpp: how many chips exist and which one this thread works on.
c10::DeviceIndex chip_count();
void set_chip_count(int64_t n);
c10::DeviceIndex current_chip();
void set_current_chip(c10::DeviceIndex chip);
void check_chip(c10::DeviceIndex chip);

// generator.cpp: one random generator per chip; CPU kernels draw from its CPU twin.
const at::Generator& default_generator(c10::DeviceIndex chip);
at::Generator new_generator(c10::DeviceIndex chip);
at::Generator cpu_twin(const at::Generator& emu_generator);

// memory.cpp: per-chip byte counts and an optional per-chip limit.
struct ChipMemory {
  int64_t allocated = 0;
  int64_t peak = 0;
  int64_t limit = -1;  // -1: no limit
};
ChipMemory chip_memory(c10::DeviceIndex chip);
std::pair<size_t, size_t> memory_info(c10::DeviceIndex chip);  // (free, total) bytes
void reset_peak(c10::DeviceIndex chip);
void set_limit(c10::DeviceIndex chip, int64_t limit);
c10::Device device_of_pointer(const void* ptr);
c10::Allocator* pinned_allocator();
bool is_pinned(const void* ptr);

// ops.cpp: the dtypes a profile (such as bm1684x) refuses to hold on a chip, named in the error.
void set_refused_dtypes(const std::vector<at::ScalarType>& dtypes, const std::string& profile);

}  // namespace chipspan_emu
